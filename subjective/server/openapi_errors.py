"""The OpenAPI document says what the server really answers: 400 (never FastAPI's 422) for a
bad request, every error status a route can give, each an OpenAI-style `ErrorResponse`
(its schema is in the document through the generation routes), and server-sent events for
the generation routes' streams."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
DESCRIPTIONS = {
    400: "Bad request: a field's value or the JSON itself",
    401: "Missing or wrong API key",
    403: "Not allowed for this key",
    404: "No such model",
    413: "Request body too large",
    429: "Over the key's rate or FLOP budget",
    503: "Key store, ledger, journal or engine unavailable",
}


def error_statuses(path: str, method: str, operation: dict[str, Any]) -> set[int]:
    """The error statuses an operation can answer with."""
    statuses: set[int] = set()
    if operation.get("parameters") or operation.get("requestBody"):
        statuses.add(400)
    if path.startswith(("/v1/", "/admin/")):
        statuses |= {401, 503}
    if path.startswith("/admin/") or path == "/v1/usage":
        statuses.add(403)
    if method == "post" or method == "put":
        statuses |= {400, 413}
    if path.startswith("/v1/") and method == "post":
        statuses |= {404, 429}
    if path in ("/health", "/readyz"):
        statuses.add(503)
    return statuses


def document_errors(app: FastAPI) -> None:
    """Replace `app.openapi` by one documenting our errors (built once, then cached)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                if path.startswith("/v1/") and method == "post":  # with "stream": true
                    content = responses["200"].setdefault("content", {})
                    content["text/event-stream"] = {"schema": {"type": "string"}}
                for status in sorted(error_statuses(path, method, operation)):
                    responses.setdefault(
                        str(status),
                        {
                            "description": DESCRIPTIONS[status],
                            "content": {"application/json": {"schema": ERROR_REF}},
                        },
                    )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
