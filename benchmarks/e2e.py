"""End-to-end serving throughput: dense vs SDT, STT and hybrid through vLLM, one run, same prompts.

Workload (default): 16 prompts of 256 tokens each (consecutive windows of `data/validation.txt`,
so the gates see real text), 128 new tokens each, greedy, `ignore_eos`, all submitted at once to
vLLM's `AsyncLLM` and streamed. Each engine configuration (variant × dtype × mode) runs in a
process of its own, one after the other, in the process layout `subjective serve` uses: the
AsyncLLM front end (this script's child) apart from vLLM's engine core and worker, so streaming
and detokenisation overlap the forward as they do when serving (the tests' in-process engine
would put them on the forward's path). Prefix caching is off for every
engine (gated models cannot use it, and the prompts share none). One warm-up batch precedes the
timed ones; a gated engine then runs one timed batch per setting:

- `all-kept`: threshold 0; every token wants the full path (a gated layer still keeps at most
  its KV capacity γ per block: `--kv-capacity 1.0` lifts that cap);
- `all-skipped`: threshold 1; only the first `sink_tokens` positions of each sequence run;
- `conservative`, `aggressive`: the checkpoint's quality levels.

The hybrid (a quarter of the layers softmax, the rest Gated DeltaNet) runs one batch, setting
`hybrid`; it needs bfloat16 on a CPU (vLLM's CPU GDN kernels), so its float32 rows say
`skipped`. Without `--models hybrid=DIR` it is hybridized from dense without training
(speed does not depend on the weights).

Reading a row: `tokens_per_s` = output tokens of the batch / its wall time (prefill included);
`ttft_*` = first streamed token − submission, `tpot_*` = (last − first token) / (tokens − 1),
p50 and p95 over the batch's requests; `skipped_fraction` = skipped / decided gated
token-layers (compute_slots counters, prompt and completion); `skipped_fraction_all_layers`
counts every layer of the model instead, and `ideal_speedup` = 1 / (1 − that);
`ratio_to_dense` = tokens_per_s / that of dense in the same dtype, eager; `ratio_to_ideal` =
ratio_to_dense / ideal_speedup (1.0: skipping saved exactly its share of the work). A row with
`error` (its engine died) or `skipped` (not runnable, with the reason) has no measurements.
Compiled gated models compile their layers' shape-generic pieces (`vllm_plugin.layers.Steps`);
routing runs eagerly.

    python benchmarks/e2e.py            # writes benchmarks/results/e2e_cpu.json (.png beside)
    python benchmarks/e2e.py --models sdt=models/SmolLM2-SDT stt=models/SmolLM2-STT
    python benchmarks/e2e.py --variants dense hybrid --models hybrid=DIR --prompt-tokens 2048
    python benchmarks/e2e.py --smoke --out /tmp/e2e.json   # tiny sizes, for the test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from subjective.machine import machine_info  # noqa: E402
from subjective.model_registry.compute_slots import (  # noqa: E402
    ENV_VAR,
    EXTRA_ARG_SLOT,
    EXTRA_ARG_TAG,
    ComputeCounts,
    FrontEndSlots,
    default_path,
)
from subjective.model_registry.config import ModelConfig  # noqa: E402
from subjective.model_registry.vllm_plugin import (  # noqa: E402
    EXTRA_ARG_QUALITY,
    EXTRA_ARG_THRESHOLD,
    engine_kwargs,
)

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

DENSE = REPO / "models" / "SmolLM2-135M-Instruct"
DATA = REPO / "data" / "validation.txt"
SETTINGS: dict[str, dict[str, Any]] = {
    "all-kept": {EXTRA_ARG_THRESHOLD: 0.0},
    "all-skipped": {EXTRA_ARG_THRESHOLD: 1.0},
    "conservative": {EXTRA_ARG_QUALITY: "conservative"},
    "aggressive": {EXTRA_ARG_QUALITY: "aggressive"},
}
VARIANTS = ("dense", "sdt", "stt", "hybrid")
HYBRID_SOFTMAX_RATIO = 0.25  # of a hybrid made here (no `--models hybrid=DIR`)
MEASURES = (
    "tokens_per_s",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "tpot_p50_ms",
    "tpot_p95_ms",
    "skipped_fraction",
    "ratio_to_dense",
    "ratio_to_ideal",
)
SMOKE = {
    "prompts": 2,
    "prompt_tokens": 16,
    "new_tokens": 4,
    "dtypes": ["float32"],
    "modes": ["eager"],
    "variants": ["dense", "sdt"],
    "settings": ["all-kept", "all-skipped"],
}
WARMUP_TOKENS = 2
# Lines of a dead child's log that name the cause (vLLM's own log prefix stripped).
CAUSE = re.compile(r"died unexpectedly|Fatal Python error|\w+(Error|Exception): ")
LOG_PREFIX = re.compile(r"^\(.*?\) [A-Z]+ [\d-]+ [\d:]+ \[.*?\] ")
EXIT_SIGNAL = re.compile(r"exit code: -(\d+)")


@dataclass(frozen=True)
class Engine:
    """One engine configuration: what one child process serves."""

    variant: str
    dtype: str
    mode: str
    folder: Path
    settings: tuple[str, ...]  # ("dense",) for the dense model, ("hybrid",) for a hybrid

    def row(self, setting: str, **fields: Any) -> dict[str, Any]:
        head = {"variant": self.variant, "dtype": self.dtype, "mode": self.mode}
        return {**head, "setting": setting, **fields}

    def unmeasured(self, setting: str, **why: str) -> dict[str, Any]:
        """A row without measurements, saying why (`error` or `skipped`)."""
        return self.row(setting, **dict.fromkeys(MEASURES), **why)


# ---------------------------------------------------------------- child: one engine, timed


@dataclass
class Timing:
    start: float
    first: float
    last: float
    tokens: int


def percentiles_ms(values: list[float]) -> tuple[float, float]:
    import numpy as np

    p50, p95 = np.percentile(np.array(values) * 1000, [50, 95])
    return round(float(p50), 3), round(float(p95), 3)


def build_engine(spec: dict[str, Any]) -> AsyncLLM:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = {
        "model": spec["model"],
        "dtype": spec["dtype"],
        "max_model_len": spec["prompt_tokens"] + spec["new_tokens"],
        "max_num_seqs": len(spec["prompts"]),
        "enforce_eager": spec["mode"] == "eager",
        "enable_prefix_caching": False,
        "distributed_executor_backend": "uni",
        "seed": 0,
    }
    args.update(engine_kwargs(spec["model"], spec["kv_capacity"]))
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))


async def stream(
    engine: AsyncLLM, prompt: list[int], params: SamplingParams, request_id: str
) -> Timing:
    """One request, streamed: when it was sent, its first and last tokens, how many."""
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    first, last, tokens = 0.0, 0.0, 0
    async for output in engine.generate(TokensPrompt(prompt_token_ids=prompt), params, request_id):
        new = len(output.outputs[0].token_ids)
        if new:
            last = time.perf_counter()
            first = first or last
            tokens += new
    return Timing(start, first, last, tokens)


async def run_batch(
    engine: AsyncLLM, spec: dict, extra: dict, max_tokens: int, slots: FrontEndSlots, name: str
) -> dict[str, Any]:
    """All prompts at once; throughput, latency percentiles and summed gate counters."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    rows = [slots.acquire() for _ in spec["prompts"]]
    params = [
        SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
            extra_args={**extra, EXTRA_ARG_SLOT: slot, EXTRA_ARG_TAG: tag},
        )
        for slot, tag in rows
    ]
    begin = time.perf_counter()
    timings = await asyncio.gather(
        *(
            stream(engine, prompt, p, f"{name}-{i}")
            for i, (prompt, p) in enumerate(zip(spec["prompts"], params, strict=True))
        )
    )
    wall = max(t.last for t in timings) - begin
    counts = [slots.read(slot) for slot, _ in rows]
    for slot, _ in rows:
        slots.release(slot)
    return summarize(spec, timings, wall, counts)


