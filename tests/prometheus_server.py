"""A real `prometheus` for tests: a free loopback port, a temp config and data dir, one target.

`start_prometheus(target_url)` (a fixture: import it into the test module, or list this module
in `pytest_plugins`) starts one scraping `target_url` (e.g. a server's `http://host:port/metrics`)
every second, and stops it after the test.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.processes import debian_executable, free_port, wait_until_ok

START_TIMEOUT_S = 30.0
JOB = "subjective"


class PrometheusServer:
    def __init__(
        self,
        directory: Path,
        target_url: str,
        scrape_interval_s: float = 1.0,
        bearer: str | None = None,
    ) -> None:
        self.executable = debian_executable("prometheus", "prometheus")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.target_url = target_url
        self.bearer = bearer  # an API key, for a server whose /metrics wants one
        self.scrape_interval_s = scrape_interval_s
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        target = urlsplit(self.target_url)
        interval = f"{int(self.scrape_interval_s * 1000)}ms"
        config = {  # JSON is YAML
            "global": {"scrape_interval": interval, "scrape_timeout": interval},
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "scheme": target.scheme,
                    "metrics_path": target.path or "/metrics",
                    "static_configs": [{"targets": [target.netloc]}],
                }
            ],
        }
        if self.bearer is not None:
            credentials = self.directory / "scrape-key"
            credentials.write_text(self.bearer)
            scrape = config["scrape_configs"][0]
            scrape["authorization"] = {"credentials_file": str(credentials)}
        path = self.directory / "prometheus.yml"
        path.write_text(json.dumps(config))
        return path

    def start(self) -> PrometheusServer:
        command = [
            self.executable,
            f"--config.file={self._write_config()}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with (self.directory / "prometheus.log").open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_until_ok(
            f"{self.url}/-/ready", self.process, self.directory / "prometheus.log", START_TIMEOUT_S
        )
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=START_TIMEOUT_S)
        self.process = None

    def _api(self, path: str, **params: str) -> Any:
        """The data of an HTTP API answer; fails the test with Prometheus's error if it has one."""
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        if body.get("status") != "success":
            pytest.fail(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query at now: its result vector."""
        return self._api("query", query=expr)["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        """The values `label` takes in the series `match` selects (Grafana's label_values)."""
        return self._api(f"label/{label}/values", **{"match[]": match})

    def successful_scrapes(self) -> int:
        result = self.query(f'sum_over_time(up{{job="{JOB}"}}[1h])')
        return int(float(result[0]["value"][1])) if result else 0

    def wait_for_scrapes(self, n: int = 2) -> None:
        """Until `n` more scrapes succeeded: with n >= 2 one began after this call."""
        goal = self.successful_scrapes() + n
        deadline = time.monotonic() + START_TIMEOUT_S + n * self.scrape_interval_s
        while self.successful_scrapes() < goal:
            if time.monotonic() > deadline:
                targets = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()
                pytest.fail(f"{n} scrapes of {self.target_url} did not succeed: {targets}")
            time.sleep(self.scrape_interval_s / 4)


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    """Starts a Prometheus scraping the given URL each second (with `bearer`: sending that
    API key); all stop after the test."""
    started: list[PrometheusServer] = []

    def start(target_url: str, bearer: str | None = None) -> PrometheusServer:
        directory = tmp_path / f"prometheus-{len(started)}"
        server = PrometheusServer(directory, target_url, bearer=bearer)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.stop()
