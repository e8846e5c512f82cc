"""API keys: secrets shown once, hashed at rest, verified in constant time, revocable."""

from __future__ import annotations

import argparse
import hmac
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from subjective.server import keys as keys_module
from subjective.server.admin_bootstrap import BOOTSTRAP_KEY_NAME, adopt_admin_key_file
from subjective.server.keys import (
    SECRET_PREFIX,
    ApiKey,
    KeyStore,
    RedisKeyStorage,
    SQLiteKeyStorage,
    open_key_store,
)
from subjective.server.keys_cli import register
from tests import redis_server as redis_fixtures
from tests.redis_server import RedisServer

redis_server = redis_fixtures.redis_server  # the fixture


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyStore]:
    if request.param == "sqlite":
        opened = KeyStore(SQLiteKeyStorage(tmp_path / "keys.sqlite3"))
        yield opened
        opened.close()
        return
    server = RedisServer(tmp_path / "redis").start()
    opened = KeyStore(RedisKeyStorage(server.url))
    try:
        yield opened
    finally:
        opened.close()
        server.stop()


def test_create_then_verify(store: KeyStore) -> None:
    created = store.create("team-a", rpm=60, flops_budget=5 * 10**15, budget_period="month")
    assert created.secret.startswith(SECRET_PREFIX + created.key.id + ".")
    assert len(created.secret) > 50
    verified = store.verify(created.secret)
    assert verified == created.key
    assert (verified.rpm, verified.flops_budget, verified.budget_period) == (60, 5e15, "month")
    assert not verified.admin and verified.active
    admin = store.create("ops", admin=True)
    assert store.verify(admin.secret) == admin.key and admin.key.admin
    assert admin.key.rpm is None and admin.key.flops_budget is None
    assert [k.id for k in store.list()] == [created.key.id, admin.key.id]  # oldest first


def test_wrong_or_malformed_secrets_fail(store: KeyStore) -> None:
    created = store.create("team-a")
    other = store.create("team-b")
    stem, _, random = created.secret.rpartition(".")
    flipped = random[:-1] + ("A" if random[-1] != "A" else "B")
    for bad in [
        f"{stem}.{flipped}",  # right id, wrong secret
        f"{SECRET_PREFIX}{other.key.id}.{random}",  # another key's id
        f"{SECRET_PREFIX}key_0000000000000000.{random}",  # no such key
        random,
        "",
        SECRET_PREFIX,
        created.secret + " ",
        created.secret.upper(),
    ]:
        assert store.verify(bad) is None, bad


def test_revoke(store: KeyStore) -> None:
    created = store.create("team-a")
    kept = store.create("team-b")
    assert store.revoke(created.key.id)
    assert store.verify(created.secret) is None
    assert store.verify(kept.secret) == kept.key
    assert not store.revoke(created.key.id)  # already revoked
    assert not store.revoke("key_nope")
    listed = {k.id: k for k in store.list()}
    assert listed[created.key.id].revoked_at is not None and listed[kept.key.id].active


