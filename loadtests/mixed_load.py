"""A bounded, mixed load on a loopback server, in stages of rising concurrency; writes a JSON
report and a PNG (throughput and latency percentiles over time).

    python loadtests/mixed_load.py --serve models/SmolLM2-135M-Instruct    # `make loadtest`
    python loadtests/mixed_load.py --base-url http://127.0.0.1:8000 --api-key sk-subj-...

Traffic (seeded): chat and completions, streamed or not, both quality levels, short to long
prompts, and clients that leave: a stream closed after its second chunk, a non-streamed
request given up after half a second. `--serve MODEL` starts `subjective serve` on a free
loopback port for the run (anonymous access) and stops it after. Only loopback targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SENTENCE = "The quick brown fox jumps over the lazy dog while the band plays on. "
BUCKET_S = 5.0
TTFT_TARGET_S = 2.0


@dataclass
class Outcome:
    stage: int
    concurrency: int
    started_s: float  # since the run began
    kind: str  # "chat" | "completion"
    stream: bool
    quality: str
    prompt_sentences: int
    status: str  # "ok" | "left" (the client went away on purpose) | an error name
    ttft_s: float | None  # to the first content; streams only
    latency_s: float
    completion_tokens: int


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_request(
    client: openai.AsyncOpenAI,
    args: argparse.Namespace,
    rng: random.Random,
    stage: int,
    concurrency: int,
    began: float,
) -> Outcome:
    kind = rng.choice(["chat", "completion"])
    stream = rng.random() < 0.7
    quality = rng.choice(["aggressive", "conservative"])
    sentences = rng.choice([1, 4, 16, 48])
    leaves = rng.random() < args.leave_fraction
    max_tokens = rng.choice([8, 32, 64])
    prompt = SENTENCE * sentences
    common = dict(model=args.model, max_tokens=max_tokens, extra_body={"quality": quality})
    start = time.perf_counter()
    first: float | None = None
    tokens, status = 0, "ok"
    try:
        if kind == "chat":
            call = client.chat.completions.create(
                messages=[{"role": "user", "content": prompt + "Summarise."}],
                stream=stream,
                stream_options={"include_usage": True} if stream else None,
                **common,
            )
        else:
            call = client.completions.create(
                prompt=prompt,
                stream=stream,
                stream_options={"include_usage": True} if stream else None,
                **common,
            )
        if stream:
            chunks = 0
            async with await call as events:
                async for event in events:
                    if event.usage is not None:
                        tokens = event.usage.completion_tokens
                    if event.choices:
                        first = first or time.perf_counter()
                        chunks += 1
                        if leaves and chunks == 2:
                            status = "left"
                            break
        elif leaves:
            try:
                await asyncio.wait_for(call, timeout=0.5)
            except TimeoutError:
                status = "left"
        else:
            response = await call
            tokens = response.usage.completion_tokens if response.usage else 0
    except openai.APIStatusError as error:
        status = f"http_{error.status_code}"
    except openai.APIError as error:
        status = type(error).__name__
    end = time.perf_counter()
    return Outcome(
        stage,
        concurrency,
        start - began,
        kind,
        stream,
        quality,
        sentences,
        status,
        None if first is None else first - start,
        end - start,
        tokens,
    )


async def run_stages(args: argparse.Namespace, base_url: str) -> list[Outcome]:
    rng = random.Random(args.seed)
    outcomes: list[Outcome] = []
    client = openai.AsyncOpenAI(
        base_url=f"{base_url}/v1",
        api_key=args.api_key or "none",
        max_retries=0,
        timeout=args.timeout,
    )
    began = time.perf_counter()
    async with client:
        for stage, concurrency in enumerate(args.stages):
            deadline = time.perf_counter() + args.stage_seconds

            async def worker(
                concurrency: int = concurrency, stage: int = stage, deadline: float = deadline
            ) -> None:
                while time.perf_counter() < deadline:
                    outcomes.append(await one_request(client, args, rng, stage, concurrency, began))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def stage_summary(outcomes: list[Outcome], concurrency: int) -> dict:
    mine = [o for o in outcomes if o.concurrency == concurrency]
    served = [o for o in mine if o.status == "ok"]
    span = max(o.started_s + o.latency_s for o in mine) - min(o.started_s for o in mine)
    ttfts = [o.ttft_s for o in served if o.ttft_s is not None]
    return {
        "concurrency": concurrency,
        "requests": len(mine),
        "ok": len(served),
        "left": sum(o.status == "left" for o in mine),
        "errors": sum(o.status not in ("ok", "left") for o in mine),
        "seconds": span,
        "requests_per_s": len(served) / span if span else 0.0,
        "completion_tokens_per_s": sum(o.completion_tokens for o in served) / span if span else 0,
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p95_s": percentile(ttfts, 0.95),
        "latency_p50_s": percentile([o.latency_s for o in served], 0.5),
        "latency_p95_s": percentile([o.latency_s for o in served], 0.95),
    }


def timeline(outcomes: list[Outcome]) -> list[dict]:
    """Per `BUCKET_S` of the run, by completion time: throughput and latency percentiles."""
    end = max(o.started_s + o.latency_s for o in outcomes)
    rows = []
    for bucket in range(int(end // BUCKET_S) + 1):
        low = bucket * BUCKET_S
        done = [
            o
            for o in outcomes
            if o.status == "ok" and low <= o.started_s + o.latency_s < low + BUCKET_S
        ]
        ttfts = [o.ttft_s for o in done if o.ttft_s is not None]
        rows.append(
            {
                "t_s": low,
                "requests_per_s": len(done) / BUCKET_S,
                "ttft_p50_s": percentile(ttfts, 0.5),
                "ttft_p95_s": percentile(ttfts, 0.95),
                "latency_p95_s": percentile([o.latency_s for o in done], 0.95),
            }
        )
    return rows


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["timeline"]
    t = [row["t_s"] for row in rows]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(t, [row["requests_per_s"] for row in rows], drawstyle="steps-post")
    top.set_ylabel("requests/s served")
    for name, label in (
        ("ttft_p50_s", "TTFT p50"),
        ("ttft_p95_s", "TTFT p95"),
        ("latency_p95_s", "latency p95"),
    ):
        bottom.plot(t, [row[name] for row in rows], label=label, drawstyle="steps-post")
    bottom.axhline(TTFT_TARGET_S, color="grey", linestyle=":", label="TTFT target")
    bottom.set_ylabel("seconds")
    bottom.set_xlabel(f"time (s); stages of concurrency {report['stages_concurrency']}")
    bottom.legend()
    top.set_title("mixed load: throughput and latency over time")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_server(model: Path, log_path: Path):
    """`subjective serve` on `model`, loopback, anonymous; its base URL once healthy."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "subjective.cli",
        "serve",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--allow-anonymous",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: see {log_path}")
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--serve", type=Path, help="start a server on this model for the run")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--api-key", help="key to send (none: an --allow-anonymous server)")
    parser.add_argument(
        "--stages", type=lambda s: [int(c) for c in s.split(",")], default=[1, 2, 4, 8, 16, 32]
    )
    parser.add_argument("--stage-seconds", type=float, default=45.0)
    parser.add_argument("--leave-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/load.json"))
    args = parser.parse_args()

    started = time.time()
    if args.serve is not None:
        args.model = args.serve.name
        args.output.parent.mkdir(parents=True, exist_ok=True)
        log_path = Path("var/loadtest-server.log")  # var/: local state, not committed
        log_path.parent.mkdir(exist_ok=True)
        with local_server(args.serve, log_path) as base_url:
            outcomes = asyncio.run(run_stages(args, base_url))
    else:
        if urlsplit(args.base_url).hostname not in LOOPBACK:
            raise SystemExit(f"{args.base_url}: only loopback targets")
        outcomes = asyncio.run(run_stages(args, args.base_url))

    from subjective.machine import machine_info

    stages = [stage_summary(outcomes, c) for c in args.stages]
    sustained = [
        s["requests_per_s"]
        for s in stages
        if s["ttft_p95_s"] is not None and s["ttft_p95_s"] < TTFT_TARGET_S
    ]
    report = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "stages_concurrency": args.stages,
        "stage_seconds": args.stage_seconds,
        "stages": stages,
        "sustained_requests_per_s_at_p95_ttft_under_2s": max(sustained, default=0.0),
        "timeline": timeline(outcomes),
        "requests": [asdict(o) for o in outcomes],
    }
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.output.with_suffix(".png"))
    print(
        json.dumps(
            {k: report[k] for k in ("stages", "sustained_requests_per_s_at_p95_ttft_under_2s")},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
