"""The OpenAI API's features on a served model other than the dense one (gated, hybrid): each
returns what it should, through the official client. The dense model's own tests hold the
details (tests/test_server_openai_fields.py, tests/test_server_tool_calls.py)."""

from __future__ import annotations

import json

import jsonschema
import openai

from tests.tool_definitions import ASK, CITY, WEATHER

# Long enough for the gates to skip tokens (the first ones, sinks, always run).
SCORED = (
    "The Python tutorial introduces the basic concepts and features of the language and "
    "its standard library, with examples that a reader can type into the interpreter."
)


def check_openai_features(
    client: openai.OpenAI, model: str, scoring_quality: str | None = None, fluent: bool = True
):
    """Chat logprobs, a JSON schema and a named tool call (streamed and not) at the server's
    default quality, then prompt scoring at `scoring_quality`; returns prompt scoring's
    `usage.compute` (what it billed). A model that is not `fluent` (an untrained conversion)
    may run out of tokens inside the JSON: then only what guided decoding forces is held."""
    chat = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    tokens = chat.choices[0].logprobs.content
    assert len(tokens) == chat.usage.completion_tokens
    assert all(len(token.top_logprobs) == 2 for token in tokens)

    shaped = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}},
    ).choices[0]  # fmt: skip
    check_json(shaped.message.content, shaped.finish_reason, fluent)

    named = {"type": "function", "function": {"name": "get_weather"}}
    kwargs = dict(model=model, messages=ASK, max_tokens=40, temperature=0, tools=[WEATHER])
    called = client.chat.completions.create(**kwargs, tool_choice=named).choices[0]
    if called.message.tool_calls or fluent:
        [call] = called.message.tool_calls
        assert call.function.name == "get_weather"
        check_json(call.function.arguments, called.finish_reason, fluent)
    else:  # cut inside the arguments: the call's envelope was forced all the same
        assert called.message.content.startswith('<tool_call>\n{"name": "get_weather"')
        assert called.finish_reason == "length"
    names, arguments, finish_reason = "", "", None
    for chunk in client.chat.completions.create(**kwargs, tool_choice=named, stream=True):
        for choice in chunk.choices:
            finish_reason = choice.finish_reason or finish_reason
            for piece in choice.delta.tool_calls or []:
                names += piece.function.name or ""
                arguments += piece.function.arguments or ""
    assert names == "get_weather"
    check_json(arguments, finish_reason, fluent)

    scored = client.completions.create(
        model=model, prompt=SCORED, max_tokens=0, echo=True, logprobs=1,
        extra_body={"quality": scoring_quality} if scoring_quality else {},
    )  # fmt: skip
    logprobs = scored.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None
    assert len(logprobs.token_logprobs) == scored.usage.prompt_tokens
    assert all(value <= 0 for value in logprobs.token_logprobs[1:])
    assert scored.usage.completion_tokens == 0
    return scored.usage.compute


def check_json(text: str, finish_reason: str, fluent: bool) -> None:
    """`text` is a CITY object, unless a model that is not fluent ran out of tokens."""
    if fluent or finish_reason != "length":
        jsonschema.validate(json.loads(text), CITY)
    else:
        assert text.lstrip().startswith("{")
