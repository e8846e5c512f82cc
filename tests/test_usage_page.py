"""GET /usage in headless Chromium (Debian's `chromium`, driven by Playwright) against the real
test server: the page renders what /v1/usage says, per key and for an admin, and a bad key gets
a clear message. Set SUBJECTIVE_UPDATE_SCREENSHOTS=1 to refresh docs/usage-page.png."""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from importlib.resources import files
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import SERVED_NAME
from tests.processes import REPO, debian_executable

# Debian's /usr/bin/chromium is a shell wrapper; Playwright drives the browser binary itself.
CHROMIUM = Path("/usr/lib/chromium/chromium")
SCREENSHOT = REPO / "docs" / "usage-page.png"
COUNTS = ("requests", "prompt_tokens", "completion_tokens", "flops", "dense_flops")


def test_the_page_ships_in_the_package() -> None:
    static = files("subjective.server") / "static"
    for name in ("usage.html", "usage.js", "usage.css"):
        text = (static / name).read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text  # nothing from a CDN


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    debian_executable("chromium", "chromium")
    with sync_playwright() as playwright:
        # --no-sandbox: the tests may run as root, where Chromium's sandbox refuses to start.
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


def nanos_text(nanos: int) -> str:
    return format(Decimal(nanos).scaleb(-9), ".9f")


def sums(rows: list[dict], by: str | None = None) -> dict[str, dict[str, int]]:
    """Per UTC day (by=None) or per `by` field: the counts and price_nanos of `rows`."""
    groups: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNTS, 0))
    for row in rows:
        totals = groups[row[by] if by else row["finished_at"][:10]]
        totals["requests"] += 1
        for field in (*COUNTS[1:], "price_nanos"):
            totals[field] = totals.get(field, 0) + row[field]
    return dict(groups)


def open_usage(browser, server: str, key: str):
    """A fresh tab on /usage with `key` submitted; returns (page, the /v1/usage it read)."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []  # uncaught exceptions in the page's script
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{server}/usage")
    page.fill("#key", key)
    with page.expect_response(lambda r: "/v1/usage" in r.url) as usage:
        page.click("button[type=submit]")
    response = usage.value
    # A selector, not a script: the page's CSP forbids evaluating strings.
    page.wait_for_selector("#report:not([hidden]), #message:not([hidden])")
    page.errors = errors
    return page, response


def cells(row) -> dict[str, str]:
    return {
        td.get_attribute("data-field"): td.get_attribute("data-value")
        for td in row.query_selector_all("td[data-field]")
    }


@pytest.mark.vllm
def test_usage_page_shows_what_v1_usage_says(
    browser,
    server: str,
    openai_client: openai.OpenAI,
    user_secret: str,
    bootstrap_admin_secret: str,
    tmp_path: Path,
) -> None:
    for prompt in ("1, 2, 3,", "The capital of France is"):
        openai_client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=4)

    page, response = open_usage(browser, server, user_secret)
    assert response.status == 200 and not page.errors, page.errors
    # The same request, from outside the browser: the page shows exactly this.
    usage = httpx.get(
        response.url, headers={"authorization": f"Bearer {user_secret}"}, timeout=30
    ).json()
    assert usage == response.json() and usage["totals"]["requests"] >= 2
    totals = usage["totals"]
    shown = {
        el.get_attribute("data-total"): el.get_attribute("data-value")
        for el in page.query_selector_all("[data-total]")
    }
    assert {f: int(shown[f]) for f in COUNTS} == {f: totals[f] for f in COUNTS}
    assert shown["price"] == nanos_text(totals["price_nanos"])
    ratio = 1 - totals["flops"] / totals["dense_flops"]
    assert float(shown["saved_ratio"]) == pytest.approx(ratio, abs=1e-12)
    days = {
        row.get_attribute("data-day"): cells(row)
        for row in page.query_selector_all("#days-table tbody tr")
    }
    expected = sums(usage["data"])
    assert set(days) == set(expected)
    for day, day_sums in expected.items():
        assert {f: int(days[day][f]) for f in COUNTS} == {f: day_sums[f] for f in COUNTS}
        assert days[day]["price"] == nanos_text(day_sums["price_nanos"])
    assert len(page.query_selector_all("#charts figure svg")) == 5
    assert page.query_selector_all("#charts rect.executed")  # bars drawn
    assert page.is_hidden("#admin")  # a plain key sees only itself
    # The key stays in the tab: session storage, never local storage or the address.
    assert page.evaluate("sessionStorage.getItem('subjective-api-key')") == user_secret
    assert page.evaluate("localStorage.length") == 0 and user_secret not in page.url
    page.close()

    admin_page, admin_response = open_usage(browser, server, bootstrap_admin_secret)
    assert admin_response.status == 200 and not admin_page.errors, admin_page.errors
    assert admin_page.is_visible("#admin")
    everyone = admin_response.json()["data"]
    spenders = {
        row.get_attribute("data-key"): cells(row)
        for row in admin_page.query_selector_all("#spenders-table tbody tr")
    }
    per_key = sums(everyone, by="api_key_id")
    user_id = usage["data"][0]["api_key_id"]
    assert user_id in spenders and set(spenders) <= set(per_key)
    for key_id, shown_sums in spenders.items():
        assert int(shown_sums["requests"]) == per_key[key_id]["requests"]
        assert shown_sums["price"] == nanos_text(per_key[key_id]["price_nanos"])
    prices = [Decimal(s["price"]) for s in spenders.values()]
    assert prices == sorted(prices, reverse=True)
    shot = tmp_path / "usage-page.png"
    admin_page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("SUBJECTIVE_UPDATE_SCREENSHOTS"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
    admin_page.close()


@pytest.mark.vllm
def test_usage_page_explains_a_bad_key(browser, server: str) -> None:
    page, response = open_usage(browser, server, "sk-subj-key_0000000000000000.not-a-real-secret")
    assert response.status == 401
    message = page.inner_text("#message")
    assert page.is_visible("#message") and "not accepted" in message
    assert "Incorrect API key provided" in message  # the server's own words
    assert page.is_hidden("#report")
    assert page.evaluate("sessionStorage.getItem('subjective-api-key')") is None
    headers = httpx.get(f"{server}/usage", timeout=30).headers
    assert "script-src 'self'" in headers["content-security-policy"]
    page.close()
