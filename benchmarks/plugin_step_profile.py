"""Throughput of the vLLM plugin's gated step against the dense model, and where a step's time goes.

Each configuration runs in its own in-process engine (a child process of this script: `--dtype`,
eager, greedy, `ignore_eos`): a warm-up request, then `--repeats` timed `generate` calls of
`--prompts` random prompts of `--prompt-tokens` tokens each producing `--new-tokens` tokens; the
best call's output tokens per second is reported. Torch runs one thread (`OMP_NUM_THREADS=1`
unless set): on a shared machine two spinning OpenMP threads stall whenever one is descheduled.
Gated models run with dense-size pages (`kv_capacity=1`) so the router alone decides (no
capacity cap). For each gated run the compute_slots counters give the token-layers skipped and
the ideal speed-up `1 / (1 - skipped token-layers / all token-layers)`. `--profile` adds, per
configuration, the top ops by self CPU time of one more `generate` (a quarter of the new
tokens) under the torch profiler.

    python benchmarks/plugin_step_profile.py --dense models/SmolLM2-135M-Instruct \
        --sdt /tmp/speed/sdt --profile --output benchmarks/results/plugin_step_profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.0, 0.5, 1.0)
PROFILE_ROWS = 15


def child(spec: dict) -> dict:
    """One engine, one configuration: timings, skip counts and (optionally) a profile table."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch
    from vllm import LLM, SamplingParams

    from subjective.model_registry.compute_slots import ENV_VAR, FIELDS, FrontEndSlots
    from subjective.model_registry.config import ModelConfig
    from subjective.model_registry.vllm_plugin import engine_kwargs

    slots = FrontEndSlots.create(slots=256)
    os.environ[ENV_VAR] = str(slots.path)
    n, length, new = spec["prompts"], spec["prompt_tokens"], spec["new_tokens"]
    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        max_model_len=length + new,
        max_num_seqs=n,
        max_num_batched_tokens=max(n * length, 256),
        distributed_executor_backend="uni",
        seed=0,
        **{"enforce_eager": True, **engine_kwargs(spec["model"], kv_capacity=1.0)},
    )
    generator = torch.Generator().manual_seed(0)
    prompts = [
        {"prompt_token_ids": torch.randint(100, 10000, (length,), generator=generator).tolist()}
        for _ in range(n)
    ]
    extra = {} if spec["threshold"] is None else {"threshold": spec["threshold"]}

    def generate(tokens: int) -> tuple[float, float, list[tuple[int, int]]]:
        rows = [slots.acquire() for _ in prompts]
        params = [
            SamplingParams(
                max_tokens=tokens,
                temperature=0.0,
                ignore_eos=True,
                extra_args={**extra, "meter_slot": slot, "meter_tag": tag},
            )
            for slot, tag in rows
        ]
        started, cpu_started = time.perf_counter(), time.process_time()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - started, time.process_time() - cpu_started, rows

    generate(4)  # warm-up
    seconds, cpu_seconds, rows = min(
        (generate(new) for _ in range(spec["repeats"])), key=lambda r: r[0]
    )
    counts = [
        dict(zip(FIELDS, (int(v) for v in slots.rows[slot, 1:]), strict=True)) for slot, _ in rows
    ]
    layers = ModelConfig.from_folder(spec["model"]).num_hidden_layers
    skipped = sum(c["token_layers_skipped"] for c in counts)
    all_token_layers = n * (length + new - 1) * layers
    result = {
        "output_tokens_per_s": round(n * new / seconds, 2),
        "seconds": round(seconds, 3),
        # CPU time of this process (the engine runs in it): robust to a busy machine.
        "output_tokens_per_cpu_s": round(n * new / cpu_seconds, 2),
        "skipped_token_layer_fraction": round(skipped / all_token_layers, 4),
        "ideal_speedup": round(1 / (1 - skipped / all_token_layers), 3),
    }
    if spec["profile"]:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(max(new // 4, 1))
        result["profile"] = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS, max_name_column_width=48
        )
    slots.close()
    return result


def run_child(spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        env={"OMP_NUM_THREADS": "1", **os.environ},
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=REPO,
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-4000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dense", type=Path, default=REPO / "models/SmolLM2-135M-Instruct")
    parser.add_argument("--sdt", type=Path, required=False)
    parser.add_argument("--thresholds", type=float, nargs="*", default=list(THRESHOLDS))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    shape = {
        "prompts": args.prompts,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "profile": args.profile,
        "dtype": args.dtype,
    }
    configs = {"dense": (args.dense, None)}
    if args.sdt:
        configs |= {f"sdt_threshold_{t:g}": (args.sdt, t) for t in args.thresholds}
    runs = {}
    for name, (model, threshold) in configs.items():
        runs[name] = run_child({**shape, "model": str(model), "threshold": threshold})
        print(name, {k: v for k, v in runs[name].items() if k != "profile"}, flush=True)
    dense = runs["dense"]["output_tokens_per_s"]
    dense_cpu = runs["dense"]["output_tokens_per_cpu_s"]
    for run in runs.values():
        run["vs_dense"] = round(run["output_tokens_per_s"] / dense, 3)
        run["vs_dense_cpu"] = round(run["output_tokens_per_cpu_s"] / dense_cpu, 3)
    from subjective.machine import machine_info

    report = {"command": " ".join(sys.argv), **shape, "runs": runs, "machine": machine_info()}
    report["machine"]["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS", "1")
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
