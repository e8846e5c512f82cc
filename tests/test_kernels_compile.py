"""The Triton kernels compile for real GPUs (sm_90, sm_80) with the launch configs they use.

No GPU is needed: Triton lowers to PTX and runs its bundled ptxas. This catches what the
interpreter cannot (tensor-core dot shapes, loop-carried types, shared memory over the limit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
from subjective.kernels import _decode_triton as D, _prefill_triton as P, _router_triton as R

arch, smem_limit = int(sys.argv[1]), int(sys.argv[2])
target = GPUTarget("cuda", arch, 32)
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
report = []

def build(fn, pointers, scalars, config):
    consts = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    options = {k: v for k, v in config.items() if k in ("num_warps", "num_stages")}
    signature = {
        name: "constexpr" if name in consts else pointers.get(name, scalars.get(name, "i32"))
        for name in fn.arg_names
    }
    kernel = triton.compile(ASTSource(fn, signature, constexprs=consts), target=target,
                            options=options)
    report.append({"kernel": fn.__name__, "config": str(config),
                   "shared": kernel.metadata.shared, "fits": kernel.metadata.shared <= smem_limit})

for dtype, t in TYPES.items():
    for head_dim in (64, 128):
        group = 4
        build(P._prefill_kernel,
              {n: f"*{t}" for n in ("Q", "K", "V", "OUT")}
              | {n: "*i32" for n in ("CU_Q", "CU_K", "KV_LENS")},
              {"qk_scale": "fp32"},
              {"GROUP": group, "HEAD_DIM": head_dim} | P.prefill_config(head_dim, dtype, False))
        config = D.decode_config(head_dim, group, dtype, False)
        build(D._decode_split_kernel,
              {n: f"*{t}" for n in ("Q", "KC", "VC")} | {"BT": "*i32", "KEPT": "*i32"}
              | {n: "*fp32" for n in ("O_PART", "M_PART", "L_PART")},
              {"qk_scale": "fp32"},
              {"GROUP": group, "BLOCK_SIZE": 16, "HEAD_DIM": head_dim} | config)
        build(D._decode_merge_kernel,
              {"O_PART": "*fp32", "M_PART": "*fp32", "L_PART": "*fp32", "OUT": f"*{t}"}, {},
              {"HEAD_DIM": head_dim, "BLOCK_D": config["BLOCK_D"], "BLOCK_S": 64})
    for use_logits in (True, False):
        for has_cap in (True, False):
            build(R._router_kernel,
                  {n: f"*{t}" for n in ("LOGITS", "DST", "DCH", "MA")}
                  | {"CU": "*i32", "SCORES": "*fp32", "MASK": "*i8", "SLOTS": "*i32",
                     "COUNTS": "*i32"},
                  {n: "fp32" for n in ("threshold", "beta_ce", "beta_cu", "log_o_ce", "m_cu")},
                  {"USE_LOGITS": use_logits, "HAS_CAP": has_cap}
                  | R.router_config(False))
print(json.dumps(report))
"""

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("arch", "smem_limit"), [(90, 232_448), (80, 166_912)])
def test_kernels_compile_for_gpu(arch: int, smem_limit: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(arch), str(smem_limit)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == 3 * 2 * 3 + 3 * 4
    too_big = [r for r in report if not r["fits"]]
    assert not too_big, too_big
