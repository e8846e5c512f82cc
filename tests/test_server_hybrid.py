"""A hybrid (SmolLM2 with a quarter of its layers softmax) behind the real server, billed exactly.

`subjective serve --model HYBRID_DIR` serves it through vLLM's hybrid cache; the official openai
client calls it, streamed and not, and each response's `usage.compute` equals the PyTorch
reference's count of the same tokens (`runner.generate`): FLOPs, the all-softmax model's FLOPs,
KV entries of the softmax layers only, and the linear layers' state in bytes. The ledger and
`/metrics` carry the same figures.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from subjective.model_registry.convert import convert_hybrid, load_model
from subjective.model_registry.flops import state_elements
from subjective.model_registry.hybrid_rank import keep_count, select_layers
from subjective.model_registry.runner import generate
from tests.openai_features import check_openai_features
from tests.processes import sqlite_serving

pytestmark = pytest.mark.vllm
SOFTMAX_RATIO = 0.25
PROMPT = "The three primary colours are"
NEW_TOKENS = 7


@pytest.fixture(scope="module")
def hybrid_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    softmax = select_layers("uniform", keep_count(SOFTMAX_RATIO, 30), 30)
    return convert_hybrid(model_dir, tmp_path_factory.mktemp("hybrid") / "SmolLM2-hybrid", softmax)


@pytest.fixture(scope="module")
def served(hybrid_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The server on the hybrid (SQLite ledger and keys); yields (openai client, admin http)."""
    state = tmp_path_factory.mktemp("hybrid-server")
    with sqlite_serving(hybrid_dir, state) as (url, user, admin):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=user, timeout=300)
        headers = {"authorization": f"Bearer {admin}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
            yield client, http


@pytest.fixture(scope="module")
def expected(hybrid_dir: Path) -> tuple[list[int], dict]:
    """The prompt's token ids and the reference's `usage.compute` for NEW_TOKENS greedy tokens."""
    from tokenizers import Tokenizer

    prompt = Tokenizer.from_file(str(hybrid_dir / "tokenizer.json")).encode(PROMPT).ids
    model = load_model(hybrid_dir)
    compute = generate(model, [prompt], NEW_TOKENS).flops.usage(0)
    # The server keeps the recurrent state in bfloat16 (2 bytes), the reference in float32.
    return prompt, {**compute, "state_bytes": state_elements(model.config) * 2}


def completion_args(prompt: list[int]) -> dict:
    return {
        "model": "SmolLM2-hybrid",
        "prompt": prompt,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }


def test_usage_is_the_reference_count(served, expected) -> None:
    client, http = served
    prompt, compute = expected
    response = client.completions.create(**completion_args(prompt))
    usage = response.usage.model_dump()
    assert usage["completion_tokens"] == NEW_TOKENS
    assert usage["compute"] == compute
    assert compute["kv_entries"] * 30 == compute["kv_entries_dense"] * 8  # 8 softmax layers
    assert compute["state_bytes"] == 22 * 9 * 64 * 64 * 2  # 22 linear layers, bf16 states
    record = record_of(http, response.id)
    fields = ("flops", "dense_flops", "kv_entries", "kv_entries_dense", "state_bytes")
    assert {k: record[k] for k in fields} == {k: compute[k] for k in fields}


def test_streamed_usage_is_the_reference_count(served, expected) -> None:
    client, http = served
    prompt, compute = expected
    before = state_bytes_metric(http)
    chunks = list(
        client.completions.create(
            **completion_args(prompt), stream=True, stream_options={"include_usage": True}
        )
    )
    usage = chunks[-1].usage.model_dump()
    assert usage["completion_tokens"] == NEW_TOKENS
    assert usage["compute"] == compute
    assert state_bytes_metric(http) == before + compute["state_bytes"]


def record_of(http: httpx.Client, request_id: str, timeout_s: float = 30.0) -> dict:
    """The request's ledger record, once the server's usage writer has stored it."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = http.get("/v1/usage").json()["data"]
        found = [row for row in rows if row["request_id"] == request_id]
        if found or time.monotonic() > deadline:
            assert found, f"no usage record for {request_id}"
            return found[0]
        time.sleep(0.2)


def state_bytes_metric(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("subjective_state_bytes_total{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_the_openai_features_work_on_the_hybrid(served) -> None:
    client, _ = served
    compute = check_openai_features(client, "SmolLM2-hybrid", fluent=False)  # not distilled
    # Scored by the hybrid's own layers: KV in its softmax layers only, state in the others.
    assert compute["flops"] > 0
    assert compute["kv_entries"] * 30 == compute["kv_entries_dense"] * 8
    assert compute["state_bytes"] > 0