def summarize(
    spec: dict, timings: list[Timing], wall: float, counts: list[ComputeCounts]
) -> dict[str, Any]:
    tokens = sum(t.tokens for t in timings)
    ttft = percentiles_ms([t.first - t.start for t in timings])
    tpot = percentiles_ms([(t.last - t.first) / max(t.tokens - 1, 1) for t in timings])
    decided = sum(c.token_layers for c in counts)
    skipped = sum(c.token_layers_skipped for c in counts)
    config = ModelConfig.from_folder(spec["model"])
    gated_share = len(config.routing.gated_layers) / config.num_hidden_layers
    of_all = skipped / decided * gated_share if decided else 0.0
    return {
        "tokens_per_s": round(tokens / wall, 3),
        "ttft_p50_ms": ttft[0],
        "ttft_p95_ms": ttft[1],
        "tpot_p50_ms": tpot[0],
        "tpot_p95_ms": tpot[1],
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "token_layers": decided,
        "token_layers_skipped": skipped,
        "skipped_fraction": round(skipped / decided, 6) if decided else 0.0,
        "skipped_fraction_all_layers": round(of_all, 6),
        "ideal_speedup": round(1 / (1 - of_all), 6),
    }


async def serve_settings(spec: dict[str, Any], slots: FrontEndSlots, results: Path) -> None:
    """Load, warm up, then one timed batch per setting, each appended to `results` at once."""
    started = time.perf_counter()
    engine = build_engine(spec)
    try:
        load_s = round(time.perf_counter() - started, 1)
        first = next(iter(spec["settings"].values()))
        await run_batch(engine, spec, first, WARMUP_TOKENS, slots, "warmup")
        for setting, extra in spec["settings"].items():
            row = await run_batch(engine, spec, extra, spec["new_tokens"], slots, setting)
            with results.open("a") as out:
                out.write(json.dumps({"setting": setting, "load_s": load_s, **row}) + "\n")
    finally:
        engine.shutdown()


