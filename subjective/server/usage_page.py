"""`GET /usage`: a page where a key holder sees their usage as charts and a table.

Static files shipped in the package (no build step, nothing from a CDN): the page's script
reads `/v1/usage` with the key pasted into it (and `/admin/v1/threshold`, to learn whether it
is an admin key), which stays in the tab (sessionStorage) and goes only into those requests'
Authorization header. The Content-Security-Policy allows
only this origin, so nothing else can be loaded or sent anywhere.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_PACKAGE = ("subjective.server", "static")
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def install_usage_page(app: FastAPI) -> None:
    """Serve the page at /usage and its script and style under /usage/static/."""
    page = (files(STATIC_PACKAGE[0]) / STATIC_PACKAGE[1] / "usage.html").read_text()

    @app.get("/usage", include_in_schema=False)
    async def usage_page() -> HTMLResponse:
        return HTMLResponse(page, headers=SECURITY_HEADERS)

    app.mount("/usage/static", StaticFiles(packages=[STATIC_PACKAGE]), name="usage-static")
