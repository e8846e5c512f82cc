"""The gated models `make` installs (SmolLM2-SDT, SmolLM2-STT), served as a newcomer serves them
(bfloat16, the server's default): the OpenAI API's features work through the gates, and prompt
scoring bills the FLOPs the gates really executed."""

from __future__ import annotations

import openai
import pytest

from tests.openai_features import check_openai_features
from tests.processes import REPO, sqlite_serving

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module", params=["SmolLM2-SDT", "SmolLM2-STT"])
def shipped(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(openai client, served name) of a server on one shipped gated model."""
    name = request.param
    state = tmp_path_factory.mktemp(name)
    with sqlite_serving(REPO / "models" / name, state) as (url, user, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=user, timeout=300), name


def test_the_openai_features_work_through_the_gates(shipped: tuple[openai.OpenAI, str]) -> None:
    client, name = shipped
    compute = check_openai_features(client, name, scoring_quality="aggressive")
    assert 0 < compute["flops"] < compute["dense_flops"]
    assert compute["kv_entries"] < compute["kv_entries_dense"]