def child(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec["kv_cache_gib"])
    slots = FrontEndSlots.create(Path(spec["slots"]), slots=len(spec["prompts"]))
    os.environ[ENV_VAR] = str(slots.path)  # the engine core inherits it
    try:
        asyncio.run(serve_settings(spec, slots, Path(spec["results"])))
    finally:
        slots.close()


# ---------------------------------------------------------------- parent: plan, run, report


def make_prompts(tokenizer_dir: Path, data: Path, count: int, length: int) -> list[list[int]]:
    """`count` consecutive, distinct `length`-token windows of `data`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = data.read_text(encoding="utf-8", errors="replace")[: 20 * count * length]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < count * length:
        raise ValueError(f"{data} holds fewer than {count * length} tokens")
    return [ids[i * length : (i + 1) * length] for i in range(count)]


def model_folders(args: argparse.Namespace, tmp: Path) -> dict[str, Path]:
    """The folder of each variant: given in `--models`, else converted from dense into `tmp`."""
    from subjective.model_registry.convert import convert, convert_hybrid
    from subjective.model_registry.hybrid_rank import keep_count, select_layers

    folders = {"dense": args.dense, **args.models}
    for variant in args.variants:
        if variant == "hybrid" and variant not in folders:
            layers = ModelConfig.from_folder(folders["dense"]).num_hidden_layers
            softmax = select_layers("uniform", keep_count(HYBRID_SOFTMAX_RATIO, layers), layers)
            folders[variant] = convert_hybrid(folders["dense"], tmp / variant, softmax)
        elif variant not in folders:
            folders[variant] = convert(folders["dense"], tmp / variant, variant)
    return {variant: Path(folders[variant]) for variant in args.variants}


def model_sources(args: argparse.Namespace) -> dict[str, str]:
    given = {"dense": args.dense, **args.models}
    converted = {
        v: f"converted from {shown(args.dense)} (fresh routing adapter)" for v in ("sdt", "stt")
    }
    converted["hybrid"] = (
        f"hybridized from {shown(args.dense)} without training, "
        f"softmax ratio {HYBRID_SOFTMAX_RATIO} (uniform interleave)"
    )
    return {v: shown(given[v]) if v in given else converted[v] for v in args.variants}


def shown(path: Path) -> str:
    """`path` relative to the repository when it lies inside it."""
    path = Path(os.path.abspath(path))
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def plan(args: argparse.Namespace, folders: dict[str, Path]) -> list[Engine]:
    return [
        Engine(
            variant,
            dtype,
            mode,
            folders[variant],
            (variant,) if variant in ("dense", "hybrid") else tuple(args.settings),
        )
        for dtype in args.dtypes
        for mode in args.modes
        for variant in args.variants
    ]


def not_runnable(engine: Engine) -> str | None:
    """Why this configuration cannot run (compiled, or a dtype, where the plugin forces another),
    or None."""
    forced = engine_kwargs(engine.folder)
    if engine.mode == "compiled" and forced.get("enforce_eager"):
        return f"engine_kwargs forces enforce_eager for {engine.variant} models"
    if forced.get("dtype", engine.dtype) != engine.dtype:
        return f"engine_kwargs forces {forced['dtype']} for {engine.variant} models on this device"
    return None


def run_engine(
    engine: Engine, args: argparse.Namespace, prompts: list[list[int]], tmp: Path
) -> list[dict[str, Any]]:
    """Rows of one configuration, from its child process; what it did not finish gets `error`."""
    name = f"{engine.variant}-{engine.dtype}-{engine.mode}"
    results = tmp / f"{name}.jsonl"
    spec = {
        "model": str(engine.folder),
        "dtype": engine.dtype,
        "mode": engine.mode,
        "settings": {s: SETTINGS.get(s, {}) for s in engine.settings},
        "prompts": prompts,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "kv_cache_gib": args.kv_cache_gib,
        "kv_capacity": args.kv_capacity,
        "results": str(results),
        "slots": str(default_path()),  # removed here even when the child dies
    }
    spec_path = tmp / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    try:
        failure = run_child(spec_path, args.timeout)
    finally:
        Path(spec["slots"]).unlink(missing_ok=True)
    done = {}
    if results.exists():
        done = {r.pop("setting"): r for r in map(json.loads, results.read_text().splitlines())}
    return [
        engine.row(s, **done[s])
        if s in done
        else engine.unmeasured(s, error=failure or "no result")
        for s in engine.settings
    ]


def run_child(spec_path: Path, timeout: float) -> str | None:
    """Run the child on `spec_path`; None if it exited cleanly, else what went wrong."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    child_process = subprocess.Popen(
        [sys.executable, __file__, "--child", str(spec_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its engine core too can be stopped as one group
    )
    try:
        log, _ = child_process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child_process.pid, signal.SIGKILL)
        child_process.communicate()
        return f"timed out after {timeout:.0f} s"
    if child_process.returncode == 0:
        return None
    return f"child exited with {describe(child_process.returncode)}: {cause(log)}"


