"""Dense attention (torch SDPA) vs the gated kernels at capacity c, prefill and decode.

On a CUDA host (torch + triton only; no vLLM needed)::

    python benchmarks/kernels.py            # writes benchmarks/results/kernels_<gpu>.json

``--smoke`` runs a tiny configuration on the CPU through the PyTorch path, to keep this file
working where there is no GPU (prints the JSON; writes it only with ``--out``).

Ratios: ``ratio_to_ideal = gated_ms / (capacity * dense_ms)`` as DESIGN.md §9 states the goal.
In prefill both queries and keys shrink by c, so attention FLOPs shrink by c²;
``ratio_to_c2_ideal`` reports that stricter ideal too.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from subjective.kernels import gated_decode_attention, gated_prefill_attention  # noqa: E402

CAPACITIES = (1.0, 0.5, 0.25, 0.125)
# Dense baseline: the fused SDPA kernels only, so a silent fall-back to the slow math path
# cannot flatter the gated numbers (set to MATH for the CPU smoke run).
DENSE_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU run through the torch path")
    p.add_argument("--prefill-sizes", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--decode-sizes", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--capacities", type=float, nargs="+", default=list(CAPACITIES))
    p.add_argument("--decode-batch", type=int, default=16)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16, help="paged KV block size (decode)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.prefill_sizes, args.decode_sizes = [64], [128]
        args.decode_batch, args.q_heads, args.kv_heads, args.head_dim = 2, 4, 2, 32
        args.dtype = "float32"
    return args


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of a call: CUDA events via triton's do_bench, else perf_counter."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu_time(fn: Callable[[], object]) -> float:
        fn()
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    return cpu_time


def selected_positions(n: int, capacity: float, gen: torch.Generator) -> torch.Tensor:
    """Random routing keeping round(c * n) of n positions (at least one), in order."""
    keep = max(1, round(capacity * n))
    return torch.randperm(n, generator=gen)[:keep].sort().values


def bench_prefill(
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    measure: Callable[[Callable[[], object]], float],
    gen: torch.Generator,
) -> list[dict]:
    rows = []
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    elt = torch.finfo(dtype).bits // 8
    for t in args.prefill_sizes:
        q = torch.randn(t, hq, d, generator=gen).to(device, dtype)
        k = torch.randn(t, hkv, d, generator=gen).to(device, dtype)
        v = torch.randn(t, hkv, d, generator=gen).to(device, dtype)
        qd, kd, vd = (x.transpose(0, 1)[None] for x in (q, k, v))

        def dense(qd=qd, kd=kd, vd=vd):
            with sdpa_kernel(DENSE_BACKENDS):
                return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)

        dense_ms = measure(dense)
        dense_out = dense()[0].transpose(0, 1)
        for c in args.capacities:
            idx = selected_positions(t, c, gen).to(device)
            n = idx.numel()
            qs, ks, vs = q[idx].contiguous(), k[idx].contiguous(), v[idx].contiguous()
            cu = torch.tensor([0, n], dtype=torch.int32, device=device)

            def gated(qs=qs, ks=ks, vs=vs, cu=cu, n=n):
                return gated_prefill_attention(qs, ks, vs, cu, cu, max_seqlen_q=n)

            gated_ms = measure(gated)
            err = (gated() - dense_out).abs().max().item() if c == 1.0 else None
            work = [prefill_work(m, hq, hkv, d, elt) for m in (t, n)]
            rows.append(
                row("prefill", c, t, dense_ms, gated_ms, work, err)
                | {"selected": n, "ratio_to_c2_ideal": gated_ms / (c * c * dense_ms)}
            )
            print(fmt(rows[-1]), flush=True)
    return rows


def bench_decode(
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    measure: Callable[[Callable[[], object]], float],
    gen: torch.Generator,
) -> list[dict]:
    rows = []
    b, hq, hkv, d = args.decode_batch, args.q_heads, args.kv_heads, args.head_dim
    bs = args.block_size
    elt = torch.finfo(dtype).bits // 8
    for length in args.decode_sizes:
        q = torch.randn(b, hq, d, generator=gen).to(device, dtype)
        k = torch.randn(b, hkv, length, d, generator=gen).to(device, dtype)
        v = torch.randn(b, hkv, length, d, generator=gen).to(device, dtype)

        def dense(q=q, k=k, v=v):
            with sdpa_kernel(DENSE_BACKENDS):
                out = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
            return out[:, :, 0]

        dense_ms = measure(dense)
        dense_out = dense()
        for c in args.capacities:
            kept = [selected_positions(length, c, gen) for _ in range(b)]
            n = kept[0].numel()
            blocks = math.ceil(n / bs)
            # Compacted paged cache, physical blocks shuffled as an allocator would leave them.
            table = torch.randperm(b * blocks, generator=gen).view(b, blocks).int().to(device)
            k_cache = torch.empty(b * blocks, bs, hkv, d, dtype=dtype, device=device)
            v_cache = torch.empty_like(k_cache)
            for i in range(b):
                j = torch.arange(n, device=device)
                slots = table[i, j // bs].long() * bs + j % bs
                idx = kept[i].to(device)
                k_cache.view(-1, hkv, d)[slots] = k[i, :, idx].transpose(0, 1)
                v_cache.view(-1, hkv, d)[slots] = v[i, :, idx].transpose(0, 1)
            lens = torch.full((b,), n, dtype=torch.int32, device=device)

            def gated(q=q, k_cache=k_cache, v_cache=v_cache, table=table, lens=lens, n=n):
                return gated_decode_attention(q, k_cache, v_cache, table, lens, max_kept_len=n)

            gated_ms = measure(gated)
            err = (gated() - dense_out).abs().max().item() if c == 1.0 else None
            work = [decode_work(b, m, hq, hkv, d, elt) for m in (length, n)]
            rows.append(row("decode", c, length, dense_ms, gated_ms, work, err))
            rows[-1]["batch"] = b
            print(fmt(rows[-1]), flush=True)
    return rows


def prefill_work(n: int, hq: int, hkv: int, d: int, elt: int) -> tuple[float, float]:
    """(FLOPs, bytes) of causal attention over n tokens: QK^T and PV on the causal half."""
    return 4 * hq * d * n * (n + 1) / 2, (2 * n * hq * d + 2 * n * hkv * d) * elt


def decode_work(b: int, n: int, hq: int, hkv: int, d: int, elt: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one decode step over n entries per sequence: K and V read once."""
    return 4 * b * hq * d * n, (2 * b * n * hkv * d + 2 * b * hq * d) * elt


