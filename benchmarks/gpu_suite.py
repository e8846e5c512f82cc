"""GPU suite: in one lease, check and time the kernels and the gated layers, and train the shipped
adapters at GPU scale (issue 17). Each step writes its JSON under `--out` as soon as it ends.

Steps (`--steps`, in this order):

a. `kernels`: Triton prefill/decode/router against float64 references (the test suite's own,
   `tests/test_kernels.py`: random inputs, ragged batches, NaN-poisoned outputs and scratch) in
   bf16 and fp16, then `benchmarks/kernels.py`'s timings (dense SDPA vs gated at capacity 1,
   0.5, 0.25, 0.125; prefill 2k/8k, decode 4k/32k; TB/s, TFLOP/s, ratio to c × dense)
   → `kernels_<gpu>.json`.
b. `layers`: the thin runner (`benchmarks/gpu_layers.py`), first held to the reference model's
   decode on a tiny model, then one decode step of 64 sequences at 4k and 16k context, SmolLM2
   and ~1B Llama shapes, random weights, dense (SDPA, paged kernel) vs SDT/STT at each capacity
   → `gpu_layers_<gpu>.json`.
c. `quality`: stage A + stage B on the shipped adapters (`benchmarks/gpu_quality.py`), frontier
   rows before and after → `quality_<gpu>.json`, trained adapters in `adapters/<name>/`.

`--dry-run` runs every step at tiny size on the CPU (Triton interpreter, a tiny random model
with SmolLM2's tokenizer for c) in about a minute; `tests/test_gpu_suite.py` runs it.

On a lent GPU (the device tool; about 9 minutes of the 15). Here, once::

    PYTHONPATH=. .venv/bin/python benchmarks/gpu_pack.py \\
        --adapter adapters/SmolLM2-SDT --adapter adapters/SmolLM2-STT

Call 1 (`run`, carry `[".gpu_part1"]`, timeout_s 120)::

    mkdir -p /tmp/gpu_parts && cp .gpu_part1/gguf.part1 /tmp/gpu_parts/ && ls -l /tmp/gpu_parts

Call 2, at once (the machine stays warm 30 s; carry `[".gpu_carry"]`, timeout_s 600)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_carry/wheels/*.whl
    && export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 && set -o pipefail
    && python3 benchmarks/gpu_suite.py --out $OUT --packed .gpu_carry --parts /tmp/gpu_parts
       --time-budget-s 90 2>&1 | tee $OUT/log

(one line, joined by spaces). Without call 1, `--steps kernels,layers` runs a and b alone in
one call with no carry. Then commit `$OUT`'s `kernels_*.json` and `gpu_layers_*.json` to
`benchmarks/results/`, and the adapters to `adapters/` if their rows beat the shipped ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

STEPS = ("kernels", "layers", "quality")
TOLERANCE = {"bfloat16": 1e-2, "float16": 2e-3}  # relative error, METHOD.md's bands


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="results folder")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated, of " + str(STEPS))
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu_suite_work"))
    p.add_argument("--dense", type=Path, help="dense folder for step c")
    p.add_argument("--packed", type=Path, help="gpu_pack.py's carry folder: rebuild the dense")
    p.add_argument("--parts", type=Path, default=Path("/tmp/gpu_parts"), help="call 1's copy")
    p.add_argument("--adapter", type=Path, action="append", default=[], help="shipped adapter")
    p.add_argument("--data", type=Path, default=REPO / "data")
    p.add_argument("--time-budget-s", type=float, default=90.0, help="stage B, per adapter")
    p.add_argument("--tokens-per-s", type=float, default=60_000.0, help="stage B estimate")
    p.add_argument("--layer-shapes", nargs="+", default=["smollm2-135m", "llama-1b"])
    p.add_argument("--layer-contexts", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--layer-batch", type=int, default=64)
    return p.parse_args(argv)


class Suite:
    """Where results go and what every result file records."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        import torch

        self.args = args
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        self.gpu = "cpu-dry-run" if args.dry_run else torch.cuda.get_device_name(self.device)
        self.command = shlex.join(["python", "benchmarks/gpu_suite.py", *argv])
        self.backend = "triton"  # interpreted in a dry run
        args.out.mkdir(parents=True, exist_ok=True)

    def write(self, prefix: str, payload: dict) -> None:
        from benchmarks.kernels import gpu_slug

        path = self.args.out / f"{prefix}_{gpu_slug(self.gpu)}.json"
        path.write_text(json.dumps({"gpu": self.gpu, "command": self.command} | payload,
                                   indent=2) + "\n")  # fmt: skip


