"""A server killed mid-stream (SIGKILL, its whole process group) loses no usage: on restart
every request it had in flight gets exactly one record, status `interrupted`, billed for the
work done, and the dead server's shared-memory table is reclaimed."""

from __future__ import annotations

import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from subjective.model_registry.compute_slots import TABLE_PREFIX, table_folder
from subjective.server.journal import CHECKPOINT_S, Journal
from subjective.server.keys import open_key_store
from subjective.server.ledger import UsageQuery, open_ledger
from tests.conftest import SERVED_NAME
from tests.fault_report import assert_clean, reconcile
from tests.processes import server_process
from tests.redis_server import RedisServer
from tests.test_faults import check_views_agree

pytestmark = pytest.mark.vllm
STREAMS = 4
# Runs till the kill: `ignore_eos`, so a sampled end of text cannot finish it first.
COMPLETION = {
    "model": SERVED_NAME,
    "prompt": "Count: 1, 2, 3,",
    "max_tokens": 1000,
    "ignore_eos": True,
}


def stream_until_cut(base_url: str, secret: str, started: threading.Barrier) -> tuple[str, int]:
    """Read a stream until the server dies: its request id and the chunks received."""
    request_id, chunks = "", 0
    headers = {"authorization": f"Bearer {secret}"}
    try:
        with (
            httpx.Client(base_url=base_url, headers=headers, timeout=120) as http,
            http.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True}) as stream,
        ):
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    request_id = request_id or json.loads(line.removeprefix("data: "))["id"]
                    chunks += 1
                    if chunks == 3:
                        started.wait(timeout=120)
    except httpx.HTTPError:  # the server died under it
        pass
    return request_id, chunks


def tables_of(pid: int) -> list[Path]:
    return list(table_folder().glob(f"{TABLE_PREFIX}{pid}-*.i64"))


def test_a_killed_server_bills_its_streams_once_as_interrupted_on_restart(
    model_dir: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    keys = open_key_store({"REDIS_URL": redis_server.url})
    try:
        created = keys.create("crash")
    finally:
        keys.close()
    env = {"REDIS_URL": redis_server.url, "SUBJECTIVE_SPOOL_DIR": str(tmp_path / "spool")}
    started = threading.Barrier(STREAMS + 1)
    with (
        server_process(model_dir, tmp_path, env) as (process, base_url),
        ThreadPoolExecutor(STREAMS) as pool,
    ):
        streams = [
            pool.submit(stream_until_cut, base_url, created.secret, started) for _ in range(STREAMS)
        ]
        started.wait(timeout=180)  # every stream has text
        threading.Event().wait(3 * CHECKPOINT_S)  # their progress is checkpointed
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        cut = [stream.result(timeout=120) for stream in streams]
        left_behind = tables_of(process.pid)
    assert left_behind, "the killed server's compute table should still be in shared memory"
    with open_ledger({"REDIS_URL": redis_server.url}) as ledger:
        assert ledger.usage(UsageQuery(api_key_id=created.key.id)) == []  # nothing yet

    with server_process(model_dir, tmp_path, env) as (_, base_url):
        assert httpx.get(f"{base_url}/health").status_code == 200
        # No counters: the requests ran in the killed process; its next one only bills them.
        check_views_agree(base_url, created.secret, redis_server.url, created.key.id, None)
    with open_ledger({"REDIS_URL": redis_server.url}) as ledger:
        records = ledger.usage(UsageQuery(api_key_id=created.key.id))
    accepted = {request_id for request_id, _ in cut}
    assert_clean(reconcile("server_sigkill", STREAMS, accepted, records))
    by_id = {record.request_id: record for record in records}
    for request_id, chunks in cut:
        record = by_id[request_id]
        assert record.status.value == "interrupted"
        assert 1 <= record.completion_tokens < 1000, (record, chunks)
        assert record.flops > 0 and record.prompt_tokens > 0
    assert not Journal(tmp_path / "journal.sqlite3").orphans()  # nothing left to bill again
    assert not any(path.exists() for path in left_behind)
