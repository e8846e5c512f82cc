"""Tool calling on the real server and model, with the official openai client: forced calls
(required, named, one at most) streamed and not, a tool's result sent back, the tools shown to
the model only when it may call them, and the tool rules' 400s."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.conftest import SERVED_NAME
from tests.tool_definitions import ADD, ASK, WEATHER

pytestmark = pytest.mark.vllm

TOOLS = [WEATHER, ADD]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
NAMED_ADD = {"type": "function", "function": {"name": "add"}}


def chat(client, messages=ASK, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 60, **kwargs}
    return client.chat.completions.create(model=SERVED_NAME, messages=messages, **kwargs)


def valid_calls(calls) -> list[tuple[str, dict]]:
    """(name, arguments) of each call, each held to its tool's schema."""
    parsed = []
    for call in calls:
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        parsed.append((call.function.name, arguments))
    return parsed


def streamed(client, **kwargs) -> tuple[str, list[dict], str | None]:
    """A one-choice stream's text, its tool calls put together from their pieces, and its
    finish reason."""
    text, calls, finish_reason = "", {}, None
    for chunk in chat(client, stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish_reason = choice.finish_reason or finish_reason
            for piece in choice.delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
                if piece.id:
                    assert call["id"] is None  # the id comes once, with the name
                    call["id"] = piece.id
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""
    return text, [calls[index] for index in sorted(calls)], finish_reason


def test_required_calls_one_of_the_tools_streamed_and_not(openai_client):
    response = chat(openai_client, tools=TOOLS, tool_choice="required")
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = valid_calls(choice.message.tool_calls)
    assert calls and all(call.id for call in choice.message.tool_calls)

    text, pieces, finish_reason = streamed(openai_client, tools=TOOLS, tool_choice="required")
    assert (text, finish_reason) == ("", "tool_calls")
    assert [(p["name"], json.loads(p["arguments"])) for p in pieces] == calls
    assert all(p["id"] for p in pieces)


def test_a_named_tool_choice_calls_that_tool(openai_client):
    response = chat(openai_client, tools=TOOLS, tool_choice=NAMED_ADD)
    choice = response.choices[0]
    assert choice.finish_reason == "stop"  # OpenAI's, for a named tool_choice
    [(name, _)] = valid_calls(choice.message.tool_calls)
    assert name == "add"  # though the question is about the weather
    _, pieces, finish_reason = streamed(openai_client, tools=TOOLS, tool_choice=NAMED_ADD)
    assert [p["name"] for p in pieces] == ["add"] and finish_reason == "stop"


def weather_call(call_id: str, city: str) -> dict:
    arguments = json.dumps({"city": city})
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
    }


# An earlier turn with two calls in parallel, their results and the answer: the model follows it.
TWO_CITIES = [
    {"role": "user", "content": "Weather in Rome and in Oslo?"},
    {"role": "assistant", "tool_calls": [weather_call("c1", "Rome"), weather_call("c2", "Oslo")]},
    {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
    {"role": "tool", "tool_call_id": "c2", "content": "5 C"},
    {"role": "assistant", "content": "Rome: 21 C. Oslo: 5 C."},
    {"role": "user", "content": "Weather in Paris and in Lima?"},
]


def test_parallel_tool_calls_false_allows_one_call(openai_client):
    kwargs = dict(messages=TWO_CITIES, tools=TOOLS, tool_choice="required", max_tokens=120)
    parallel = chat(openai_client, **kwargs).choices[0]
    single = chat(openai_client, parallel_tool_calls=False, **kwargs).choices[0]
    assert len(valid_calls(parallel.message.tool_calls)) > 1
    assert len(valid_calls(single.message.tool_calls)) == 1
    assert single.finish_reason == "tool_calls"


def test_a_tools_result_goes_back_to_the_model(openai_client):
    call = chat(openai_client, tools=TOOLS, tool_choice="required").choices[0].message
    history = [
        *ASK,
        call,  # the client's own message object, as OpenAI's examples send it back
        {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": '{"celsius": 18}'},
    ]
    answered = chat(openai_client, messages=history, tools=TOOLS, tool_choice="none")
    assert answered.choices[0].message.content
    assert not answered.choices[0].message.tool_calls
    without_result = chat(openai_client, messages=history[:2], tools=TOOLS, tool_choice="none")
    # The call and its result are in the prompt: the result's turn adds tokens.
    assert answered.usage.prompt_tokens > without_result.usage.prompt_tokens > len(ASK)


def test_the_tools_are_shown_to_the_model_unless_tool_choice_is_none(openai_client):
    plain = chat(openai_client, max_tokens=4).usage.prompt_tokens
    hidden = chat(openai_client, max_tokens=4, tools=TOOLS, tool_choice="none")
    shown = chat(openai_client, max_tokens=4, tools=TOOLS, tool_choice="auto")
    assert hidden.usage.prompt_tokens == plain
    assert shown.usage.prompt_tokens > plain + 50  # both signatures and the instructions
    assert hidden.choices[0].message.tool_calls is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
         "tools.0.function.parameters"),
        # A schema, but one with nothing at its $ref: vLLM cannot compile it.
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/x"}}}],
          "tool_choice": "required"}, "tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format"),
        ({"messages": [*ASK, {"role": "tool", "tool_call_id": "nope", "content": "1"}]},
         "messages"),
        ({"messages": [{"role": "user", "content": "hi", "tool_call_id": "x"}]},
         "messages.0.tool_call_id"),
        ({"messages": [{"role": "tool", "content": "1"}]}, "messages.0.tool_call_id"),
        ({"messages": [{"role": "user", "content": "hi",
                        "tool_calls": [weather_call("c", "Oslo")]}]}, "messages.0.tool_calls"),
    ],
)  # fmt: skip
def test_requests_that_break_the_tool_rules_are_400_naming_the_field(http, body, param):
    response = http.post(
        "/v1/chat/completions", json={"model": SERVED_NAME, "messages": ASK, **body}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert error["message"]
