"""Shared fixtures: the real converted model and one real server per test run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# Triton kernels run on this CPU only in its interpreter, and triton reads this when it is first
# imported (torch may import it early): set it before any test module loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import httpx  # noqa: E402
import pytest  # noqa: E402

from subjective.server.keys import KeyStore, new_secret, open_key_store  # noqa: E402
from tests.processes import REPO, serving  # noqa: E402
from tests.redis_server import RedisServer, redis_server  # noqa: E402, F401 - a fixture for all

MODEL_DIR = REPO / "models" / "SmolLM2-135M-Instruct"
DATA_DIR = REPO / "data"
SERVED_NAME = "SmolLM2-135M-Instruct"


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
def server_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The real redis-server the test server keeps its keys and usage ledger in."""
    redis = RedisServer(tmp_path_factory.mktemp("server-redis")).start()
    try:
        yield redis
    finally:
        redis.stop()


@pytest.fixture(scope="session")
def key_store(server_redis: RedisServer) -> Iterator[KeyStore]:
    """The test server's key store: create keys here and the server knows them."""
    store = open_key_store({"REDIS_URL": server_redis.url})
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(scope="session")
def user_secret(key_store: KeyStore) -> str:
    return key_store.create("tests").secret


@pytest.fixture(scope="session")
def admin_secret(key_store: KeyStore) -> str:
    return key_store.create("tests-admin", admin=True).secret


SERVER_PRICE_PER_TFLOP = "0.0025"


@pytest.fixture(scope="session")
def server_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's own files: its log, its pricing file, its ledger spool."""
    return tmp_path_factory.mktemp("server")


@pytest.fixture(scope="session")
def bootstrap_admin_secret(server_state: Path) -> str:
    """The admin key the test server stores from its --admin-key-file at start-up."""
    secret = new_secret()
    (server_state / "admin-key").write_text(secret + "\n")
    return secret


@pytest.fixture(scope="session")
def server(
    model_dir: Path, server_state: Path, server_redis: RedisServer, bootstrap_admin_secret: str
) -> Iterator[str]:
    """`subjective serve` on the real model (eager vLLM), as users run it; yields its base URL.

    Keys and usage live in `server_redis`; requests need a key (`user_secret`); the operator's
    first admin key comes from a secret file (`bootstrap_admin_secret`)."""
    pricing = server_state / "pricing.json"
    pricing.write_text(f'{{"per_tflop": {{"{SERVED_NAME}": "{SERVER_PRICE_PER_TFLOP}"}}}}')
    env = {"REDIS_URL": server_redis.url, "SUBJECTIVE_SPOOL_DIR": str(server_state / "spool")}
    options = ("--pricing", str(pricing), "--admin-key-file", str(server_state / "admin-key"))
    with serving(model_dir, server_state, env, *options) as base_url:
        yield base_url


@pytest.fixture(scope="session")
def openai_client(server: str, user_secret: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=user_secret, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server: str, user_secret: str) -> Iterator[httpx.Client]:
    """Plain HTTP to the test server with a user key, as curl would send it."""
    headers = {"authorization": f"Bearer {user_secret}"}
    with httpx.Client(base_url=server, headers=headers, timeout=120) as client:
        yield client
