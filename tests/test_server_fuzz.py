"""schemathesis against the real server's /openapi.json, with a key: no 5xx, and every answer
is one the document declares (status, content type, body schema).

Bounded: `SUBJECTIVE_FUZZ_EXAMPLES` cases per operation (CI's short mode: the default). The
key's FLOP budget is spent first, so a valid generation request ends in 429 after its
validation: the fuzzer exercises parsing, validation, auth and limits, not hours of decoding.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from subjective.server.keys import KeyStore
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


@pytest.fixture(scope="module")
def api_schema(server: str):
    return schemathesis.openapi.from_url(f"{server}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_the_server_answers_as_its_openapi_document_says(case, fuzz_secret: str) -> None:
    case.call_and_validate(
        headers={"authorization": f"Bearer {fuzz_secret}"}, checks=CHECKS, timeout=60
    )
