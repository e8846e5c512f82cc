"""The OpenAI API's optional fields on the real server and model, with the official client:
each one honoured (the output changes as it should) or refused with a 400 naming it."""

from __future__ import annotations

import json

import openai
import pytest
from transformers import AutoTokenizer

from tests.conftest import SERVED_NAME

pytestmark = pytest.mark.vllm

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
PROMPT = "The capital of France is"
# SmolLM2-135M: hidden 576, vocabulary 49152 (DESIGN.md §10); one LM head row of logits.
LM_HEAD_FLOPS = 2 * 576 * 49152


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def complete(client, **kwargs):
    return client.completions.create(model=SERVED_NAME, **kwargs)


def chat(client, **kwargs):
    return client.chat.completions.create(model=SERVED_NAME, messages=CHAT, **kwargs)


def streamed_completion(client, **kwargs) -> tuple[str, list]:
    """The text and the completions logprobs objects of a one-choice stream."""
    text, logprobs = "", []
    for chunk in complete(client, stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                logprobs.append(choice.logprobs)
    return text, logprobs


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# Sampling extras


def test_logit_bias_bans_the_greedy_first_token(openai_client, tokenizer):
    greedy = complete(openai_client, prompt=PROMPT, max_tokens=1, temperature=0)
    [first] = token_ids(tokenizer, greedy.choices[0].text)
    banned = complete(
        openai_client, prompt=PROMPT, max_tokens=1, temperature=0, logit_bias={str(first): -100}
    )
    assert banned.choices[0].text != greedy.choices[0].text
    [london] = token_ids(tokenizer, " London")
    forced = complete(
        openai_client, prompt=PROMPT, max_tokens=1, temperature=0, logit_bias={str(london): 100}
    )
    assert forced.choices[0].text == " London"


def test_stop_token_ids_end_the_completion_on_that_token(openai_client, tokenizer):
    greedy = complete(openai_client, prompt=PROMPT, max_tokens=6, temperature=0)
    ids = token_ids(tokenizer, greedy.choices[0].text)
    assert len(ids) == 6
    stopped = complete(
        openai_client,
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        extra_body={"stop_token_ids": [ids[1]]},
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == 2


def test_min_tokens_and_ignore_eos_hold_the_end_of_sequence_back(openai_client):
    short = chat(openai_client, max_tokens=30, temperature=0)
    assert short.choices[0].finish_reason == "stop"
    at_least = short.usage.completion_tokens + 4
    held = chat(openai_client, max_tokens=30, temperature=0, extra_body={"min_tokens": at_least})
    assert held.usage.completion_tokens >= at_least
    ignored = chat(openai_client, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    assert ignored.usage.completion_tokens == 30
    assert ignored.choices[0].finish_reason == "length"


def test_seed_reproduces_a_sample_at_temperature_one(openai_client):
    def sample(seed: int) -> str:
        kwargs = dict(prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=seed)
        return complete(openai_client, **kwargs).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10))


@pytest.mark.parametrize("extra", [{"top_k": 1}, {"min_p": 1.0}])
def test_top_k_and_min_p_narrow_sampling_to_the_greedy_token(openai_client, extra):
    kwargs = dict(prompt="Once upon a time", max_tokens=12)
    greedy = complete(openai_client, temperature=0, **kwargs).choices[0].text
    narrowed = complete(openai_client, temperature=1.0, seed=3, extra_body=extra, **kwargs)
    assert narrowed.choices[0].text == greedy


def test_repetition_penalty_changes_a_repetitive_continuation(openai_client):
    kwargs = dict(prompt="1, 1, 1, 1, 1, 1,", max_tokens=8, temperature=0)
    plain = complete(openai_client, **kwargs).choices[0].text
    penalised = complete(openai_client, extra_body={"repetition_penalty": 2.0}, **kwargs)
    assert penalised.choices[0].text != plain


def test_best_of_equal_to_n_returns_n_choices(openai_client):
    response = complete(openai_client, prompt=PROMPT, n=2, best_of=2, max_tokens=2, seed=1)
    assert sorted(c.index for c in response.choices) == [0, 1]


# Logprobs


def check_chat_logprobs(content, top: int) -> None:
    for token in content:
        alternatives = token.top_logprobs
        assert len(alternatives) == top
        assert [a.logprob for a in alternatives] == sorted(
            (a.logprob for a in alternatives), reverse=True
        )
        assert token.logprob <= 0
        assert token.bytes == list(token.token.encode())
        # Greedy: the chosen token is the likeliest.
        assert (alternatives[0].token, alternatives[0].logprob) == (token.token, token.logprob)


def test_chat_logprobs_and_top_logprobs_streaming_and_not(openai_client):
    kwargs = dict(max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    whole = chat(openai_client, **kwargs)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    check_chat_logprobs(content, top=3)
    streamed = [
        token
        for chunk in chat(openai_client, stream=True, **kwargs)
        for choice in chunk.choices
        if choice.logprobs is not None
        for token in choice.logprobs.content
    ]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]


def test_chat_without_logprobs_has_none(openai_client):
    response = chat(openai_client, max_tokens=2, temperature=0)
    assert response.choices[0].logprobs is None


def test_completion_logprobs_streaming_and_not(openai_client):
    kwargs = dict(prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    whole = complete(openai_client, **kwargs)
    logprobs = whole.choices[0].logprobs
    assert "".join(logprobs.tokens) == whole.choices[0].text
    assert len(logprobs.token_logprobs) == 5
    for token, logprob, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert 2 <= len(top) <= 3  # the 2 likeliest, and the chosen one
        assert top[token] == logprob == max(top.values())
    starts = [len("".join(logprobs.tokens[:i])) for i in range(5)]
    assert logprobs.text_offset == starts
    text, chunks = streamed_completion(openai_client, **kwargs)
    assert text == whole.choices[0].text
    assert [t for c in chunks for t in c.tokens] == logprobs.tokens
    assert [o for c in chunks for o in c.text_offset] == starts


def test_echo_prepends_the_prompt_streaming_and_not(openai_client):
    whole = complete(openai_client, prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    plain = complete(openai_client, prompt=PROMPT, max_tokens=3, temperature=0)
    assert whole.choices[0].text == PROMPT + plain.choices[0].text
    text, _ = streamed_completion(
        openai_client, prompt=PROMPT, max_tokens=3, temperature=0, echo=True
    )
    assert text == whole.choices[0].text


def test_prompt_scoring_returns_the_prompt_tokens_logprobs(openai_client, tokenizer):
    """echo + max_tokens 0 + logprobs: what evaluation harnesses send (loglikelihood)."""
    prompt = "Paris is the capital of France."
    kwargs = dict(prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    plain = complete(openai_client, prompt=prompt, max_tokens=1, temperature=0)
    assert plain.usage.prompt_tokens_details.cached_tokens == 0
    scored = complete(openai_client, **kwargs)
    choice = scored.choices[0]
    assert choice.text == prompt
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == scored.usage.prompt_tokens == len(token_ids(tokenizer, prompt))
    assert "".join(logprobs.tokens) == prompt
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs[1:])
    assert scored.usage.completion_tokens == 0
    assert complete(openai_client, **kwargs).choices[0].logprobs == logprobs
    # Billed: the prompt's run, plus the LM head on every prompt token but the last.
    extra_heads = (scored.usage.prompt_tokens - 1) * LM_HEAD_FLOPS
    assert scored.usage.compute["flops"] == plain.usage.compute["flops"] + extra_heads
    text, chunks = streamed_completion(openai_client, **kwargs)
    assert text == prompt
    assert [c.token_logprobs for c in chunks] == [logprobs.token_logprobs]


# Structured outputs


def test_json_schema_response_format_is_followed(openai_client):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    response = chat(
        openai_client,
        max_tokens=60,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": schema, "strict": True},
        },
    )
    value = json.loads(response.choices[0].message.content)
    assert set(value) == {"city", "population"}
    assert isinstance(value["city"], str) and isinstance(value["population"], int)


def test_json_object_response_format_streams_a_json_object(openai_client):
    pieces = [
        choice.delta.content or ""
        for chunk in chat(
            openai_client,
            max_tokens=80,
            temperature=0,
            stream=True,
            response_format={"type": "json_object"},
        )
        for choice in chunk.choices
    ]
    assert isinstance(json.loads("".join(pieces)), dict)


# Refused, out of range, ignored


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("completions", {"suffix": " end"}, "suffix"),
        ("completions", {"best_of": 2}, "best_of"),
        ("completions", {"best_of": 0}, "best_of"),
        ("completions", {"logprobs": 6}, "logprobs"),
        ("completions", {"max_tokens": 0}, "max_tokens"),
        ("completions", {"logit_bias": {"11": 101}}, "logit_bias.11"),
        ("completions", {"logit_bias": {"49152": 5}}, "logit_bias"),
        ("completions", {"stop_token_ids": [10**6]}, "stop_token_ids"),
        ("completions", {"top_k": -2}, "top_k"),
        ("completions", {"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
        ("completions", {"use_beam_search": True}, "use_beam_search"),
        ("chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("chat/completions", {"response_format": {"type": "bogus"}}, "response_format"),
        ("chat/completions", {"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
        ("chat/completions", {"function_call": {"name": "f"}}, "function_call"),
        (
            "chat/completions",
            {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "c"}]}]},
            "messages.0.tool_calls.0.function",
        ),
    ],
)
def test_unsupported_or_out_of_range_fields_are_400_naming_them(http, route, body, param):
    base = {"prompt": PROMPT} if route == "completions" else {"messages": CHAT}
    response = http.post(f"/v1/{route}", json={"model": SERVED_NAME, **base, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_fields_that_cannot_change_the_result_are_accepted(openai_client):
    kwargs = dict(max_tokens=4, temperature=0)
    plain = chat(openai_client, **kwargs)
    decorated = chat(
        openai_client,
        user="someone",
        metadata={"team": "tests"},
        store=False,
        parallel_tool_calls=False,
        tools=[],
        tool_choice="none",
        **kwargs,
    )
    assert decorated.choices[0].message.content == plain.choices[0].message.content


def test_a_refused_request_is_not_billed(openai_client, http):
    """The refusal comes before any work: no usage record, no rate-limit token."""
    before = http.get("/v1/usage", params={"limit": 1000}).json()
    with pytest.raises(openai.BadRequestError):
        complete(openai_client, prompt=PROMPT, extra_body={"stop_token_ids": [10**6]})
    assert http.get("/v1/usage", params={"limit": 1000}).json() == before
