"""A surprise-gated (SDT) model behind the real server: saved FLOPs, billed as the reference counts.

The server runs vLLM with our plugin in float32, so its greedy tokens and routing decisions can
be held to the PyTorch reference (`runner.generate`) on the same prompt and threshold.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from subjective.model_registry.config import ModelConfig
from subjective.model_registry.convert import load_model
from subjective.model_registry.runner import generate
from tests.processes import REPO, sqlite_serving

pytestmark = pytest.mark.vllm
PROMPT = "The three primary colours are"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def sdt_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("sdt") / "SmolLM2-SDT"
    subprocess.run(
        [sys.executable, "-m", "subjective.cli", "model", "convert", "--to", "sdt",
         str(model_dir), str(target)],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    return target


@pytest.fixture(scope="module")
def gated(sdt_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The server on the SDT model (SQLite ledger and keys); yields (url, user, admin) clients."""
    state = tmp_path_factory.mktemp("gated-server")
    with sqlite_serving(sdt_dir, state, "--dtype", "float32") as (url, user, admin):
        bearer = "authorization"
        with (
            httpx.Client(base_url=url, headers={bearer: f"Bearer {user}"}, timeout=300) as u,
            httpx.Client(base_url=url, headers={bearer: f"Bearer {admin}"}, timeout=60) as a,
        ):
            yield u, a


@pytest.fixture(scope="module")
def reference(sdt_dir: Path):
    """Greedy generation and its meter count in the PyTorch reference, for one threshold."""
    model = load_model(sdt_dir).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(sdt_dir)
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)

    def run(threshold: float) -> tuple[str, dict]:
        out = generate(
            model, [prompt], NEW_TOKENS, threshold=threshold, eos_token_id=tokenizer.eos_token_id
        )
        text = tokenizer.decode(out.tokens[0], skip_special_tokens=True)
        return text, out.flops.usage(0)

    return run


def complete(http: httpx.Client, quality: str) -> dict:
    body = {
        "model": "SmolLM2-SDT",
        "prompt": PROMPT,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "quality": quality,
    }
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_qualities_batched_together_each_match_the_reference(gated, reference, sdt_dir) -> None:
    user, admin = gated
    thresholds = admin.get("/admin/v1/threshold").json()["by_quality"]
    assert thresholds == {
        q: pytest.approx(ModelConfig.from_folder(sdt_dir).routing.threshold_for(q))
        for q in ("aggressive", "conservative")
    }
    qualities = ["aggressive", "conservative"] * 2
    with ThreadPoolExecutor(len(qualities)) as pool:  # in flight together: one vLLM batch
        replies = list(pool.map(lambda q: complete(user, q), qualities))
    for quality, reply in zip(qualities, replies, strict=True):
        text, counts = reference(thresholds[quality])
        assert reply["choices"][0]["text"] == text
        compute = reply["usage"]["compute"]
        assert {k: compute[k] for k in counts if k != "saved_ratio"} == {
            k: v for k, v in counts.items() if k != "saved_ratio"
        }
    aggressive = replies[0]["usage"]["compute"]
    assert aggressive["flops"] < aggressive["dense_flops"]
    assert aggressive["saved_ratio"] > 0
    assert aggressive["kv_entries"] < aggressive["kv_entries_dense"]


def test_runtime_threshold_reaches_the_gate_without_restart(gated) -> None:
    user, admin = gated
    original = admin.get("/admin/v1/threshold").json()["threshold"]
    try:
        assert admin.put("/admin/v1/threshold", json={"threshold": 1.0}).status_code == 200
        none_kept = complete(user, "aggressive")["usage"]["compute"]  # 1 + offset: clamped to 1
        assert admin.put("/admin/v1/threshold", json={"threshold": 0.0}).status_code == 200
        all_kept = complete(user, "conservative")["usage"]["compute"]  # 0 - offset: 0
    finally:
        admin.put("/admin/v1/threshold", json={"threshold": original})
    assert all_kept["kv_entries"] == all_kept["kv_entries_dense"]
    assert none_kept["kv_entries"] < none_kept["kv_entries_dense"]
    assert none_kept["flops"] < all_kept["flops"]
    metrics = user.get("/metrics").text
    assert f'subjective_threshold{{model="SmolLM2-SDT"}} {float(original)}' in metrics
