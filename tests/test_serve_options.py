"""`subjective serve` options for deployments: tensor parallelism and the admin key file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from subjective.server.cli import register
from subjective.server.config import ServerConfig
from subjective.server.engine import engine_args


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="subjective")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


@pytest.mark.parametrize(("size", "executor"), [(1, "uni"), (2, "mp"), (4, "mp")])
def test_tensor_parallel_size_reaches_vllm(model_dir: Path, size: int, executor: str) -> None:
    args = serve_args("--model", str(model_dir), "--tensor-parallel-size", str(size))
    config = ServerConfig(
        model_dir=args.model, served_model_name="m", tensor_parallel_size=args.tensor_parallel_size
    )
    built = engine_args(config)
    assert built["tensor_parallel_size"] == size
    # One GPU runs its worker in the engine core's process; several need one process each.
    assert built["distributed_executor_backend"] == executor
    assert built["model"] == str(model_dir)


def test_admin_key_file_comes_from_the_flag_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SUBJECTIVE_ADMIN_KEY_FILE", raising=False)
    assert serve_args().admin_key_file is None
    assert serve_args("--admin-key-file", "/run/a").admin_key_file == Path("/run/a")
    monkeypatch.setenv("SUBJECTIVE_ADMIN_KEY_FILE", "/run/secrets/admin-key")
    assert serve_args().admin_key_file == Path("/run/secrets/admin-key")
