"""Fault scenarios with a verdict (see fault_report.py): a mixed batch of requests meets a
fault, then what the server accepted is reconciled with the ledger, `/v1/usage` and a
billing export. Redis killed or frozen (its socket times out), clients leaving, and the
spool's disk full while Redis is down. The server's own death is test_server_crash.py,
the engine's test_server_engine_death.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from subjective.server.keys import KeyStore, open_key_store
from subjective.server.ledger import open_ledger
from tests.conftest import SERVED_NAME
from tests.fault_report import assert_clean, exported_ids, key_records, reconcile
from tests.processes import server_process
from tests.redis_server import RedisServer
from tests.test_server_billing import client, usage_of

pytestmark = pytest.mark.vllm
COUNT = {"model": SERVED_NAME, "prompt": "Count: 1, 2, 3,", "max_tokens": 40}
SETTLE_TIMEOUT_S = 60.0


def stream_ids(base_url: str, secret: str, leave_after: int | None = None) -> str | None:
    """A streamed completion read to its end (or left after `leave_after` chunks): its id."""
    request_id = None
    headers = {"authorization": f"Bearer {secret}"}
    with (
        httpx.Client(base_url=base_url, headers=headers, timeout=120) as http,
        http.stream("POST", "/v1/completions", json={**COUNT, "stream": True}) as stream,
    ):
        chunks = 0
        for line in stream.iter_lines():
            if line.startswith("data: {"):
                request_id = request_id or json.loads(line.removeprefix("data: "))["id"]
                chunks += 1
                if chunks == leave_after:
                    break
    return request_id


def plain_id(base_url: str, secret: str) -> str:
    with client(base_url, secret) as http:
        response = http.post("/v1/completions", json=COUNT)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def settled(
    redis_url: str, api_key_id: str, expected: int, timeout_s: float = SETTLE_TIMEOUT_S
) -> list:
    """The key's records once `expected` are in (replays may lag), or whatever is there."""
    deadline = time.monotonic() + timeout_s
    with open_ledger({"REDIS_URL": redis_url}) as ledger:
        while True:
            records = key_records(ledger, api_key_id)
            if len(records) >= expected or time.monotonic() > deadline:
                time.sleep(1.0)  # a duplicate would show up by now
                return key_records(ledger, api_key_id)
            time.sleep(0.2)


def requests_counted(base_url: str, secret: str) -> Counter:
    """The server's `subjective_requests_total`, by status (all models and qualities)."""
    with client(base_url, secret) as http:
        text = http.get("/metrics").text
    counted: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "subjective_requests_total":
                counted[sample.labels["status"]] += int(sample.value)
    return counted


def check_views_agree(
    base_url: str, secret: str, redis_url: str, key_id: str, counted_before: Counter | None
) -> None:
    """`/v1/usage` and a billing export list exactly the ledger's records; with
    `counted_before` (the server's request counters before the scenario, which ran alone),
    the counters grew by the records' statuses."""
    with open_ledger({"REDIS_URL": redis_url}) as ledger:
        records = key_records(ledger, key_id)
        exported = sorted(exported_ids(ledger, key_id, cursor=f"faults-{key_id}"))
    with client(base_url, secret) as http:
        listed = sorted(row["request_id"] for row in usage_of(http, limit=1000)["data"])
    assert sorted(r.request_id for r in records) == listed == exported
    if counted_before is not None:
        grown = requests_counted(base_url, secret) - counted_before
        assert grown == Counter(r.status.value for r in records)


def mixed_batch(
    base_url: str, secret: str, during: Callable[[], None], streams: int = 4, plain: int = 2
) -> set[str]:
    """`streams` streams and `plain` plain completions at once; `during` runs once every
    stream has begun. The ids of all of them."""
    began = threading.Barrier(streams + 1)

    def stream() -> str | None:
        ids: list[str] = []
        headers = {"authorization": f"Bearer {secret}"}
        with (
            httpx.Client(base_url=base_url, headers=headers, timeout=120) as http,
            http.stream("POST", "/v1/completions", json={**COUNT, "stream": True}) as events,
        ):
            for line in events.iter_lines():
                if line.startswith("data: {") and not ids:
                    ids.append(json.loads(line.removeprefix("data: "))["id"])
                    began.wait(timeout=120)
        return ids[0] if ids else None

    with ThreadPoolExecutor(streams + plain) as pool:
        running = [pool.submit(stream) for _ in range(streams)]
        running += [pool.submit(plain_id, base_url, secret) for _ in range(plain)]
        began.wait(timeout=120)
        during()
        ids = {future.result(timeout=180) for future in running}
    assert None not in ids
    return ids


