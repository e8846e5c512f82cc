"""Helpers for the real servers tests start: free loopback ports, waiting until one answers."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest


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
