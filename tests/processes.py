"""Helpers for the real servers tests start: free loopback ports, waiting until one answers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest

from subjective.server.keys import KeyStore, SQLiteKeyStorage

REPO = Path(__file__).resolve().parents[1]


def debian_executable(name: str, package: str) -> str:
    """The path of a program a Debian package installs (`make` installs them); fail if absent."""
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not Path(path).exists():
        pytest.fail(f"{name} is not installed (Debian package {package})")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ok(
    url: str, process: subprocess.Popen, log_path: Path, timeout_s: float, poll_s: float = 0.2
) -> None:
    """Return once GET `url` answers 200; fail with the log's tail if the process dies first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{url}: process exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    pytest.fail(f"{url}: no answer after {timeout_s}s:\n{_tail(log_path)}")


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""


@contextmanager
def serving(
    model_dir: Path,
    state: Path,
    env: dict[str, str],
    *options: str,
    timeout_s: float = 300,
) -> Iterator[str]:
    """`subjective serve` on `model_dir` (eager vLLM) as users run it; yields its base URL.

    Its log goes to `state/server.log`; `env` is added to ours, without the Triton interpreter
    (the server takes vLLM's own CPU paths)."""
    with server_process(model_dir, state, env, *options, timeout_s=timeout_s) as (_, base_url):
        yield base_url


@contextmanager
def sqlite_serving(model_dir: Path, state: Path, *options: str) -> Iterator[tuple[str, str, str]]:
    """`serving` with its keys and ledger in SQLite under `state` (no Redis); yields
    (base URL, a user's secret, an admin's secret)."""
    keys = KeyStore(SQLiteKeyStorage(state / "keys.sqlite3"))
    user, admin = keys.create("user").secret, keys.create("admin", admin=True).secret
    keys.close()
    env = {
        "REDIS_URL": "",
        "SUBJECTIVE_KEYS_PATH": str(state / "keys.sqlite3"),
        "SUBJECTIVE_LEDGER_PATH": str(state / "ledger.sqlite3"),
        "SUBJECTIVE_SPOOL_DIR": str(state / "spool"),
    }
    with serving(model_dir, state, env, *options) as base_url:
        yield base_url, user, admin


@contextmanager
def server_process(
    model_dir: Path,
    state: Path,
    env: dict[str, str],
    *options: str,
    timeout_s: float = 300,
) -> Iterator[tuple[subprocess.Popen, str]]:
    """As `serving`, yielding the server's process too (a test may watch it exit)."""
    port = free_port()
    log_path = state / "server.log"
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment.update(PYTHONUNBUFFERED="1", **env)
    command = [
        sys.executable, "-m", "subjective.cli", "serve", "--model", str(model_dir),
        "--port", str(port), "--eager", "--kv-cache-gib", "1", "--max-model-len", "1024",
        *options,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=environment,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(f"{base_url}/health", process, log_path, timeout_s, poll_s=1)
        yield process, base_url
    except BaseException:
        # pytest shows a failed test's output: the server's side of the story.
        print(f"--- {log_path} (tail) ---\n{_tail(log_path)}")
        raise
    finally:
        _stop_group(process)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (vLLM's processes too), SIGKILL after 60 s; a
    group already gone is fine."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
