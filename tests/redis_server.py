"""A real redis-server for tests, on a free loopback port with its data in a temp dir.

Append-only file on, fsynced at every write, so a server stopped (even killed) and started
again on the same directory comes back with everything it acknowledged. Use the
`redis_server` fixture (import it into the test module, or list this module in
`pytest_plugins`), or `RedisServer` directly to stop and restart one.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.processes import debian_executable, free_port

START_TIMEOUT_S = 10.0


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.executable = debian_executable("redis-server", "redis-server")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        command = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    log = self.directory / "redis.log"
                    pytest.fail(f"redis-server exited: {log.read_text() if log.exists() else ''}")
                try:
                    if client.ping():
                        return
                except redis.exceptions.RedisError:  # refused, or LOADING the AOF
                    time.sleep(0.02)
            pytest.fail(f"redis-server on port {self.port} not ready in {START_TIMEOUT_S}s")
        finally:
            client.close()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM: a clean shutdown; SIGKILL: a crash."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=START_TIMEOUT_S)
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def restart(self) -> RedisServer:
        """Start again on the same port and directory (the same data)."""
        return self.start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
