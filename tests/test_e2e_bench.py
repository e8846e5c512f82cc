"""benchmarks/e2e.py stays runnable: its smoke run (dense, SDT; fp32, eager) writes the schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MEASURES = ("tokens_per_s", "ttft_p50_ms", "ttft_p95_ms", "tpot_p50_ms", "tpot_p95_ms")


@pytest.mark.vllm
def test_e2e_benchmark_smoke(tmp_path: Path, model_dir: Path, data_dir: Path) -> None:
    out = tmp_path / "e2e.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/e2e.py", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert out.with_suffix(".png").stat().st_size > 0
    result = json.loads(out.read_text())
    assert "--smoke" in result["command"]
    assert {"cpus", "torch", "vllm", "device"} <= result["machine"].keys()
    rows = {(r["variant"], r["setting"]): r for r in result["rows"]}
    assert set(rows) == {("dense", "dense"), ("sdt", "all-kept"), ("sdt", "all-skipped")}
    for row in rows.values():
        assert "error" not in row and "skipped" not in row, row
        assert (row["dtype"], row["mode"]) == ("float32", "eager")
        assert row["tokens_per_s"] > 0 and all(row[m] >= 0 for m in MEASURES), row
        assert row["ratio_to_dense"] == pytest.approx(
            row["tokens_per_s"] / rows["dense", "dense"]["tokens_per_s"], rel=1e-3
        )
        ideal = 1 / (1 - row["skipped_fraction_all_layers"])
        assert row["ratio_to_ideal"] == pytest.approx(row["ratio_to_dense"] / ideal, rel=1e-3)
    assert rows["dense", "dense"]["ratio_to_dense"] == 1.0
    assert rows["dense", "dense"]["skipped_fraction"] == 0.0
    assert rows["sdt", "all-kept"]["skipped_fraction"] == 0.0
    # Only the sink positions run: 4 of the 19 positions each request feeds.
    assert rows["sdt", "all-skipped"]["skipped_fraction"] > 0.5
    assert rows["sdt", "all-skipped"]["skipped_fraction_all_layers"] > 0
