"""The OpenAI API of `subjective serve` on the real model, called with the official client."""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from tests.conftest import SERVED_NAME

pytestmark = pytest.mark.vllm

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def test_models_lists_the_served_model(openai_client):
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [SERVED_NAME]


def test_chat_completion_answers_and_counts_tokens(openai_client, model_dir):
    response = openai_client.chat.completions.create(
        model=SERVED_NAME, messages=CHAT, max_tokens=16, temperature=0
    )
    answer = response.choices[0].message.content
    assert "Paris" in answer
    assert response.choices[0].finish_reason in {"stop", "length"}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert response.usage.prompt_tokens == len(
        tokenizer.encode(prompt_ids, add_special_tokens=False)
    )
    assert 0 < response.usage.completion_tokens <= 16
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.completion_tokens
    )


def test_completion_respects_max_tokens(openai_client):
    response = openai_client.completions.create(
        model=SERVED_NAME, prompt="def fibonacci(n):", max_tokens=7, temperature=0
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 7
    assert response.choices[0].text


def test_greedy_is_deterministic_and_streaming_matches(openai_client):
    kwargs = dict(model=SERVED_NAME, messages=CHAT, max_tokens=12, temperature=0)
    whole = openai_client.chat.completions.create(**kwargs)
    stream = openai_client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    pieces, usage, roles = [], None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                pieces.append(choice.delta.content)
    assert roles == ["assistant"]
    assert "".join(pieces) == whole.choices[0].message.content
    assert usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_list_of_prompts_and_n_give_one_choice_each(openai_client):
    response = openai_client.completions.create(
        model=SERVED_NAME, prompt=["Hello", "The sky is"], n=2, max_tokens=3, seed=1,
        extra_body={"ignore_eos": True},  # sampled: an early end of text would shorten one
    )  # fmt: skip
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    assert response.usage.completion_tokens == 12


@pytest.mark.parametrize("quality", ["aggressive", "conservative"])
def test_quality_is_accepted_as_extra_body(openai_client, quality):
    response = openai_client.completions.create(
        model=SERVED_NAME, prompt="1, 2, 3,", max_tokens=2,
        extra_body={"quality": quality, "ignore_eos": True},  # sampled: no early end of text
    )  # fmt: skip
    assert response.usage.completion_tokens == 2


def test_unknown_model_is_404(openai_client):
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.completions.create(model="gpt-5", prompt="hi", max_tokens=1)
    assert caught.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "quality": "maximal"}, "quality"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": ""}, "prompt"),
    ],
)
def test_bad_values_are_400_with_openai_error(http, body, param):
    response = http.post("/v1/completions", json={"model": SERVED_NAME, **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_malformed_json_is_400(http):
    response = http.post(
        "/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_prompt_longer_than_context_is_400(openai_client):
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.completions.create(model=SERVED_NAME, prompt="word " * 1100, max_tokens=4)
    assert caught.value.body["code"] == "context_length_exceeded"


def test_curl_style_chat_request(http):
    """What the README shows: a plain JSON POST, no client library."""
    response = http.post(
        "/v1/chat/completions", json={"model": SERVED_NAME, "messages": CHAT, "max_tokens": 8}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"


def test_openapi_spec_is_served(http):
    spec = http.get("/openapi.json").json()
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions"} <= set(spec["paths"])
