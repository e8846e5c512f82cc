"""Tool calling through vLLM's own machinery (README, "Tool calling").

The prompt lists the tools and writes calls in the Hermes format (`<tool_call>{"name": ...,
"arguments": ...}</tool_call>`; `chat_templates/chatml_tools.jinja`, SmolLM2's ChatML, whose own
template has no tools). vLLM's Hermes parser reads the calls back, whole or as streamed deltas,
and its structural tags (xgrammar) constrain decoding: a call, once begun, names one of the
tools and its arguments follow that tool's `parameters` schema; `tool_choice` "required" or
named forces a call (of that tool); `parallel_tool_calls: false` allows one.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any

from subjective.server.errors import refused_input
from subjective.server.protocol import (
    ChatCompletionRequest,
    ChatDelta,
    FunctionCall,
    FunctionCallDelta,
    NamedToolChoice,
    ToolCall,
    ToolCallDelta,
)

PARSER = "hermes"
# vLLM's --tool-strict-level. "parameter": every call, "auto" ones too, names a given tool and
# its arguments follow the tool's schema, as if each tool were `strict` (a small model asked
# for a call otherwise writes arguments that fit no schema, till max_tokens). vLLM's default,
# "auto", constrains only forced calls, and arguments only for `strict` tools.
STRICT_LEVEL = "parameter"
TEMPLATE = (Path(__file__).parent / "chat_templates" / "chatml_tools.jinja").read_text()


def chat_template(request: ChatCompletionRequest) -> str | None:
    """Ours when the request involves tools (it writes calls as the parser reads them); None,
    the model's own, otherwise."""
    involves_tools = request.calls_tools() or any(
        message.role == "tool" or message.tool_calls for message in request.messages
    )
    return TEMPLATE if involves_tools else None


@cache
def _parser_class(tokenizer):
    from vllm.parser.parser_manager import ParserManager

    # The parser logs an unfinished call (cut by max_tokens: the client's budget, not a server
    # fault) as an error with a traceback, once per response; the response says it instead.
    logging.getLogger(f"vllm.tool_parsers.{PARSER}_tool_parser").setLevel(logging.CRITICAL)

    return ParserManager.get_parser(
        tool_parser_name=PARSER,
        enable_auto_tools=True,
        tool_strict_level=STRICT_LEVEL,
        tokenizer=tokenizer,
    )


class ToolCalling:
    """One chat request's tool calls: the decoding constraint, and a parser per choice."""

    def __init__(self, request: ChatCompletionRequest, tokenizer) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionRequest as VllmChatRequest,
        )
        from vllm.exceptions import VLLMClientError

        self._tokenizer = tokenizer
        self.named = isinstance(request.tool_choice, NamedToolChoice)
        try:
            self._request = VllmChatRequest.model_validate(_vllm_fields(request))
            self._request = self._parser().adjust_request(self._request)
        except (ValueError, VLLMClientError) as error:
            raise refused_input(error) from error

    @property
    def structured_outputs(self):
        """vLLM's constraint on the output (None: decoding is free, or shaped only by
        `response_format`)."""
        return self._request.structured_outputs

    def _parser(self):
        return _parser_class(self._tokenizer)(self._tokenizer, self._request.tools)

    def message(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A whole output's text and tool calls."""
        from vllm.renderers.chat_utils import make_tool_call_id

        _, content, calls = self._parser().parse(text, self._request, enable_auto_tools=True)
        tool_calls = [
            ToolCall(
                id=call.id or make_tool_call_id(),
                function=FunctionCall(name=call.name, arguments=call.arguments),
            )
            for call in calls or []
        ]
        return (content or None) if tool_calls else (content or ""), tool_calls

    def stream(self, prompt: list[int]) -> ToolCallStream:
        """A parser for one choice's streamed deltas."""
        return ToolCallStream(self._parser(), self._request, prompt)

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        """OpenAI's: "tool_calls" when the model stopped after calling tools, except for a
        named tool_choice ("stop")."""
        return "tool_calls" if called and reason == "stop" and not self.named else reason


class ToolCallStream:
    """Turns one choice's text deltas into content and tool-call deltas."""

    def __init__(self, parser, request, prompt: list[int]) -> None:
        self._parser = parser
        self._request = request
        self._prompt = prompt
        self.called = False

    def delta(self, text: str, token_ids: list[int], finished: bool) -> ChatDelta:
        parsed = self._parser.parse_delta(
            text, token_ids, self._request, self._prompt, finished=finished
        )
        if parsed is None:
            return ChatDelta()
        calls = [
            ToolCallDelta(
                index=call.index,
                id=call.id,
                type="function" if call.id else None,
                function=FunctionCallDelta(
                    name=call.function.name if call.function else None,
                    arguments=call.function.arguments if call.function else None,
                ),
            )
            for call in parsed.tool_calls or []
        ]
        self.called = self.called or bool(calls)
        return ChatDelta(content=parsed.content or None, tool_calls=calls or None)


def _vllm_fields(request: ChatCompletionRequest) -> dict[str, Any]:
    """What vLLM's own request needs to constrain and parse tool calls."""
    fields = request.model_dump(
        include={"model", "tools", "tool_choice", "parallel_tool_calls", "response_format"},
        by_alias=True,
        exclude_none=True,
    )
    return {**fields, "messages": [message.rendered() for message in request.messages]}
