"""Keys, limits, the meter and the ledger through the real server (vLLM, Redis)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from decimal import ROUND_HALF_UP, Decimal

import httpx
import pytest

from subjective.model_registry.config import ModelConfig
from subjective.server.keys import KeyStore
from tests.conftest import SERVED_NAME, SERVER_PRICE_PER_TFLOP
from tests.processes import REPO
from tests.redis_server import RedisServer

pytestmark = pytest.mark.vllm
CHAT = [{"role": "user", "content": "Name three colours."}]


def client(server: str, secret: str | None) -> httpx.Client:
    headers = {"authorization": f"Bearer {secret}"} if secret else {}
    return httpx.Client(base_url=server, headers=headers, timeout=120)


def chat(http: httpx.Client, max_tokens: int = 6, **extra) -> httpx.Response:
    body = {"model": SERVED_NAME, "messages": CHAT, "max_tokens": max_tokens, **extra}
    return http.post("/v1/chat/completions", json=body)


def usage_of(http: httpx.Client, **params) -> dict:
    response = http.get("/v1/usage", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_records(http: httpx.Client, count: int, timeout_s: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = usage_of(http)["data"]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_requests_need_a_valid_key(server: str) -> None:
    with client(server, None) as anonymous, client(server, "sk-subj-key_x.nope") as wrong:
        for http in (anonymous, wrong):
            response = chat(http)
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "authentication_error"
            assert http.get("/v1/models").status_code == 401
        assert anonymous.get("/health").status_code == 200


def test_admin_routes_need_an_admin_key(server: str, user_secret: str, admin_secret: str) -> None:
    with client(server, user_secret) as user, client(server, admin_secret) as admin:
        forbidden = user.get("/admin/v1/threshold")
        assert forbidden.status_code == 403
        assert forbidden.json()["error"]["type"] == "permission_error"
        state = admin.get("/admin/v1/threshold").json()
        # The default model is dense: no gate, so no threshold to set.
        assert state == {"model": SERVED_NAME, "threshold": None, "by_quality": {}}
        refused = admin.put("/admin/v1/threshold", json={"threshold": 0.3})
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "no_threshold"
        assert admin.put("/admin/v1/threshold", json={"threshold": 2}).status_code == 400


def test_dense_compute_is_metered_per_executed_token(
    server: str, key_store: KeyStore, model_dir
) -> None:
    layers = ModelConfig.from_folder(model_dir).num_hidden_layers
    with client(server, key_store.create("dense-meter").secret) as http:
        usage = chat(http, max_tokens=5, temperature=0).json()["usage"]
    compute, cached = usage["compute"], usage["prompt_tokens_details"]["cached_tokens"]
    fed_back = usage["completion_tokens"] - 1  # the last sampled token is never run
    assert compute["kv_entries"] == layers * (usage["prompt_tokens"] - cached + fed_back)
    assert compute["flops"] == compute["dense_flops"] > 0
    assert compute["saved_ratio"] == 0.0


def test_usage_ledger_and_export_agree_with_responses(
    server: str, key_store: KeyStore, server_redis: RedisServer, tmp_path
) -> None:
    created = key_store.create("billing-agreement")
    flops, tokens = 0, 0
    with client(server, created.secret) as http:
        for max_tokens in (3, 7):
            usage = chat(http, max_tokens=max_tokens).json()["usage"]
            flops += usage["compute"]["flops"]
            tokens += usage["completion_tokens"]
        completion = {"model": SERVED_NAME, "prompt": "One, two,", "max_tokens": 4}
        flops += http.post("/v1/completions", json=completion).json()["usage"]["compute"]["flops"]
        streamed = chat(http, stream=True, stream_options={"include_usage": True})
        final = json.loads(streamed.text.split("data: ")[-2])
        flops += final["usage"]["compute"]["flops"]

        listed = usage_of(http)
    assert listed["totals"]["requests"] == 4
    assert listed["totals"]["flops"] == flops
    assert {row["status"] for row in listed["data"]} == {"completed"}
    assert {row["api_key_id"] for row in listed["data"]} == {created.key.id}
    rate = Decimal(SERVER_PRICE_PER_TFLOP)  # per 10^12 FLOPs, priced in 10^-9 units
    expected_price = sum(
        (Decimal(row["flops"]) * rate / 1000).quantize(Decimal(1), ROUND_HALF_UP)
        for row in listed["data"]
    )
    assert listed["totals"]["price_nanos"] == expected_price

    exported = tmp_path / "usage.jsonl"
    subprocess.run(
        [sys.executable, "-m", "subjective.cli", "billing", "export", "--format", "jsonl",
         "--output", str(exported), "--cursor", f"test-{created.key.id}"],
        cwd=REPO, env={**os.environ, "REDIS_URL": server_redis.url}, check=True,
    )  # fmt: skip
    mine = [
        event
        for line in exported.read_text().splitlines()
        if (event := json.loads(line))["api_key_id"] == created.key.id
    ]
    assert sum(event["flops"] for event in mine) == flops
    assert len(mine) == 4


def test_rejected_requests_record_nothing_and_use_no_allowance(
    server: str, key_store: KeyStore
) -> None:
    with client(server, key_store.create("limited", rpm=2).secret) as http:
        assert chat(http, max_tokens=10_000).status_code == 400  # longer than the context
        assert chat(http, quality="maximal").status_code == 400
        assert chat(http).status_code == 200
        assert chat(http).status_code == 200
        limited = chat(http)
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert usage_of(http)["totals"]["requests"] == 2


def test_flop_budget_is_enforced_from_the_ledger(server: str, key_store: KeyStore) -> None:
    with client(server, key_store.create("budget", flops_budget=1).secret) as http:
        assert chat(http).status_code == 200  # nothing spent yet
        over = chat(http)
    assert over.status_code == 429
    assert over.json()["error"]["code"] == "insufficient_quota"
    assert int(over.headers["retry-after"]) >= 1


def test_keys_see_only_their_own_usage(server: str, key_store: KeyStore, admin_secret: str) -> None:
    first, second = key_store.create("first"), key_store.create("second")
    with client(server, first.secret) as one, client(server, second.secret) as two:
        chat(one)
        assert two.get("/v1/usage", params={"key_id": first.key.id}).status_code == 403
        assert usage_of(two)["data"] == []
    with client(server, admin_secret) as admin:
        rows = usage_of(admin, key_id=first.key.id)["data"]
        assert [row["api_key_id"] for row in rows] == [first.key.id]
        assert admin.get("/v1/usage", params={"since": "yesterday"}).status_code == 400


def test_a_stream_cut_by_the_client_is_billed_once_as_cancelled(
    server: str, key_store: KeyStore
) -> None:
    with client(server, key_store.create("cancelling").secret) as http:
        body = {"model": SERVED_NAME, "prompt": "Count: 1, 2, 3,", "max_tokens": 400}
        body["ignore_eos"] = True  # a sampled end of text must not finish it first
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
            lines = stream.iter_lines()
            received = [line for line, _ in zip(lines, range(6), strict=False) if line]
        assert received
        rows = wait_for_records(http, 1)
        time.sleep(1.0)  # a second record would show up by now
        rows = usage_of(http)["data"]
    assert len(rows) == 1
    assert rows[0]["status"] == "cancelled"
    assert 0 < rows[0]["completion_tokens"] < 400
    assert rows[0]["flops"] > 0


def test_usage_survives_redis_dying_mid_request(
    server: str, key_store: KeyStore, server_redis: RedisServer
) -> None:
    created = key_store.create("outage")
    with client(server, created.secret) as http:
        body = {"model": SERVED_NAME, "prompt": "Count: 1, 2, 3,", "max_tokens": 48}
        body["ignore_eos"] = True  # all 48 tokens: a sampled end of text must not cut it short
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
            lines = stream.iter_lines()
            next(lines)
            server_redis.stop(signal.SIGKILL)
            try:
                rest = [line for line in lines if line]
            finally:
                server_redis.restart()
        assert rest[-1] == "data: [DONE]"
        rows = wait_for_records(http, 1)
    assert len(rows) == 1
    assert rows[0]["status"] == "completed"
    assert rows[0]["completion_tokens"] == 48
