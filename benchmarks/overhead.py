"""What the server, meter and ledger add to a request's latency, against vLLM's engine alone.

One engine (the one the server app builds), two ways in, in one process: called
directly with `AsyncLLM.generate`, and through the full server app (`create_app` given that
engine, served by uvicorn on loopback: auth, validation, meter, SQLite ledger write before the
response) over HTTP. Requests alternate between the two, one at a time, with the same prompt and
greedy decoding, so both generate the same tokens; the result is the ratio of the medians.

    python benchmarks/overhead.py --requests 40 --output benchmarks/results/overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from subjective.paths import DEFAULT_MODEL  # noqa: E402
from subjective.server.config import ServerConfig  # noqa: E402

MESSAGES = [{"role": "user", "content": "Explain in a few sentences what a hash table is."}]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def serve_app(config: ServerConfig):
    """The server app on loopback, in this event loop; returns it, its server and task."""
    import uvicorn

    from subjective.server.app import create_app

    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=config.port, log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.1)
    return app, server, task


async def run(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    config = ServerConfig(
        model_dir=args.model,
        served_model_name=args.model.name,
        port=free_port(),
        max_model_len=args.max_model_len,
        kv_cache_gib=1,
        enforce_eager=args.eager,
        allow_anonymous=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # As the server tokenises a chat request.
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(
        temperature=0.0, max_tokens=args.max_tokens, output_kind=RequestOutputKind.FINAL_ONLY
    )
    body = {
        "model": config.served_model_name,
        "messages": MESSAGES,
        "max_tokens": args.max_tokens,
        "temperature": 0,
    }

    with tempfile.TemporaryDirectory() as state:
        os.environ.pop("REDIS_URL", None)  # the embedded SQLite ledger, the default
        os.environ["SUBJECTIVE_LEDGER_PATH"] = str(Path(state) / "ledger.sqlite3")
        os.environ["SUBJECTIVE_KEYS_PATH"] = str(Path(state) / "keys.sqlite3")
        os.environ["SUBJECTIVE_SPOOL_DIR"] = str(Path(state) / "spool")
        app, server, serving = await serve_app(config)
        engine = app.state.service.generator.engine  # the very engine the server runs
        base = f"http://127.0.0.1:{config.port}"
        try:
            async with httpx.AsyncClient(base_url=base, timeout=300) as http:

                async def via_engine(i: int) -> tuple[float, int]:
                    start = time.perf_counter()
                    async for output in engine.generate(
                        TokensPrompt(prompt_token_ids=prompt), params, f"direct-{i}"
                    ):
                        final = output
                    return time.perf_counter() - start, len(final.outputs[0].token_ids)

                async def via_server(_: int) -> tuple[float, int]:
                    start = time.perf_counter()
                    response = await http.post("/v1/chat/completions", json=body)
                    response.raise_for_status()
                    elapsed = time.perf_counter() - start
                    return elapsed, response.json()["usage"]["completion_tokens"]

                for i in range(args.warmup):
                    await via_engine(-1 - i)
                    await via_server(-1 - i)
                engine_s, server_s, tokens = [], [], set()
                for i in range(args.requests):
                    order = (via_engine, via_server) if i % 2 == 0 else (via_server, via_engine)
                    for call in order:
                        elapsed, n = await call(i)
                        (engine_s if call is via_engine else server_s).append(elapsed)
                        tokens.add(n)
        finally:
            server.should_exit = True  # its shutdown stops the engine too
            await serving

    engine_ms = statistics.median(engine_s) * 1000
    server_ms = statistics.median(server_s) * 1000
    return {
        "command": "python benchmarks/overhead.py " + " ".join(sys.argv[1:]),
        "requests": args.requests,
        "engine_median_ms": round(engine_ms, 2),
        "server_median_ms": round(server_ms, 2),
        "median_latency_ratio": round(server_ms / engine_ms, 4),
        # Requests i of both paths ran back to back: their difference cancels slow drifts.
        "median_paired_difference_ms": round(
            statistics.median(s - e for s, e in zip(server_s, engine_s, strict=True)) * 1000, 2
        ),
        "engine_p10_p90_ms": [round(q * 1000, 2) for q in deciles(engine_s)],
        "server_p10_p90_ms": [round(q * 1000, 2) for q in deciles(server_s)],
        "max_tokens": args.max_tokens,
        "completion_tokens": sorted(tokens),
        "enforce_eager": args.eager,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
    }


def deciles(samples: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples, n=10)
    return cuts[0], cuts[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