def test_verify_compares_in_constant_time(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every path, hit or miss, ends in one `hmac.compare_digest` of two SHA-256 digests."""
    created = store.create("team-a")
    calls: list[tuple[int, int]] = []
    compare = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return compare(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", spy)
    for secret in [created.secret, created.secret[:-1] + "x", "sk-subj-key_x.y", "garbage"]:
        store.verify(secret)
    assert calls == [(32, 32)] * 4


def test_sqlite_keeps_only_hashes(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite3"
    store = KeyStore(SQLiteKeyStorage(path))
    secrets_ = [store.create(f"k{i}").secret for i in range(3)]
    store.close()
    files = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("keys."))
    for secret in secrets_:
        assert secret.encode() not in files
        assert secret.rpartition(".")[2].encode() not in files  # not even the random part
    reopened = KeyStore(SQLiteKeyStorage(path))
    assert all(reopened.verify(s) is not None for s in secrets_)
    reopened.close()


def test_redis_keeps_only_hashes(redis_server: RedisServer) -> None:
    store = KeyStore(RedisKeyStorage(redis_server.url))
    secret = store.create("team-a").secret
    store.close()
    client = redis.Redis.from_url(redis_server.url)
    dump = b"".join(
        key + b"".join(k + v for k, v in client.hgetall(key).items())
        for key in client.keys("*")
        if client.type(key) == b"hash"
    )
    client.close()
    assert dump and secret.rpartition(".")[2].encode() not in dump
    files = [p.read_bytes() for p in redis_server.directory.rglob("*") if p.is_file()]
    assert files and secret.rpartition(".")[2].encode() not in b"".join(files)  # the AOF


@pytest.mark.parametrize(
    ("period", "now", "window"),
    [
        ("hour", datetime(2026, 5, 3, 14, 30, tzinfo=UTC), ((2026, 5, 3, 14), (2026, 5, 3, 15))),
        ("day", datetime(2026, 5, 3, 14, 30, tzinfo=UTC), ((2026, 5, 3), (2026, 5, 4))),
        ("month", datetime(2026, 5, 3, 14, 30, tzinfo=UTC), ((2026, 5, 1), (2026, 6, 1))),
        ("month", datetime(2026, 12, 31, 23, 59, tzinfo=UTC), ((2026, 12, 1), (2027, 1, 1))),
    ],
)
def test_budget_window(period: str, now: datetime, window: tuple[tuple, tuple]) -> None:
    key = ApiKey("key_x", "x", flops_budget=10**15, budget_period=period)  # type: ignore[arg-type]
    start, end = key.budget_window(now)
    assert (start, end) == tuple(datetime(*parts, tzinfo=UTC) for parts in window)


def test_create_refuses_bad_limits(store: KeyStore) -> None:
    with pytest.raises(ValueError):
        store.create("x", rpm=-1)
    with pytest.raises(ValueError):
        store.create("x", budget_period="week")  # type: ignore[arg-type]


def test_open_key_store_follows_the_environment(tmp_path: Path) -> None:
    store = open_key_store({"SUBJECTIVE_KEYS_PATH": str(tmp_path / "k" / "keys.sqlite3")})
    assert isinstance(store.storage, SQLiteKeyStorage)
    store.close()
    store = open_key_store({"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert isinstance(store.storage, RedisKeyStorage)
    store.close()


def test_keys_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("SUBJECTIVE_KEYS_PATH", str(tmp_path / "keys.sqlite3"))
    parser = argparse.ArgumentParser(prog="subjective")
    register(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> tuple[int, str]:
        args = parser.parse_args(["keys", *argv])
        code = args.handler(args)
        return code, capsys.readouterr().out

    code, out = run("create", "--name", "team-a", "--rpm", "30", "--flops-budget", "5e15")
    assert code == 0
    fields = dict(line.split(":", 1) for line in out.splitlines())
    key_id, secret = fields["id"].strip(), fields["secret"].strip()
    store = open_key_store()
    verified = store.verify(secret)
    assert verified is not None and verified.id == key_id
    assert (verified.rpm, verified.flops_budget, verified.admin) == (30, 5 * 10**15, False)
    code, out = run("create", "--name", "ops", "--admin")
    assert code == 0
    code, out = run("list")
    assert code == 0 and "team-a" in out and "ops" in out and secret not in out
    assert run("revoke", key_id) == (0, f"revoked {key_id}\n")
    assert run("revoke", key_id)[0] == 1
    assert store.verify(secret) is None
    assert "revoked" in run("list")[1]
    store.close()
    with pytest.raises(SystemExit):
        parser.parse_args(["keys", "create", "--name", "x", "--flops-budget", "1.5"])


def test_admin_key_file_is_adopted_once(
    store: KeyStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="subjective")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["keys", "new-secret"])
    assert args.handler(args) == 0
    secret = capsys.readouterr().out.strip()
    assert store.verify(secret) is None  # new-secret stores nothing
    path = tmp_path / "admin-key"
    path.write_text(secret + "\n")  # as `echo` writes it
    adopted = adopt_admin_key_file(store, path)
    assert adopted is not None and adopted.admin and adopted.name == BOOTSTRAP_KEY_NAME
    assert store.verify(secret) == adopted
    assert adopt_admin_key_file(store, path) is None  # a restart adds nothing
    assert [k.id for k in store.list()] == [adopted.id]
    assert store.revoke(adopted.id)
    assert adopt_admin_key_file(store, path) is None
    assert store.verify(secret) is None  # revoked stays revoked across restarts


@pytest.mark.parametrize(
    "content",
    [None, "", "not-a-key", f"{SECRET_PREFIX}key_1.short", f"{SECRET_PREFIX}.{'x' * 40}"],
)
def test_admin_key_file_refuses_what_is_not_a_secret(
    store: KeyStore, tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "admin-key"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=str(path)):
        adopt_admin_key_file(store, path)
    assert store.list() == []
