"""A dead engine is visible: kill vLLM's engine process under a real server and watch.

In-flight requests end with 503 `engine_dead` (in-band for a stream) and each leaves exactly
one usage record, status `error`; `/health`, `/readyz` and new requests answer 503 while the
server winds down; then the process exits with its engine-dead status, for a supervisor to
restart it. Each test starts its own server (it dies), on the real model with Redis.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from threading import Event

import httpx
import psutil
import pytest

from subjective.server.cli import ENGINE_DEAD_EXIT_CODE
from subjective.server.keys import open_key_store
from subjective.server.ledger import Spool, UsageQuery, open_ledger
from tests.conftest import SERVED_NAME
from tests.fault_report import assert_clean, reconcile
from tests.processes import server_process
from tests.redis_server import RedisServer

pytestmark = pytest.mark.vllm

# Far more tokens than run before the kill (the context is 1024); `ignore_eos` because a
# sampled end of text would finish a request before both are running (a CI run did).
COMPLETION = {
    "model": SERVED_NAME,
    "prompt": "Count: 1, 2, 3,",
    "max_tokens": 1000,
    "ignore_eos": True,
}
REQUEST_TIMEOUT_S = 120.0
RUNNING_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 60.0


def client(base_url: str, secret: str) -> httpx.Client:
    """A client that opens a connection per request: a kept-alive one can be closed by the
    server's idle timeout just as the next poll is sent, on a loaded machine."""
    headers = {"authorization": f"Bearer {secret}"}
    return httpx.Client(
        base_url=base_url,
        headers=headers,
        timeout=REQUEST_TIMEOUT_S,
        limits=httpx.Limits(max_keepalive_connections=0),
    )


def streamed_lines(base_url: str, secret: str, first_chunk: Event) -> list[str]:
    """The stream's non-empty SSE lines, to its end; `first_chunk` is set at the first."""
    lines: list[str] = []
    with (
        client(base_url, secret) as http,
        http.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True}) as stream,
    ):
        for line in stream.iter_lines():
            if line:
                lines.append(line)
                first_chunk.set()
    return lines


def plain_completion(base_url: str, secret: str) -> httpx.Response:
    with client(base_url, secret) as http:
        return http.post("/v1/completions", json=COMPLETION)


def requests_running(http: httpx.Client) -> float:
    """vLLM's own gauge of the requests in its running batch, from our /metrics."""
    running = [
        float(line.rsplit(" ", 1)[1])
        for line in http.get("/metrics").text.splitlines()
        if line.startswith("vllm:num_requests_running")
    ]
    return sum(running)


def wait_until_running(http: httpx.Client, count: int) -> None:
    deadline = time.monotonic() + RUNNING_TIMEOUT_S
    while requests_running(http) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"{count} requests not running after {RUNNING_TIMEOUT_S}s")
        time.sleep(0.1)


def descendant_titled(pid: int, title: str) -> psutil.Process:
    """The process under `pid` whose title (vLLM sets it: `VLLM::EngineCore`, ...) is `title`."""
    for process in psutil.Process(pid).children(recursive=True):
        with suppress(psutil.Error):  # a helper process may come and go meanwhile
            if " ".join(process.cmdline()).startswith(title):
                return process
    pytest.fail(f"no process titled {title} under the server")


def engine_dead_error(body: dict) -> dict:
    error = body["error"]
    assert error["code"] == "engine_dead", body
    assert error["type"] == "server_error", body
    return error


@pytest.mark.parametrize("victim", ["VLLM::EngineCore", "VLLM::Worker"])
def test_a_killed_engine_fails_requests_with_503_bills_them_and_the_server_exits(
    model_dir: Path, redis_server: RedisServer, tmp_path: Path, victim: str
) -> None:
    keys = open_key_store({"REDIS_URL": redis_server.url})
    try:
        created = keys.create("engine-death")
    finally:
        keys.close()
    env = {"REDIS_URL": redis_server.url, "SUBJECTIVE_SPOOL_DIR": str(tmp_path / "spool")}
    first_chunk = Event()
    with (
        server_process(model_dir, tmp_path, env) as (process, base_url),
        client(base_url, created.secret) as http,
        ThreadPoolExecutor(max_workers=2) as pool,
    ):
        plain = pool.submit(plain_completion, base_url, created.secret)
        stream = pool.submit(streamed_lines, base_url, created.secret, first_chunk)
        assert first_chunk.wait(REQUEST_TIMEOUT_S), "the stream never started"
        wait_until_running(http, 2)
        descendant_titled(process.pid, victim).send_signal(signal.SIGKILL)

        lines = stream.result(timeout=REQUEST_TIMEOUT_S)
        answered = plain.result(timeout=REQUEST_TIMEOUT_S)
        # The server winds down for a few seconds before it stops listening.
        probes = [http.get(path) for path in ("/health", "/readyz")]
        refused = http.post("/v1/completions", json=COMPLETION)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=EXIT_TIMEOUT_S)
        returncode = process.returncode  # None: still running

    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    engine_dead_error(events[-1])
    chunks = events[:-1]
    assert chunks, "no text streamed before the kill"
    assert all(chunk["choices"][0].get("finish_reason") is None for chunk in chunks)
    assert answered.status_code == 503
    engine_dead_error(answered.json())
    for response in (*probes, refused):
        assert response.status_code == 503, response.text
        engine_dead_error(response.json())
    assert returncode == ENGINE_DEAD_EXIT_CODE

    with open_ledger({"REDIS_URL": redis_server.url}) as ledger:
        records = ledger.usage(UsageQuery(api_key_id=created.key.id))
    assert Spool(tmp_path / "spool").depth() == 0  # Redis was up: stored, not spooled
    assert len(records) == 2  # one per in-flight request; the refused one records nothing
    # The stream's id is known; the plain request's answer (503) carries none.
    name = "engine_death" if victim == "VLLM::EngineCore" else "engine_worker_death"
    assert_clean(reconcile(name, 3, {chunks[0]["id"]}, records, accepted_unnamed=1))
    assert {record.status.value for record in records} == {"error"}
    [streamed] = [record for record in records if record.request_id == chunks[0]["id"]]
    assert streamed.completion_tokens >= len(chunks)  # counted, even if not all delivered
    assert all(record.flops > 0 and record.prompt_tokens > 0 for record in records)
