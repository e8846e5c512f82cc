"""Cheap refusals before a request's body is read.

An ASGI middleware, so it runs before FastAPI reads and parses the body:
- a body over the configured size is a 413: at once when its Content-Length says so,
  otherwise as soon as the bytes read pass the limit;
- routes that need a key (`/v1/*`, `/admin/*`) authenticate first (401 without reading
  the body), and a key already over its requests per minute gets its 429 there too, before
  any parsing or tokenising. The request is counted against the rate only once it is valid
  and admitted (`Authenticator.admit`).
The identified key is left in the request's state for the routes' `caller` dependency.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from subjective.server.errors import APIError, BodyTooLarge, error_response

KEYED_PREFIXES = ("/v1/", "/admin/")
STATE_KEY = "api_key"


class AdmissionGate:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check_declared_size(scope)
            if scope["path"].startswith(KEYED_PREFIXES):
                await self._identify(scope)
        except APIError as error:
            response = error_response(
                error.status, error.message, code=error.code, param=error.param,
                headers=error.headers,
            )  # fmt: skip
            await response(scope, receive, send)
            return
        await self.app(scope, self._limited(receive), send)

    def _check_declared_size(self, scope: Scope) -> None:
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            too_large = BodyTooLarge(self.max_body_bytes)
            raise APIError(413, too_large.detail, code=too_large.code)

    async def _identify(self, scope: Scope) -> None:
        authenticator = scope["app"].state.service.authenticator
        key = await authenticator.identify(Headers(scope=scope).get("authorization"))
        if scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            await authenticator.check_rate(key)
        scope.setdefault("state", {})[STATE_KEY] = key

    def _limited(self, receive: Receive) -> Receive:
        """`receive`, failing with 413 once the body read passes the limit (chunked bodies
        declare no length)."""
        seen = 0
        limit = self.max_body_bytes

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        return limited
