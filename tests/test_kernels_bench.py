"""benchmarks/kernels.py stays runnable: its CPU smoke configuration writes the results schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_kernel_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "kernels_smoke.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "benchmarks/kernels.py", "--smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["gpu"] == "cpu-smoke" and "--smoke" in result["command"]
    assert {"torch", "python"} <= result["machine"].keys()
    rows = result["rows"]
    assert {(r["kind"], r["capacity"]) for r in rows} == {
        (kind, c) for kind in ("prefill", "decode") for c in (1.0, 0.5, 0.25, 0.125)
    }
    for r in rows:
        assert r["dense_ms"] > 0 and r["gated_ms"] > 0
        assert r["ratio_to_ideal"] == r["gated_ms"] / (r["capacity"] * r["dense_ms"])
        if r["capacity"] == 1.0:  # gated at full capacity computes exactly dense attention
            assert r["max_abs_err_vs_dense"] < 1e-4