def test_redis_killed_and_restarted_mid_batch(
    server: str, key_store: KeyStore, server_redis: RedisServer
) -> None:
    created = key_store.create("fault-redis-kill")
    before = requests_counted(server, created.secret)

    def kill_and_restart() -> None:
        server_redis.stop(signal.SIGKILL)
        time.sleep(1.0)
        server_redis.restart()

    accepted = mixed_batch(server, created.secret, kill_and_restart)
    records = settled(server_redis.url, created.key.id, len(accepted))
    assert_clean(reconcile("redis_sigkill", len(accepted), accepted, records))
    check_views_agree(server, created.secret, server_redis.url, created.key.id, before)


def test_redis_frozen_mid_batch_so_ledger_writes_time_out(
    server: str, key_store: KeyStore, server_redis: RedisServer
) -> None:
    created = key_store.create("fault-redis-freeze")
    before = requests_counted(server, created.secret)
    assert server_redis.process is not None
    pid = server_redis.process.pid

    def freeze() -> None:
        os.kill(pid, signal.SIGSTOP)
        time.sleep(4.0)  # past the ledger's 2 s socket timeout: requests end meanwhile
        os.kill(pid, signal.SIGCONT)

    accepted = mixed_batch(server, created.secret, freeze)
    records = settled(server_redis.url, created.key.id, len(accepted))
    assert_clean(reconcile("ledger_timeout", len(accepted), accepted, records))
    check_views_agree(server, created.secret, server_redis.url, created.key.id, before)


def test_clients_leaving_streams_and_plain_requests(
    server: str, key_store: KeyStore, server_redis: RedisServer
) -> None:
    created = key_store.create("fault-disconnect")
    before = requests_counted(server, created.secret)
    body = {**COUNT, "max_tokens": 400, "ignore_eos": True}  # no early end of text

    def plain_left() -> None:
        with client(server, created.secret) as http, pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=body, timeout=2)

    with ThreadPoolExecutor(6) as pool:
        left = [pool.submit(stream_ids, server, created.secret, 2) for _ in range(3)]
        plain = [pool.submit(plain_left) for _ in range(2)]
        finished = pool.submit(stream_ids, server, created.secret)
        named = {future.result(timeout=180) for future in [*left, finished]}
        for future in plain:
            future.result(timeout=180)
    records = settled(server_redis.url, created.key.id, len(named) + 2)
    scenario = reconcile("client_disconnect", 6, named, records, accepted_unnamed=2)
    assert_clean(scenario)
    assert sorted(r.status.value for r in records) == ["cancelled"] * 5 + ["completed"]
    check_views_agree(server, created.secret, server_redis.url, created.key.id, before)


@contextmanager
def full_disk(folder: Path) -> Iterator[Path]:
    """`folder` on a 1 MiB tmpfs filled to the last byte (mounting needs root)."""
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], check=True)
    try:
        filler = folder / "filler"
        with filler.open("wb", buffering=0) as out, pytest.raises(OSError):
            while True:
                out.write(b"\0" * 4096)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_spool_disk_full_while_redis_is_down(
    model_dir: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Redis down and the spool's disk full: requests are still answered; their records
    wait (journaled, retried) and reach Redis once it is back."""
    keys = open_key_store({"REDIS_URL": redis_server.url})
    try:
        created = keys.create("fault-spool-full")
    finally:
        keys.close()
    with full_disk(tmp_path / "spool") as spool:
        env = {"REDIS_URL": redis_server.url, "SUBJECTIVE_SPOOL_DIR": str(spool)}
        state = tmp_path / "state"
        state.mkdir()
        with server_process(model_dir, state, env) as (_, base_url):

            def kill() -> None:  # once every stream runs: keys are read from Redis
                redis_server.stop(signal.SIGKILL)

            accepted = mixed_batch(base_url, created.secret, kill, streams=3, plain=0)
            time.sleep(3.0)  # the writer fails on both stores and keeps retrying
            assert [p.name for p in spool.iterdir()] == ["filler"]  # nothing spooled, no debris
            redis_server.restart()
            records = settled(redis_server.url, created.key.id, len(accepted))
            assert_clean(reconcile("spool_full", len(accepted), accepted, records))
            counted = Counter()  # a fresh server: its counters started at zero
            check_views_agree(base_url, created.secret, redis_server.url, created.key.id, counted)