# ----------------------------------------------------------------------------- a. kernels


@contextmanager
def poisoned_scratch():
    """The kernels' scratch buffers start as NaN (floats) or a sentinel (ints)."""
    import torch

    import subjective.kernels._decode_triton as decode_mod
    import subjective.kernels._router_triton as router_mod

    def poisoned(shape: tuple[int, ...], dtype, device):
        fill = math.nan if dtype.is_floating_point else -77
        return torch.full(shape, fill, dtype=dtype, device=device)

    saved = decode_mod._empty, router_mod._empty
    decode_mod._empty = router_mod._empty = poisoned
    try:
        yield
    finally:
        decode_mod._empty, router_mod._empty = saved


def relative_error(out, expected) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN (an unwritten element) gives inf."""
    out = out.double().cpu()
    if out.isnan().any():
        return math.inf
    return float((out - expected).norm() / expected.norm().clamp_min(1e-30))


def check_prefill(suite: Suite, dtype, gen, sizes: dict) -> dict:
    import torch

    from subjective.kernels import gated_prefill_attention
    from tests.test_kernels import make_batch

    batch = make_batch(gen, sizes["cached"], sizes["new"], sizes["keep"], sizes["heads"],
                       sizes["head_dim"], dtype)  # fmt: skip
    on = [t.to(suite.device) for t in (batch.q, batch.k, batch.v, batch.cu_q, batch.cu_k)]
    out = torch.full_like(on[0], math.nan)
    gated_prefill_attention(*on, out=out, backend=suite.backend)
    return {"kernel": "prefill", "error": relative_error(out, batch.expected)}


def check_decode(suite: Suite, dtype, gen, sizes: dict) -> dict:
    import torch

    from subjective.kernels import gated_decode_attention
    from tests.test_kernels import build_paged_cache, cu, reference_attention

    lens, (hq, hkv), d = sizes["kept"], sizes["heads"], sizes["head_dim"]
    k_cache, v_cache, table, kept, k, v = build_paged_cache(gen, lens, 16, hkv, d, dtype)
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype)
    offsets = cu(lens)
    expected = torch.stack([
        reference_attention(q[b : b + 1], k[offsets[b] : offsets[b + 1]],
                            v[offsets[b] : offsets[b + 1]], torch.tensor([n]), torch.arange(n),
                            d**-0.5)[0]
        for b, n in enumerate(lens)
    ])  # fmt: skip
    on = [t.to(suite.device) for t in (q, k_cache, v_cache, table, kept)]
    out = torch.full_like(on[0], math.nan)
    gated_decode_attention(*on, out=out, backend=suite.backend)
    return {"kernel": "decode", "error": relative_error(out, expected)}


def check_router(suite: Suite, gen, segments: list[int]) -> dict:
    import torch

    from subjective.kernels import route_tokens_static
    from tests.test_kernels import cu, reference_routing

    cu_seqlens = cu(segments)
    logits = torch.randn(sum(segments), generator=gen).to(torch.bfloat16)
    capacity = max(1, min(segments) // 3)
    static = route_tokens_static(cu_seqlens.to(suite.device), 0.0, logits=logits.to(suite.device),
                                 capacity=capacity, backend=suite.backend)  # fmt: skip
    expected = reference_routing(logits.float(), cu_seqlens, 0.0, capacity)
    return {"kernel": "router", "error": 0.0 if torch.equal(static.mask.cpu(), expected) else 1.0}


def kernel_sizes(dry_run: bool) -> dict:
    if dry_run:
        attention = {"heads": (6, 2), "head_dim": 24}
        return {
            "prefill": attention
            | {"cached": [0, 9, 0], "new": [23, 17, 1], "keep": [0.5, 0.3, 1.0]},
            "decode": attention | {"kept": [0, 1, 37, 70]},
            "router": [13, 1, 40],
        }
    attention = {"heads": (32, 8), "head_dim": 128}
    return {"prefill": attention | {"cached": [0, 700, 0, 1500], "new": [2048, 300, 1, 900],
                                    "keep": [0.5, 0.25, 1.0, 0.125]},
            "decode": attention | {"kept": [0, 1, 37, 4000, 16384, 777]},
            "router": [4096, 1, 700, 64]}  # fmt: skip


def kernel_correctness(suite: Suite) -> list[dict]:
    import torch

    sizes = kernel_sizes(suite.args.dry_run)
    rows = []
    with poisoned_scratch():
        for name in TOLERANCE:
            dtype = getattr(torch, name)
            gen = torch.Generator().manual_seed(len(rows))
            for row in (check_prefill(suite, dtype, gen, sizes["prefill"]),
                        check_decode(suite, dtype, gen, sizes["decode"]),
                        check_router(suite, gen, sizes["router"])):  # fmt: skip
                rows.append(row | {"dtype": name, "passed": row["error"] < TOLERANCE[name]})
    return rows


def step_kernels(suite: Suite) -> bool:
    from benchmarks import kernels

    correctness = kernel_correctness(suite)
    suite.write("kernels", {"correctness": correctness, "rows": []})
    scratch = suite.args.work / "kernels_timings.json"
    smoke = ["--smoke"] if suite.args.dry_run else []
    timings = kernels.main([*smoke, "--out", str(scratch)])
    suite.write(
        "kernels",
        {
            "correctness": correctness,
            "rows": timings["rows"],
            "config": timings["config"],
            "machine": timings["machine"],
        },
    )
    return all(r["passed"] for r in correctness)


# ----------------------------------------------------------------------------- b. layers


def step_layers(suite: Suite) -> bool:
    import torch

    from benchmarks.gpu_layers import LayerBench, bench_layers, check_runner
    from benchmarks.kernels import timer

    checks = [check_runner(kind, suite.device, suite.backend) for kind in ("dense", "sdt", "stt")]
    suite.write("gpu_layers", {"runner_checks": checks, "rows": []})
    args = suite.args
    bench = LayerBench(
        shapes=["tiny"] if args.dry_run else args.layer_shapes,
        contexts=[24] if args.dry_run else args.layer_contexts,
        batch=4 if args.dry_run else args.layer_batch,
        capacities=[1.0, 0.5, 0.25, 0.125],
        block_size=4 if args.dry_run else 16,
        dtype=torch.float32 if args.dry_run else torch.bfloat16,
        device=suite.device,
        backend="torch" if args.dry_run else "triton",  # the checks ran the interpreter already
    )
    rows = bench_layers(bench, timer(suite.device))
    suite.write(
        "gpu_layers",
        {
            "runner_checks": checks,
            "rows": rows,
            "dtype": str(bench.dtype),
            "note": "one decode step: embedding, every layer, LM head",
        },
    )
    return all(c["passed"] for c in checks) and all("error" not in r for r in rows)


# ----------------------------------------------------------------------------- c. quality


def tiny_gated_models(suite: Suite) -> tuple[Path, list[Path], Path]:
    """Dry run: a tiny random dense model with SmolLM2's tokenizer, its SDT and STT conversions
    (standing in for shipped adapters) and a slice of the text."""
    from subjective.model_registry.convert import TOKENIZER_FILES, build_model, convert, save_model
    from subjective.model_registry.tiny import tiny_config

    work = suite.args.work
    dense = work / "tiny-dense"
    config = replace(tiny_config("dense"), vocab_size=49152)
    tokenizer = REPO / "models" / "SmolLM2-135M-Instruct"
    save_model(build_model(config), dense, base_folder=None, tokenizer_from=tokenizer)
    assert all((dense / n).is_file() for n in TOKENIZER_FILES[:2]), "tokenizer files missing"
    adapters = [convert(dense, work / "shipped" / f"tiny-{kind}", kind) for kind in ("sdt", "stt")]
    data = work / "text"
    data.mkdir(exist_ok=True)
    for name, size in (("train.txt", 200_000), ("validation.txt", 50_000)):
        with (suite.args.data / name).open(encoding="utf-8", errors="replace") as handle:
            (data / name).write_text(handle.read(size), encoding="utf-8")
    return dense, adapters, data


def quality_inputs(suite: Suite) -> tuple[Path, list[Path], Path]:
    args = suite.args
    if args.dry_run:
        return tiny_gated_models(suite)
    if args.packed is not None:
        from benchmarks.gpu_pack import rebuild_dense

        dense = rebuild_dense(args.packed, args.parts, args.work / "SmolLM2-135M-Instruct")
        adapters = args.adapter or sorted((args.packed / "adapters").glob("*"))
        return dense, adapters, args.packed / "data"
    if args.dense is None:
        raise SystemExit("step quality needs --dense or --packed")
    return args.dense, args.adapter, args.data


def step_quality(suite: Suite) -> bool:
    from benchmarks.gpu_quality import QualityRun, run_quality

    dense, adapters, data = quality_inputs(suite)
    args = suite.args
    run = QualityRun(dense=dense, adapters=adapters, data=data / "train.txt",
                     validation=data / "validation.txt", work=args.work,
                     ship=args.out / "adapters", device=suite.device,
                     bf16=suite.device.type == "cuda", time_budget_s=args.time_budget_s,
                     tokens_per_s=args.tokens_per_s)  # fmt: skip
    if args.dry_run:
        run = replace(
            run,
            calibration_blocks=2,
            block_size=64,
            stage_a_steps=5,
            batch_size=2,
            train_block=64,
            tokens_per_s=3 * 128 / args.time_budget_s,
            eval_blocks=2,
        )
    run.work.mkdir(parents=True, exist_ok=True)
    run_quality(run, lambda result: suite.write("quality", result | {"run": {
        k: str(v) for k, v in vars(run).items()}}))  # fmt: skip
    return True


def run_steps(suite: Suite, steps: list[str]) -> bool:
    """Each step in turn; a failing one is recorded in its own file and the next one runs."""
    table: dict[str, tuple[str, Callable[[Suite], bool]]] = {
        "kernels": ("kernels", step_kernels),
        "layers": ("gpu_layers", step_layers),
        "quality": ("quality", step_quality),
    }
    ok = True
    for name in steps:
        prefix, step = table[name]
        print(f"== step {name}", flush=True)
        try:
            passed = step(suite)
        except Exception:  # noqa: BLE001 - a cut or failed step must not lose the later ones
            suite.write(f"{prefix}_error", {"error": traceback.format_exc()})
            traceback.print_exc()
            passed = False
        print(f"== step {name}: {'passed' if passed else 'FAILED'}", flush=True)
        ok = ok and passed
    return ok


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.dry_run:  # before anything imports triton
        os.environ["TRITON_INTERPRET"] = "1"
    steps = args.steps.split(",")
    if unknown := set(steps) - set(STEPS):
        raise SystemExit(f"unknown steps {sorted(unknown)}; known: {STEPS}")
    args.work.mkdir(parents=True, exist_ok=True)
    return 0 if run_steps(Suite(args, argv), steps) else 1


if __name__ == "__main__":
    sys.exit(main())
