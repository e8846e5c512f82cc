"""schemathesis against the real server's /openapi.json, with a key: no 5xx, and every answer
is one the document declares (status, content type, body schema).

Bounded: `SUBJECTIVE_FUZZ_EXAMPLES` cases per operation (CI's short mode: the default). The
key's FLOP budget is spent first, so a valid generation request ends in 429 after its
validation: the fuzzer exercises parsing, validation, auth and limits, not hours of decoding.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from subjective.server.app import create_app
from subjective.server.config import ServerConfig
from subjective.server.keys import KeyStore
from tests.conftest import MODEL_DIR, SERVED_NAME
from tests.fault_report import record_fuzz
from tests.test_server_billing import chat, client

pytestmark = pytest.mark.vllm
EXAMPLES = int(os.environ.get("SUBJECTIVE_FUZZ_EXAMPLES", "25"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzz_secret(server: str, key_store: KeyStore) -> str:
    created = key_store.create("fuzz", flops_budget=1)
    with client(server, created.secret) as http:
        assert chat(http).status_code == 200  # the budget is spent from here on
    return created.secret


@pytest.fixture(scope="module", autouse=True)
def fuzz_tally() -> Iterator[Counter]:
    """Cases sent and 5xx answers, for the faults report."""
    tally: Counter = Counter()
    yield tally
    record_fuzz(tally["cases"], tally["server_errors"])


def served_document() -> dict:
    """The OpenAPI document the server serves, built as it builds it (no engine needed), so
    the cases exist when tests are collected; the server's own copy is held equal to it."""
    config = ServerConfig(model_dir=MODEL_DIR, served_model_name=SERVED_NAME)
    return create_app(config).openapi()


schema = schemathesis.openapi.from_dict(served_document())


def test_the_served_document_is_the_one_fuzzed(server: str) -> None:
    assert httpx.get(f"{server}/openapi.json").json() == served_document()


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_the_server_answers_as_its_openapi_document_says(
    case, server: str, fuzz_secret: str, fuzz_tally: Counter
) -> None:
    response = case.call(
        base_url=server, headers={"authorization": f"Bearer {fuzz_secret}"}, timeout=60
    )
    fuzz_tally["cases"] += 1
    fuzz_tally["server_errors"] += response.status_code >= 500
    case.validate_response(response, checks=CHECKS)
