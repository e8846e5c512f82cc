"""Shared fixtures: the real converted model and one real server per test run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# Triton kernels run on this CPU only in its interpreter, and triton reads this when it is first
# imported (torch may import it early): set it before any test module loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import httpx  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "models" / "SmolLM2-135M-Instruct"
DATA_DIR = REPO / "data"
SERVED_NAME = "SmolLM2-135M-Instruct"
SERVER_START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (MODEL_DIR / "config.json").is_file():
        pytest.fail(f"{MODEL_DIR} is missing: `make test` converts it first")
    return MODEL_DIR


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "validation.txt").is_file():
        pytest.fail(f"{DATA_DIR} is missing: `make test` builds it first")
    return DATA_DIR


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`subjective serve` on the real model (eager vLLM), as users run it; yields its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    command = [
        sys.executable,
        "-m",
        "subjective.cli",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--eager",
        "--kv-cache-gib",
        "1",
        "--max-model-len",
        "1024",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=_server_environment(),
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(base_url, process, log_path)
        yield base_url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _server_environment() -> dict[str, str]:
    """The server runs as users run it: vLLM's own CPU paths, not the Triton interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "PYTHONUNBUFFERED": "1"}


def _wait_until_healthy(base_url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    tail = log_path.read_text()[-4000:]
    pytest.fail(f"server not healthy after {SERVER_START_TIMEOUT_S}s:\n{tail}")


@pytest.fixture(scope="session")
def openai_client(server: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
