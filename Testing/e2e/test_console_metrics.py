"""The console's Metrics page (GET /api/metrics) in a real browser: headless Debian chromium
driven by playwright (as in test_console.py) against gateways of its own, so the figures start
at zero: one with a metrics token (the system secret opens it, a key is refused until the token
is typed on the page) and one with METRICS_ENABLED=0.

`CONSOLE_SCREENSHOTS=docs/screenshots` keeps the page's screenshots (docs/console.md shows them).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import openai
import pytest

from Testing.conftest import app_config, wait_for_rows
from Testing.e2e.test_console import (CHROMIUM, DESKTOP, PHONE, SECRET, browser,  # noqa: F401
                                      context_page, mint, ready, shot, sign_in, sign_in_as_operator)
from Testing.support import GatewayProcess, http_json, wait_until

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason="Debian's chromium is not installed (scripts/test.sh installs it)")]

TOKEN = "console-metrics-token-0123"
MESSAGES = [{"role": "user", "content": "hello"}]


def start_gateway(pg_url, models_file, log_dir, workers: int, **settings: str) -> GatewayProcess:
    mp_dir = log_dir / "prometheus"
    mp_dir.mkdir()
    env = {k: str(v) for k, v in app_config(pg_url, models_file, LOG_LEVEL="INFO").items()}
    env.update(PROMETHEUS_MULTIPROC_DIR=str(mp_dir), **settings)
    return GatewayProcess(env, workers=workers, log_path=log_dir / "gunicorn.log").start()


@pytest.fixture(scope="module")
def metered(pg_url, models_file, tmp_path_factory) -> Iterator[GatewayProcess]:
    """A 2-worker gateway of this module only (its counters start at zero), with a metrics token."""
    proc = start_gateway(pg_url, models_file, tmp_path_factory.mktemp("metered"), 2, METRICS_TOKEN=TOKEN)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def unmetered(pg_url, models_file, tmp_path_factory) -> Iterator[GatewayProcess]:
    """A 1-worker gateway with METRICS_ENABLED=0 (/api/metrics answers 404)."""
    proc = start_gateway(pg_url, models_file, tmp_path_factory.mktemp("unmetered"), 1, METRICS_ENABLED="0")
    yield proc
    proc.stop()


@pytest.fixture
def open_page(browser):  # noqa: F811
    """open_page(gateway, viewport=DESKTOP) -> a page of a fresh context on that gateway; its
    script and CSP errors are collected in `page.errors`."""
    contexts: list = []

    def make(gw: GatewayProcess, viewport: dict = DESKTOP):
        return context_page(browser, contexts, gw.base_url, viewport)
    yield make
    for context in contexts:
        context.close()


def api_metrics(gw) -> dict:
    status, _, body = http_json("GET", gw.base_url + "/api/metrics", headers=SECRET)
    assert status == 200, body
    return body


def settled(gw, requests: int) -> None:
    """Wait until every worker's figures of `requests` runs are in the shared files and the
    usage writers have nothing queued (the ticker refreshes those gauges every few seconds)."""
    wait_until(lambda: (lambda m: m["totals"]["requests"] == requests and m["usage_writer"]["rows_queued"] == 0)(
        api_metrics(gw)), timeout=30, message=f"/api/metrics to count {requests} requests and no queued row")


def text(page, selector: str) -> str:
    return page.inner_text(selector).strip()


def cells(page, selector: str) -> list[str]:
    return page.locator(f"{selector} td").all_inner_texts()


def test_metrics_page_shows_the_gateways_requests_models_tokens_and_refusals(metered, clean_db, open_page, tmp_path):
    """After 3 completions of gpt-4o-mini and 1 of demo (two keys), and one more refused by a
    key's rpm limit, the operator's Metrics page shows 4 requests, the tokens in and out, the
    cost, a row per model and per provider with their figures, the rpm refusal and no usage
    row queued; the page refreshes by itself (a fifth completion appears without a click),
    pauses while the tab is hidden, and fits a phone's width."""
    key = mint(metered, name="metrics-reader")
    limited = mint(metered, name="metrics-limited", rpm_limit=1)
    client = openai.OpenAI(base_url=metered.base_url + "/v1", api_key=key["key"], max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    slow = openai.OpenAI(base_url=metered.base_url + "/v1", api_key=limited["key"], max_retries=0)
    slow.chat.completions.create(model="demo", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError):
        slow.chat.completions.create(model="demo", messages=MESSAGES)
    wait_for_rows(clean_db, 4)
    settled(metered, 4)

    page = open_page(metered)
    sign_in_as_operator(page, "/ui/metrics")
    total = lambda name: text(page, f"[data-total='{name}']")  # noqa: E731
    assert [total(n) for n in ("requests", "errors", "input_tokens", "output_tokens", "cost_usd", "cache_hits")] == \
        ["4", "0", "32", "124", "$0.000066", "0"]
    assert cells(page, "tr[data-model='gpt-4o-mini']")[:6] == ["gpt-4o-mini", "3", "0", "24", "60", "$0.0000396"]
    assert cells(page, "tr[data-model='demo']")[:6] == ["demo", "1", "0", "8", "64", "$0.0000264"]
    assert cells(page, "tr[data-provider='openai']")[:5] == ["openai", "3", "0", "24", "60"]
    assert cells(page, "tr[data-provider='simulator']")[:5] == ["simulator", "1", "0", "8", "64"]
    assert cells(page, "tr[data-refusal='rpm']") == ["rpm (requests per minute)", "1"]
    hour = cells(page, "tr[data-window='last_hour']")  # the gateway is younger than an hour: all of it
    assert [hour[0], hour[2], hour[4], hour[5], hour[6], hour[8]] == ["Last hour", "4", "0", "32", "124", "$0.000066"]
    assert cells(page, "tr[data-window='last_minute']")[0] == "Last minute"
    assert text(page, "[data-writer='rows_queued']") == "0"
    shot(page, "console-metrics", tmp_path)

    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    page.wait_for_selector("[data-total='requests']:text-is('5')", timeout=30_000)  # no click: the page refreshed
    assert cells(page, "tr[data-model='gpt-4o-mini']")[:5] == ["gpt-4o-mini", "4", "0", "32", "80"]
    assert page.get_attribute(".metrics-toolbar", "data-refresh") == "on"
    page.evaluate("""() => { Object.defineProperty(document, 'visibilityState', {value: 'hidden', configurable: true});
        document.dispatchEvent(new Event('visibilitychange')); }""")
    assert page.get_attribute(".metrics-toolbar", "data-refresh") == "paused"
    assert text(page, "#metrics-updated").endswith("Paused while the tab is hidden.")
    before = page.get_attribute("main", "data-loaded")
    page.evaluate("""() => { Object.defineProperty(document, 'visibilityState', {value: 'visible', configurable: true});
        document.dispatchEvent(new Event('visibilitychange')); }""")
    page.wait_for_function("b => document.querySelector('main').dataset.loaded !== b", arg=before)
    assert page.get_attribute(".metrics-toolbar", "data-refresh") == "on"
    assert page.errors == []

    phone = open_page(metered, PHONE)
    sign_in_as_operator(phone, "/ui/metrics")
    assert text(phone, "[data-total='requests']") == "5"
    shot(phone, "console-metrics-phone", tmp_path)
    assert phone.errors == []


def test_a_key_is_refused_until_the_metrics_token_is_typed(metered, clean_db, open_page):
    """On a gateway with METRICS_TOKEN a key does not open /api/metrics: the page says why (and
    keeps the sign-in); a wrong token is refused; the right one, typed on the page, shows the
    figures and is stored nowhere."""
    key = mint(metered, name="curious-member")
    page = open_page(metered)
    sign_in(page, key["key"], path="/ui/metrics")
    ready(page, "metrics")
    assert text(page, "#metrics-locked") == ("This gateway protects its metrics with a token (METRICS_TOKEN), which "
                                             "your key does not open. Sign in with the system secret, or enter the "
                                             "metrics token below.")
    assert page.get_attribute(".metrics-toolbar", "data-refresh") == "off"
    page.fill("#metrics-token", "not-the-token")
    page.click("#use-metrics-token")
    page.wait_for_selector("#metrics-locked:text-is('That metrics token was not accepted.')")
    page.fill("#metrics-token", TOKEN)
    page.click("#use-metrics-token")
    page.wait_for_selector("[data-total='requests']")
    assert page.locator("#metrics-locked").count() == 0
    assert TOKEN not in page.evaluate("JSON.stringify(sessionStorage) + JSON.stringify(localStorage)")
    assert page.locator("#sign-out").count() == 1  # still signed in with the key
    assert page.errors == []


def test_metrics_turned_off_says_so(unmetered, clean_db, open_page):
    """With METRICS_ENABLED=0 the page says metrics are off (the API's 404), shows no figure and
    does not keep asking."""
    page = open_page(unmetered)
    sign_in_as_operator(page, "/ui/metrics")
    assert text(page, "#metrics-off") == ("Metrics are turned off on this gateway (METRICS_ENABLED=0): it counts "
                                          "nothing, so there is nothing to show. The usage page still shows what was "
                                          "billed.")
    assert page.locator("[data-total]").count() == 0
    assert page.get_attribute(".metrics-toolbar", "data-refresh") == "off"
    assert page.errors == []