def signal_name(match: re.Match[str]) -> str:
    """`exit code: -8` -> `exit code: -8, SIGFPE` (a process killed by a signal)."""
    try:
        return f"{match[0]}, {signal.Signals(int(match[1])).name}"
    except ValueError:
        return match[0]


def describe(returncode: int) -> str:
    if returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"status {returncode}"


def cause(log: str, lines: int = 3, chars: int = 1500) -> str:
    """The first distinct lines of `log` that name an error, else its last lines."""
    found: list[str] = []
    for line in log.splitlines():
        line = EXIT_SIGNAL.sub(signal_name, LOG_PREFIX.sub("", line.strip()))
        if CAUSE.search(line) and line not in found:
            found.append(line)
    found = found or [line for line in log.splitlines() if line.strip()][-lines:]
    return " | ".join(found[:lines])[:chars]


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """ratio_to_dense (vs dense in the same dtype, eager) and ratio_to_ideal, where measured."""
    dense = {
        r["dtype"]: r["tokens_per_s"]
        for r in rows
        if r["variant"] == "dense" and r["mode"] == "eager" and r["tokens_per_s"] is not None
    }
    for row in rows:
        row["ratio_to_dense"] = row["ratio_to_ideal"] = None
        if row["tokens_per_s"] is not None and row["dtype"] in dense:
            row["ratio_to_dense"] = round(row["tokens_per_s"] / dense[row["dtype"]], 4)
            row["ratio_to_ideal"] = round(row["ratio_to_dense"] / row["ideal_speedup"], 4)