def row(
    kind: str,
    c: float,
    size: int,
    dense_ms: float,
    gated_ms: float,
    work: list[tuple[float, float]],
    err: float | None,
) -> dict:
    (dense_flops, dense_bytes), (gated_flops, gated_bytes) = work
    return {
        "kind": kind,
        "capacity": c,
        "size": size,
        "dense_ms": dense_ms,
        "gated_ms": gated_ms,
        "ratio_to_ideal": gated_ms / (c * dense_ms),
        "dense_tflops": dense_flops / dense_ms / 1e9,
        "dense_tbps": dense_bytes / dense_ms / 1e9,
        "gated_tflops": gated_flops / gated_ms / 1e9,
        "gated_tbps": gated_bytes / gated_ms / 1e9,
        "max_abs_err_vs_dense": err,
    }


def fmt(r: dict) -> str:
    return (
        f"{r['kind']:7s} size={r['size']:6d} c={r['capacity']:.3f} dense={r['dense_ms']:.3f}ms "
        f"gated={r['gated_ms']:.3f}ms ratio_to_ideal={r['ratio_to_ideal']:.2f} "
        f"{r['gated_tflops']:.1f} TFLOP/s {r['gated_tbps']:.2f} TB/s"
    )


def machine_info(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "os": platform.platform(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "cuda": torch.version.cuda,
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
        }
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def gpu_slug(gpu: str) -> str:
    """`NVIDIA H200` -> `nvidia-h200`: the results files' suffix."""
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run on a GPU host, or pass --smoke")
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        DENSE_BACKENDS[:] = [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-smoke"
    measure = timer(device)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        rows = bench_prefill(args, device, dtype, measure, gen)
        rows += bench_decode(args, device, dtype, measure, gen)
    result = {
        "gpu": gpu,
        "command": " ".join(["python", "benchmarks/kernels.py", *(argv or sys.argv[1:])]),
        "rows": rows,
        "config": {
            "q_heads": args.q_heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "dtype": args.dtype,
            "decode_batch": args.decode_batch,
            "block_size": args.block_size,
            "dense": "torch SDPA (causal for prefill), backends "
            + ", ".join(b.name for b in DENSE_BACKENDS),
            "gated_backend": "triton" if device.type == "cuda" else "torch",
        },
        "machine": machine_info(device),
    }
    out = args.out
    if out is None and not args.smoke:
        out = REPO / "benchmarks" / "results" / f"kernels_{gpu_slug(gpu)}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    else:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
