"""Tool calling without a server: the chat template, the request's rules, and vLLM's Hermes
parser and structural tags as `ToolCalling` drives them (the real ones, on SmolLM2's tokenizer)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from subjective.server.protocol import ChatCompletionRequest, ChatDelta
from subjective.server.tool_calls import TEMPLATE, ToolCalling, chat_template
from tests.tool_definitions import ADD, ASK, WEATHER

CALLED = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 18}'},
]
TWO_CALLS = (
    "Let me check. <tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": ASK, **fields})


def rendered(tokenizer, body: ChatCompletionRequest, template: str | None) -> str:
    return tokenizer.apply_chat_template(
        [message.rendered() for message in body.messages],
        tools=[tool.model_dump(exclude_none=True) for tool in body.tools or []] or None,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=True,
    )


@pytest.mark.parametrize(
    "messages",
    [
        ASK,
        [{"role": "system", "content": "Be brief."}, *ASK],
        [*ASK, {"role": "assistant", "content": "Mild."}, {"role": "user", "content": "Sure?"}],
    ],
)
def test_without_tools_the_template_renders_as_the_models_own(tokenizer, messages):
    body = request(messages=messages)
    assert chat_template(body) is None  # the model's own is used
    assert rendered(tokenizer, body, TEMPLATE) == rendered(tokenizer, body, None)


def test_tools_calls_and_results_are_rendered_in_the_hermes_format(tokenizer):
    body = request(
        messages=[{"role": "system", "content": "Be brief."}, *CALLED], tools=[WEATHER, ADD]
    )
    assert chat_template(body) == TEMPLATE
    text = rendered(tokenizer, body, TEMPLATE)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert text.count("<|im_start|>system") == 1
    for tool in (WEATHER, ADD):
        assert json.dumps(tool) in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>\n'
    ) in text
    assert '<|im_start|>user\n<tool_response>\n{"celsius": 18}\n</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_a_whole_output_gives_its_text_and_calls(tokenizer):
    tools = ToolCalling(request(tools=[WEATHER, ADD]), tokenizer)
    content, calls = tools.message(TWO_CALLS)
    assert content == "Let me check. "
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("add", {"a": 2, "b": 3}),
    ]
    assert len({c.id for c in calls}) == 2
    assert tools.message("It is mild.") == ("It is mild.", [])
    assert tools.finish_reason("stop", called=True) == "tool_calls"
    assert tools.finish_reason("length", called=True) == "length"
    assert tools.finish_reason("stop", called=False) == "stop"


def test_streamed_deltas_add_up_to_the_whole_outputs_calls(tokenizer):
    tools = ToolCalling(request(tools=[WEATHER, ADD]), tokenizer)
    stream = tools.stream(prompt=[1, 2, 3])
    ids = tokenizer.encode(TWO_CALLS, add_special_tokens=False)
    deltas = [
        stream.delta(tokenizer.decode([token]), [token], finished=i == len(ids) - 1)
        for i, token in enumerate(ids)
    ]
    content = "".join(d.content or "" for d in deltas)
    calls: dict[int, dict] = {}
    for piece in (call for d in deltas for call in d.tool_calls or []):
        call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
        if piece.id is not None:
            assert call["id"] is None and piece.type == "function"  # once, in the first piece
            call["id"] = piece.id
        call["name"] += piece.function.name or ""
        call["arguments"] += piece.function.arguments or ""
    whole_content, whole_calls = tools.message(TWO_CALLS)
    assert content == whole_content  # no piece of the markup leaks into the text
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole_calls
    ]
    assert all(c["id"] for c in calls.values())
    assert stream.called
    assert ChatDelta() not in deltas[:3]  # plain text before the tag streams at once


def tag(tools: ToolCalling) -> dict:
    return json.loads(tools.structured_outputs.structural_tag)["format"]


def test_the_decoding_constraint_follows_tool_choice(tokenizer):
    auto = tag(ToolCalling(request(tools=[WEATHER, ADD]), tokenizer))
    assert auto["type"] == "triggered_tags" and auto["triggers"] == ["<tool_call>"]
    assert not auto["stop_after_first"]
    one = tag(ToolCalling(request(tools=[WEATHER, ADD], parallel_tool_calls=False), tokenizer))
    assert one["stop_after_first"]
    required = tag(ToolCalling(request(tools=[WEATHER, ADD], tool_choice="required"), tokenizer))
    assert required["at_least_one"]
    assert all('"get_weather"' in t["begin"] or '"add"' in t["begin"] for t in required["tags"])
    add = {"type": "function", "function": {"name": "add"}}
    named = ToolCalling(request(tools=[WEATHER, ADD], tool_choice=add), tokenizer)
    assert named.named
    assert all('"add"' in t["begin"] for t in tag(named)["tags"])
    # Arguments follow each tool's schema, strict or not.
    schemas = [t["content"]["json_schema"] for t in required["tags"]]
    assert WEATHER["function"]["parameters"] in schemas


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "required",
          "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [*ASK, {"role": "tool", "tool_call_id": "x", "content": "1"}]}, "messages"),
        ({"messages": [*CALLED[:2], {"role": "tool", "content": "1"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "hi", "tool_call_id": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": None}]}, "messages"),
        ({"messages": [{**CALLED[1], "tool_calls": [{
            "id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
         "messages"),
    ],
)  # fmt: skip
def test_requests_that_break_the_tool_rules_are_refused(fields, where):
    with pytest.raises(ValidationError) as raised:
        request(**fields)
    assert raised.value.errors()[0]["loc"][0] == where