def plot(result: dict[str, Any], path: Path) -> None:
    """tokens/s per configuration with dense (eager) lines per dtype; ratio to ideal below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['variant']} {r['setting']}\n{r['dtype']} {r['mode']}" for r in rows]
    x = range(len(rows))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.75 * len(rows)), 7), sharex=True)
    top.bar(x, [r["tokens_per_s"] or 0 for r in rows], color=[colour(r) for r in rows])
    for i, r in enumerate(rows):
        if r["tokens_per_s"] is None:
            top.text(
                i, 0, "error" if "error" in r else "skipped", ha="center", va="bottom", rotation=90
            )
    dense = [r for r in rows if r["setting"] == "dense" and r["mode"] == "eager"]
    for style, r in zip(("--", ":", "-."), dense, strict=False):
        if r["tokens_per_s"] is not None:
            top.axhline(r["tokens_per_s"], ls=style, color="black", label=f"dense {r['dtype']}")
    top.set_ylabel("output tokens/s")
    if top.get_legend_handles_labels()[0]:
        top.legend(fontsize=8)
    bottom.bar(x, [r["ratio_to_ideal"] or 0 for r in rows], color=[colour(r) for r in rows])
    bottom.axhline(1.0, color="black", lw=0.8)
    bottom.axhline(0.9, color="grey", ls=":", lw=0.8, label="90% of ideal")
    bottom.set_ylabel("ratio to ideal")
    bottom.legend(fontsize=8)
    bottom.set_xticks(list(x), labels, rotation=90, fontsize=7)
    top.set_title(f"end to end, {result['machine']['device']}: {workload_text(result)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def colour(row: dict[str, Any]) -> str:
    return {"dense": "C7", "sdt": "C0", "stt": "C1", "hybrid": "C2"}[row["variant"]]


def workload_text(result: dict[str, Any]) -> str:
    w = result["workload"]
    return f"{w['prompts']} prompts × {w['prompt_tokens']} + {w['new_tokens']} new tokens, greedy"


def parse_models(pairs: list[str]) -> dict[str, Path]:
    models = {}
    for pair in pairs:
        variant, sep, folder = pair.partition("=")
        if not sep or variant not in VARIANTS:
            raise argparse.ArgumentTypeError(f"--models wants VARIANT=PATH, VARIANT in {VARIANTS}")
        models[variant] = Path(folder)
    return models


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--modes", nargs="+", choices=("eager", "compiled"), default=None)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument(
        "--models", nargs="+", default=[], help="sdt=PATH stt=PATH hybrid=PATH (dense=PATH)"
    )
    parser.add_argument("--dense", type=Path, default=DENSE, help="dense model (and tokenizer)")
    parser.add_argument("--data", type=Path, default=DATA, help="text the prompts come from")
    parser.add_argument("--kv-capacity", type=float, help="gated KV pages' γ (default: model's)")
    parser.add_argument("--kv-cache-gib", type=float, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per engine")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test")
    parser.add_argument("--out", type=Path, help="JSON path (default results/e2e_<device>.json)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:  # smaller defaults; options given still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    args.modes = args.modes or ["eager", "compiled"]
    args.models = parse_models(args.models)
    args.dense = args.models.pop("dense", args.dense)
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        child(args.child)
        return
    machine = machine_info()
    device = "cpu" if machine["device"] == "cpu" else "gpu"
    out = args.out or REPO / "benchmarks" / "results" / f"e2e_{device}.json"
    prompts = make_prompts(args.dense, args.data, args.prompts, args.prompt_tokens)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="e2e-bench-") as tmp:
        folders = model_folders(args, Path(tmp))
        for engine in plan(args, folders):
            reason = not_runnable(engine)
            if reason:
                new = [engine.unmeasured(s, skipped=reason) for s in engine.settings]
            else:
                new = run_engine(engine, args, prompts, Path(tmp))
            for row in new:
                print(json.dumps(row), flush=True)
            rows += new
    add_ratios(rows)
    result = {
        "command": "python benchmarks/e2e.py " + " ".join(sys.argv[1:]),
        "machine": machine,
        "workload": {
            "prompts": args.prompts,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "sampling": "greedy, ignore_eos, all requests submitted at once, streamed",
            "data": shown(args.data),
        },
        "models": model_sources(args),
        "kv_capacity": args.kv_capacity,
        "ratio_to_dense_reference": "dense, same dtype, eager",
        "ideal": "1 / (1 - skipped token-layers / all token-layers of the model)",
        "layout": "as served: AsyncLLM front end, engine core, worker; one engine at a time",
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
