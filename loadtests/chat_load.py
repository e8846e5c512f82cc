"""A bounded load on a running server: N chat requests, C at a time; prints latency percentiles.

    python loadtests/chat_load.py --base-url http://127.0.0.1:8000 --requests 64 --concurrency 8

Only loopback or the project's own test hosts are valid targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import httpx


async def one_request(client: httpx.AsyncClient, model: str, max_tokens: int) -> float:
    started = time.perf_counter()
    response = await client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "Name three prime numbers."}],
            "max_tokens": max_tokens,
        },
    )
    response.raise_for_status()
    return time.perf_counter() - started


async def run(args: argparse.Namespace) -> dict:
    limit = asyncio.Semaphore(args.concurrency)
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(
        base_url=args.base_url, timeout=args.timeout, headers=headers
    ) as client:

        async def bounded() -> float:
            async with limit:
                return await one_request(client, args.model, args.max_tokens)

        started = time.perf_counter()
        latencies = sorted(await asyncio.gather(*(bounded() for _ in range(args.requests))))
        elapsed = time.perf_counter() - started
    return {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "seconds": elapsed,
        "requests_per_second": args.requests / elapsed,
        "median_s": statistics.median(latencies),
        "p95_s": latencies[int(0.95 * (len(latencies) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SUBJECTIVE_API_KEY"),
        help="key to send (default: $SUBJECTIVE_API_KEY; none for --allow-anonymous servers)",
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=300.0)
    print(json.dumps(asyncio.run(run(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
