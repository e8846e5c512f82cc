"""benchmarks/gpu_suite.py is known to work before a GPU lease is spent on it: its dry run (every
step at tiny size on the CPU, Triton interpreted) writes every results file, and gpu_pack's
split/join round-trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_pack import join, sha256_file, split

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run(tmp_path: Path, model_dir: Path, data_dir: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_suite.py", "--dry-run", "--out", str(out),
         "--work", str(tmp_path / "work"), "--data", str(data_dir)],
        cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    kernels = json.loads((out / "kernels_cpu-dry-run.json").read_text())
    assert "--dry-run" in kernels["command"] and kernels["gpu"] == "cpu-dry-run"
    assert {(c["kernel"], c["dtype"]) for c in kernels["correctness"]} == {
        (k, d) for k in ("prefill", "decode", "router") for d in ("bfloat16", "float16")
    }
    assert all(c["passed"] for c in kernels["correctness"])
    for row in kernels["rows"]:
        assert {"kind", "capacity", "size", "dense_ms", "gated_ms", "ratio_to_ideal"} <= row.keys()
    layers = json.loads((out / "gpu_layers_cpu-dry-run.json").read_text())
    assert [c["kind"] for c in layers["runner_checks"]] == ["dense", "sdt", "stt"]
    assert all(c["passed"] for c in layers["runner_checks"])
    assert {(r["variant"], r["setting"]) for r in layers["rows"]} >= {
        ("dense-paged", "paged kernel"),
        ("sdt", "capacity=0.25"),
        ("stt", "capacity=0.125"),
    }
    for row in layers["rows"]:
        assert row["tokens_per_s"] > 0 and row["ratio_to_dense"] > 0
        assert {"shape", "context", "variant", "setting"} <= row.keys()
    quality = json.loads((out / "quality_cpu-dry-run.json").read_text())
    assert [m["name"] for m in quality["models"]] == ["tiny-sdt", "tiny-stt"]
    for model in quality["models"]:
        assert (
            model["stage_b"]["steps_done"] == 3 and "--freeze-base" in model["stage_b"]["command"]
        )
        assert {r["setting"] for r in model["rows"]} == {"shipped", "stage A + B at GPU scale"}
        shipped = out / "adapters" / model["name"]
        assert (shipped / "routing_adapter.safetensors").is_file()
        assert "base_model" not in json.loads((shipped / "config.json").read_text())


def test_pack_split_join_round_trip(tmp_path: Path) -> None:
    source = tmp_path / "weights.bin"
    source.write_bytes(os.urandom(5000))
    split(source, tmp_path / "a", tmp_path / "b", part_bytes=3000)
    assert (tmp_path / "a").stat().st_size == 3000
    joined = join([tmp_path / "a", tmp_path / "b"], tmp_path / "joined", sha256_file(source))
    assert joined.read_bytes() == source.read_bytes()
    with pytest.raises(ValueError):
        join([tmp_path / "b", tmp_path / "a"], tmp_path / "bad", sha256_file(source))
    with pytest.raises(ValueError):
        split(source, tmp_path / "c", tmp_path / "d", part_bytes=2000)
