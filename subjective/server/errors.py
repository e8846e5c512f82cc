"""OpenAI-style errors: every failure answers `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from subjective.server.protocol import UNSUPPORTED, ErrorBody, ErrorResponse

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


# nginx's "client closed request": what is logged for a request whose client left.
CLIENT_GONE = 499


class ClientGone(Exception):
    """The client of a non-streamed request disconnected before its answer."""


class BodyTooLarge(HTTPException):
    """A body over the server's limit, found while it is read (FastAPI lets an HTTPException
    raised there through; any other error would become a 400)."""

    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        message = f"The request body is larger than this server accepts ({limit} bytes)."
        super().__init__(413, message)


class APIError(Exception):
    """Raised by handlers; answered as an OpenAI-style error with this status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers


def refused_input(error: Exception) -> APIError:
    """vLLM's refusal of a request's input (a ValueError or a VLLMClientError, with the
    `parameter` it names when it knows it) as a 400."""
    message = str(error.args[0] if error.args else error)
    return APIError(400, message, param=getattr(error, "parameter", None))


def engine_dead_error() -> APIError:
    """vLLM's engine core (or its worker) died: nothing more can run in this process."""
    return APIError(
        503,
        "The inference engine stopped; this server is exiting to be restarted. Retry shortly.",
        code="engine_dead",
    )


def error_body(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> ErrorResponse:
    """The OpenAI error object for a status: in a JSON response, or in-band in a stream."""
    return ErrorResponse(
        error=ErrorBody(
            message=message,
            type=ERROR_TYPES.get(status, "invalid_request_error"),
            param=param,
            code=code,
        )
    )


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(status, message, code=code, param=param)
    return AsciiJSONResponse(body.model_dump(), status_code=status, headers=headers)


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error quoting the client's text (a model name with a
    lone surrogate, say) still encodes."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value: object, path: tuple[str, ...] = ()) -> str | None:
    """The path (`messages.0.content`) of the first string in a parsed JSON body that holds a
    lone UTF-16 surrogate (JSON allows `"\\ud800"`; no text encoding does), else None."""
    if isinstance(value, str):
        return ".".join(path) or "body" if _LONE_SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _LONE_SURROGATE.search(key):
                return ".".join(path) or "body"
            if found := lone_surrogate(item, (*path, key)):
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            if found := lone_surrogate(item, (*path, str(index))):
                return found
    return None


async def text_is_encodable(request: Request) -> None:
    """Dependency of the routes that take a JSON body: 400 for a lone surrogate anywhere in it.

    Runs before the body's validation; the body is parsed once (Starlette caches it)."""
    try:
        body = await request.json()
    except ValueError:
        return  # not JSON: the body's validation answers that
    if (param := lone_surrogate(body)) is not None:
        raise APIError(
            400, f"'{param}' holds a lone UTF-16 surrogate: not valid text.", param=param
        )


def client_param(location: Sequence[str | int], body: object) -> tuple[str | None, int]:
    """The field as the client wrote it (`messages.0.content`), and how deep it reaches.

    Pydantic's error locations add the union member tried (`stop.list[str].0`) and `[key]`
    for dict keys; following the location through the body keeps only what is really in it
    (and a missing field's own name, last)."""
    names: list[str] = []
    node = body
    parts = list(location[1:] if location[:1] == ("body",) else location)
    for position, part in enumerate(parts):
        listed = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if listed or (isinstance(node, dict) and part in node):
            node = node[part]
        elif isinstance(node, dict) and position == len(parts) - 1:
            node = None  # missing: the name the client left out
        else:
            continue
        names.append(str(part))
    return ".".join(names) or None, len(names)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    # The error that reaches deepest into the body names the field best (a union's errors
    # include one per member tried, most of them about the wrong member).
    located = [(client_param(e.get("loc", ()), exc.body), e) for e in exc.errors()]
    (param, _), first = max(located, key=lambda item: item[0][1])
    kind = first.get("type")
    if kind == "json_invalid":
        return "The request body is not valid JSON.", None
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if kind == UNSUPPORTED:
        return str(first.get("msg")), param
    prefix = f"Invalid value for '{param}': " if param else ""
    return prefix + str(first.get("msg", "invalid request")), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(
            exc.status, exc.message, code=exc.code, param=exc.param, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = BodyTooLarge.code if isinstance(exc, BodyTooLarge) else None
        return error_response(exc.status_code, str(exc.detail), code=code, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=CLIENT_GONE)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "The server failed to process the request.")
