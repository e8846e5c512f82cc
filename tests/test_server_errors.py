"""The error shape without a server: in-band stream errors, the field a client wrote, lone
surrogates (the real server's answers are in test_server_hostile.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from subjective.server.app import sse_stream
from subjective.server.errors import APIError, client_param, lone_surrogate


async def events_of(source: AsyncIterator[str]) -> list[str]:
    return [event async for event in sse_stream(source)]


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (
            APIError(400, "bad stop", param="stop"),
            {"message": "bad stop", "type": "invalid_request_error", "param": "stop", "code": None},
        ),
        (
            APIError(503, "gone", code="engine_dead"),
            {"message": "gone", "type": "server_error", "param": None, "code": "engine_dead"},
        ),
    ],
)
def test_a_stream_error_has_the_error_response_shape(raised: APIError, expected: dict) -> None:
    async def failing() -> AsyncIterator[str]:
        yield "data: {}\n\n"
        raise raised

    events = asyncio.run(events_of(failing()))
    assert events[0] == "data: {}\n\n"
    assert json.loads(events[1].removeprefix("data: ")) == {"error": expected}
    assert events[2] == "data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("location", "body", "expected"),
    [
        (("body", "stop", "str"), {"stop": 5}, ("stop", 1)),
        (("body", "stop", "list[str]", 1), {"stop": ["a", ""]}, ("stop.1", 2)),
        (
            ("body", "messages", 0, "content"),
            {"messages": [{"role": "user"}]},
            ("messages.0.content", 3),
        ),  # noqa: E501
        (("body", "logit_bias", "abc", "[key]"), {"logit_bias": {"abc": 1}}, ("logit_bias.abc", 2)),
        (("body", "model"), {}, ("model", 1)),
        (("body",), [], (None, 0)),
    ],
)
def test_client_param_follows_the_body(location, body, expected) -> None:
    assert client_param(location, body) == expected


def test_lone_surrogates_are_found_with_their_path() -> None:
    assert lone_surrogate({"messages": [{"content": "ok"}, {"content": "x\ud800"}]}) == (
        "messages.1.content"
    )
    assert lone_surrogate({"metadata": {"\udc00": "v"}}) == "metadata"
    assert lone_surrogate({"text": "a pair is fine: \U0001f600"}) is None
