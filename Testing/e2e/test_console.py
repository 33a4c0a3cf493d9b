"""The web console in a real browser: headless Chromium (Debian's `chromium` package, driven by
playwright through `executable_path`, never a downloaded browser) against the real gunicorn +
gevent gateway with PostgreSQL, Redis and the fake OpenAI upstream.

Set CONSOLE_SCREENSHOTS=<dir> to keep the screenshots of every page (docs/screenshots is where
the documentation's come from: `CONSOLE_SCREENSHOTS=docs/screenshots pytest Testing/e2e/test_console.py`).
"""
from __future__ import annotations

import http.client
import os
import shutil
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Iterator

import pytest

from Testing.conftest import wait_for_rows
from Testing.fakes.fake_openai import expected_content
from Testing.support import SYSTEM_SECRET, http_json, wait_until
from app.services.usage_service import UsageEvent, UsageWriter

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 800}
SECRET = {"X-System-Secret": SYSTEM_SECRET}
UI_TIMEOUT_MS = 20_000

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed "
                                 "(scripts/test.sh installs it)")]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def new_page(browser, gateway):
    """new_page(viewport=DESKTOP, dark=False) -> a page of a fresh browser context (its own
    sessionStorage); the script errors of the page are collected in `page.errors`."""
    contexts: list = []

    def make(viewport: dict = DESKTOP, dark: bool = False):
        return context_page(browser, contexts, gateway.base_url, viewport, dark)
    yield make
    for context in contexts:
        context.close()


def context_page(browser, contexts: list, base_url: str, viewport: dict = DESKTOP, dark: bool = False):
    """A page of a fresh browser context on `base_url` (the context is added to `contexts`, for
    the caller to close); its script and CSP errors are collected in `page.errors`."""
    context = browser.new_context(viewport=viewport, base_url=base_url,
                                  color_scheme="dark" if dark else "light")
    context.set_default_timeout(UI_TIMEOUT_MS)
    contexts.append(context)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" and "Content Security" in m.text
            else None)
    return page


def mint(gateway, **fields) -> dict:
    fields.setdefault("tenant", "console-team")
    status, _, body = http_json("POST", gateway.base_url + "/v1/api-keys", fields, SECRET)
    assert status == 201, body
    return body


def bearer(key: dict) -> dict:
    return {"Authorization": f"Bearer {key['key']}"}


def ready(page, name: str) -> None:
    page.wait_for_selector(f"main[data-ready='{name}']")


def sign_in(page, token: str, secret: bool = False, path: str = "/ui/") -> None:
    page.goto(path)
    ready(page, "sign-in")
    if secret:
        page.check("#kind-secret")
    page.fill("#token", token)
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("#sign-out")


def sign_in_as_operator(page, path: str) -> None:
    """Sign in with the system secret on `path` and wait for that page."""
    sign_in(page, SYSTEM_SECRET, secret=True, path=path)
    ready(page, path.removeprefix("/ui/"))


def goto(page, path: str) -> None:
    page.goto(path)
    ready(page, path.removeprefix("/ui/"))


def shot(page, name: str, tmp_path: Path) -> Path:
    """A full-page screenshot (kept under $CONSOLE_SCREENSHOTS when set); the page never scrolls
    sideways at its width (tables scroll inside their own box) and every form field has a label."""
    width = page.viewport_size["width"]
    assert page.evaluate("document.documentElement.scrollWidth") <= width, f"{name} is wider than {width} px"
    assert page.evaluate("""Array.from(document.querySelectorAll('input, select, textarea'))
        .filter(el => !el.labels.length && !el.getAttribute('aria-label')).map(el => el.id)""") == [], \
        f"{name}: form fields without a label"
    path = tmp_path / f"{name}.png"
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("CONSOLE_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    return path


# --- pages, headers, sign-in -------------------------------------------------------------------

def test_console_urls_answer_with_a_strict_content_security_policy(gateway):
    """/, /ui, /playground lead to the console; every console answer (pages and assets) carries a
    CSP allowing scripts and styles from the gateway only, never inline."""
    for path in ("/ui", "/ui/", "/ui/playground", "/ui/admin/keys", "/ui/assets/console/app.js",
                 "/ui/assets/vendor/chart.js/chart.umd.min.js"):
        status, headers, _ = http_json("GET", gateway.base_url + path)
        assert status == 200, path
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "style-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
    for path, target in (("/", "/ui/"), ("/playground", "/ui/playground"), ("/dashboard", "/ui/usage")):
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 302 and resp.getheader("Location").endswith(target), path
        conn.close()
    status, _, body = http_json("GET", gateway.base_url + "/v1/nothing-here")
    assert status == 404 and body["error"]["code"] == "not_found"  # the API keeps its JSON 404


def test_sign_in_is_kept_in_session_storage_only_and_forgotten_on_sign_out(new_page, gateway, clean_db):
    """A wrong key gets a readable refusal; a good one signs in (nothing in localStorage or
    cookies); signing out forgets it."""
    key = mint(gateway, name="reader")
    page = new_page()
    page.goto("/ui/")
    ready(page, "sign-in")
    page.fill("#token", "sk-not-a-real-key")
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("#sign-in .message.error")
    assert "Not accepted" in page.inner_text("#sign-in .message.error")
    page.fill("#token", key["key"])
    page.click("#sign-in button[type=submit]")
    ready(page, "playground")
    assert page.evaluate("Object.keys(localStorage).length") == 0
    assert page.context.cookies() == []
    assert key["key"] in page.evaluate("JSON.stringify(sessionStorage)")
    page.click("#sign-out")
    ready(page, "sign-in")
    assert page.evaluate("sessionStorage.length") == 0
    assert page.errors == []


# --- playground --------------------------------------------------------------------------------

def ask_side_by_side(page, model: str, model_b: str, prompt: str) -> None:
    page.check("#compare")
    page.select_option("#model", model)
    page.select_option("#model-b", model_b)
    page.fill("#prompt", prompt)
    page.click("#send")


def answer_text(page, column: int = 0) -> str:
    return page.locator(f".column[data-column='{column}'] .answer").last.inner_text()


def test_playground_streams_progressively_and_stop_records_client_disconnected(new_page, gateway, clean_db):
    """The answer grows piece by piece (several intermediate states, each a prefix of the full
    answer); Stop ends it; the usage row says client_disconnected and the page shows it."""
    key = mint(gateway, name="streamer")
    page = new_page()
    sign_in(page, key["key"])
    page.select_option("#model", "slow-chunks-600")
    prompt = "tell me a long story please"
    page.fill("#prompt", prompt)
    page.click("#send")
    full = expected_content([{"role": "user", "content": prompt}], 600)
    states: list[str] = []

    def seen_enough() -> bool:
        text = answer_text(page)
        if text and (not states or text != states[-1]):
            assert full.startswith(text), text
            states.append(text)
        return len(states) >= 4
    wait_until(seen_enough, timeout=30, interval=0.02, message="four intermediate states of the answer")
    assert len(states[0]) < len(states[1]) < len(states[2]) < len(states[3]) < len(full)
    assert page.is_enabled("#stop") and not page.is_enabled("#send")
    page.click("#stop")
    page.wait_for_selector(".turn[data-outcome='stopped']")
    stopped_text = answer_text(page)
    assert full.startswith(stopped_text) and len(stopped_text) < len(full)
    [row] = wait_for_rows(clean_db, 1, "api_key_id = :k", {"k": key["id"]}, timeout=15)
    assert row["status"] == "client_disconnected" and row["model"] == "slow-chunks-600"
    page.wait_for_selector(".answer-status:has-text('recorded as client_disconnected')")
    assert answer_text(page) == stopped_text  # nothing arrived after Stop
    assert page.is_enabled("#send") and not page.is_enabled("#stop")


def test_playground_settings_metrics_multi_turn_and_side_by_side(new_page, gateway, clean_db, fake_upstream):
    """System prompt, temperature and max tokens reach the upstream; the answer shows its first-token
    time, tokens and billed cost; the second turn carries the first; side by side asks two models."""
    key = mint(gateway, name="chatter")
    page = new_page()
    sign_in(page, key["key"])
    page.select_option("#model", "slow")
    page.fill("#system-prompt", "Be brief.")
    page.fill("#temperature", "0.3")
    page.fill("#max-tokens", "12")
    marker = uuid.uuid4().hex[:8]
    page.fill("#prompt", f"hello {marker}")
    page.press("#prompt", "Control+Enter")
    page.wait_for_selector(".turn[data-outcome='done'] [data-metric='cost']:not(:has-text('—')):not(:has-text('recording'))")
    first = [{"role": "user", "content": f"hello {marker}"}]
    assert answer_text(page) == expected_content(first, 12)
    assert page.inner_text(".turn .answer-status") == "done (max tokens reached)"
    metric = lambda name: page.locator(f".turn >> nth=0 >> [data-metric='{name}']").inner_text()  # noqa: E731
    assert (metric("tokens-in"), metric("tokens-out"), metric("cost")) == ("11", "12", "$0.00000885")
    assert metric("ttft").endswith(" ms") or metric("ttft").endswith(" s")
    [sent] = [r["body"] for r in fake_upstream.chat_requests() if marker in str(r["body"]["messages"])]
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, *first]
    assert (sent["temperature"], sent["max_tokens"], sent["stream"]) == (0.3, 12, True)

    page.fill("#prompt", "and again")
    page.click("#send")
    wait_until(lambda: page.locator(".turn[data-outcome='done']").count() == 2, message="the second answer")
    again = [r["body"] for r in fake_upstream.chat_requests() if "and again" in str(r["body"]["messages"])][-1]
    assert again["messages"] == [{"role": "system", "content": "Be brief."}, *first,
                                 {"role": "assistant", "content": expected_content(first, 12)},
                                 {"role": "user", "content": "and again"}]

    page.fill("#max-tokens", "")
    ask_side_by_side(page, "gpt-4o-mini", "chunks-3", "compare us")
    wait_until(lambda: page.locator(".turn[data-outcome='done']").count() == 2, message="both answers")
    msgs = [{"role": "user", "content": "compare us"}]
    assert answer_text(page, 0) == expected_content(msgs, 20)
    assert answer_text(page, 1) == expected_content(msgs, 3)
    assert page.inner_text(".column[data-column='1'] .column-model") == "chunks-3"
    assert page.errors == []


def test_keyboard_only_sign_in_and_chat_and_readable_errors(new_page, gateway, clean_db):
    """Sign in, move to a page and chat with the keyboard alone (focus starts in the key field;
    Enter submits; Tab reaches the menu; Ctrl+Enter sends; Esc stops); a provider's failure and a
    refused admin call are shown as sentences, not a blank page."""
    key = mint(gateway, name="typist", role="admin")
    page = new_page()
    page.goto("/ui/")
    ready(page, "sign-in")
    page.keyboard.type(key["key"])
    page.keyboard.press("Enter")
    ready(page, "playground")
    page.keyboard.press("Tab")  # the skip link comes first
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    for _ in range(20):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == "My key":
            break
    page.keyboard.press("Enter")
    ready(page, "key")
    goto(page, "/ui/playground")
    page.select_option("#model", "fail-401")
    page.focus("#prompt")
    page.keyboard.type("hello")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector(".turn[data-outcome='error']")
    assert page.inner_text(".answer .message.error").startswith("Provider failed: The gateway's credentials for this "
                                                                 "provider were refused")
    page.select_option("#model", "slow-chunks-600")
    page.focus("#prompt")
    page.keyboard.type("a long one")
    page.keyboard.press("Control+Enter")
    wait_until(lambda: len(answer_text(page)) > 0, message="the answer to start")
    page.keyboard.press("Escape")
    page.wait_for_selector(".turn[data-outcome='stopped']")
    goto(page, "/ui/admin/keys")
    page.fill("#mint-name", "too-fast")
    page.fill("#mint-rpm_limit", "99999999999")
    page.click("#mint")
    error = page.inner_text("#main .message.error")
    assert error.startswith("Bad request: Invalid value for 'rpm_limit'") and error.endswith("(field: rpm_limit)")
    goto(page, "/ui/admin/tenants")  # a tenant admin sees its own tenant, read only
    assert page.inner_text("#own-tenant h2") == "console-team" and page.locator("#own-tenant button").count() == 0
    assert page.errors == []


# --- usage dashboard ---------------------------------------------------------------------------

def seed_usage(engine, key: dict) -> None:
    """Three days of October 2026 for `key` (two models), written like the gateway writes them."""
    rows = [("2026-10-01T09:00:00", "gpt-4o-mini", 100, 50, "0.25"),
            ("2026-10-01T15:30:00", "demo", 10, 5, "0.5"),
            ("2026-10-03T08:00:00", "gpt-4o-mini", 200, 100, "1.125")]
    UsageWriter(engine).write([UsageEvent(
        request_id=f"req_seed_{key['id']}_{i}", tenant_id=key["tenant_id"], api_key_id=key["id"], model=model,
        provider="openai", prompt_tokens=p, completion_tokens=c, cost_usd=Decimal(cost), latency_ms=300 + i,
        ttft_ms=40 + i, streamed=True, created_at=datetime.fromisoformat(at).replace(tzinfo=timezone.utc))
        for i, (at, model, p, c, cost) in enumerate(rows)])


def show_october(page) -> None:
    show_period(page, "2026-10-01", "2026-10-04")


def show_period(page, first_day: str, last_day: str) -> None:
    """Set the dashboard's period and wait until it has loaded it."""
    page.fill("#start", first_day)
    page.fill("#end", last_day)
    before = page.get_attribute("main", "data-loaded")
    page.click("#apply")
    page.wait_for_function("b => document.querySelector('main').dataset.loaded !== b", arg=before)


def chart_data(page, canvas: str) -> dict:
    return page.evaluate("""id => { const c = Chart.getChart(id);
        return {labels: c.data.labels, data: c.data.datasets.map(d => d.data)}; }""", canvas)


def test_dashboard_charts_and_totals_show_the_seeded_usage(new_page, gateway, clean_db):
    """The spend and token charts plot the seeded days (the chart library's own data), the totals
    and the per-model table equal /v1/usage, the requests table lists the rows newest first, and
    the CSV download holds the day totals."""
    key = mint(gateway, name="spender")
    seed_usage(clean_db, key)
    page = new_page()
    sign_in(page, key["key"], path="/ui/usage")
    ready(page, "usage")
    show_october(page)
    assert chart_data(page, "spend-chart") == {"labels": ["2026-10-01", "2026-10-02", "2026-10-03", "2026-10-04"],
                                               "data": [[0.75, 0, 1.125, 0]]}
    assert chart_data(page, "tokens-chart")["data"] == [[110, 0, 200, 0], [55, 0, 100, 0]]
    status, _, usage = http_json("GET", gateway.base_url + "/v1/usage?start=2026-10-01T00:00:00Z"
                                 "&end=2026-10-05T00:00:00Z", headers=bearer(key))
    assert status == 200
    assert (usage["requests"], usage["total_tokens"], usage["cost_usd"]) == (3, 465, "1.875")
    total = lambda name: page.inner_text(f"[data-total='{name}']")  # noqa: E731
    assert (total("requests"), total("total_tokens"), total("cost_usd")) == ("3", "465", "$1.875")
    model_rows = page.locator("#breakdown-model tbody tr").evaluate_all(
        "rows => rows.map(r => Array.from(r.cells, c => c.textContent))")
    assert model_rows == [["demo", "1", "15", "$0.5"], ["gpt-4o-mini", "2", "450", "$1.375"]]
    by_model = http_json("GET", gateway.base_url + "/v1/usage?group_by=model&start=2026-10-01T00:00:00Z"
                         "&end=2026-10-05T00:00:00Z", headers=bearer(key))[2]["data"]
    assert [[r["model"], str(r["requests"]), str(r["total_tokens"]), f"${r['cost_usd']}"] for r in by_model] == model_rows
    ids = [page.locator("#requests tbody tr").nth(i).get_attribute("data-request-id") for i in range(3)]
    assert ids == [f"req_seed_{key['id']}_{i}" for i in (2, 1, 0)]
    assert page.is_disabled("#older")
    with page.expect_download() as download:
        page.click("#csv-day")
    path = download.value.path()
    assert download.value.suggested_filename == "usage_2026-10-01_2026-10-05_by_day.csv"
    assert Path(path).read_text().splitlines() == [
        "day,requests,prompt_tokens,completion_tokens,total_tokens,cost_usd,cache_hits,saved_cost_usd",
        "2026-10-01,2,110,55,165,0.75,0,0", "2026-10-03,1,200,100,300,1.125,0,0"]
    assert page.errors == []


def test_requests_table_pages_older_and_newer(new_page, gateway, clean_db):
    """23 requests on one day: 20 on the first page, Older shows the last 3, Newer the first 20 again."""
    key = mint(gateway, name="pager")
    start = datetime(2026, 9, 10, 8, 0, tzinfo=timezone.utc)
    UsageWriter(clean_db).write([UsageEvent(
        request_id=f"req_page_{key['id']}_{i:02d}", tenant_id=key["tenant_id"], api_key_id=key["id"],
        model="gpt-4o-mini", prompt_tokens=1, completion_tokens=1, created_at=start.replace(minute=i))
        for i in range(23)])
    page = new_page()
    sign_in(page, key["key"], path="/ui/usage")
    ready(page, "usage")
    show_period(page, "2026-09-10", "2026-09-10")
    ids = lambda: page.locator("#requests tbody tr").evaluate_all("rows => rows.map(r => r.dataset.requestId)")  # noqa: E731
    assert ids() == [f"req_page_{key['id']}_{i:02d}" for i in range(22, 2, -1)]
    page.click("#older")
    page.wait_for_selector("#requests tbody tr >> nth=2")
    wait_until(lambda: len(ids()) == 3, message="the second page")
    assert ids() == [f"req_page_{key['id']}_{i:02d}" for i in (2, 1, 0)]
    assert page.is_disabled("#older") and page.is_enabled("#newer")
    page.click("#newer")
    wait_until(lambda: len(ids()) == 20, message="the first page again")
    assert ids()[0] == f"req_page_{key['id']}_22" and page.is_disabled("#newer")


# --- administration ----------------------------------------------------------------------------

def row_of(page, key_id: int):
    return page.locator(f"tr[data-key-id='{key_id}']")


def test_admin_mints_edits_rotates_and_revokes_a_key_and_the_api_agrees(new_page, gateway, clean_db):
    """Through the Keys page: mint (the secret shown once works), edit a limit and the response
    cache, rotate without grace (the old secret stops, the new works), revoke (the secret stops);
    the API shows each change."""
    page = new_page()
    sign_in_as_operator(page, "/ui/admin/keys")
    page.fill("#mint-name", "minted-in-browser")
    page.fill("#mint-tenant", "browser-team")
    page.fill("#mint-rpm_limit", "7")
    page.select_option("#mint-cache", "on")
    page.click("#mint")
    secret = page.inner_text("#new-secret")
    assert secret.startswith("sk-")
    status, _, listed = http_json("GET", gateway.base_url + "/v1/api-keys?tenant=browser-team", headers=SECRET)
    [key] = listed["data"]
    assert (key["name"], key["rpm_limit"], key["role"], key["cache"]) == ("minted-in-browser", 7, "member", True)
    assert http_json("GET", gateway.base_url + "/v1/key", headers={"Authorization": f"Bearer {secret}"})[0] == 200
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.click("#copy-secret")
    page.wait_for_selector(".secret-line [role=status]:has-text('Copied')")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    page.click("#dismiss-secret")
    assert page.locator("#new-secret").count() == 0  # shown once: gone from the page

    assert row_of(page, key["id"]).locator("td[data-label=Cache]").inner_text() == "on"
    row_of(page, key["id"]).locator("[data-action=edit]").click()
    assert page.input_value("#edit-cache") == "on"
    page.fill("#edit-rpm_limit", "9")
    page.fill("#edit-budget", "12.50")
    page.select_option("#edit-cache", "off")
    page.click("#save-key")
    wait_until(lambda: http_json("GET", f"{gateway.base_url}/v1/api-keys/{key['id']}", headers=SECRET)[2]
               ["rpm_limit"] == 9, message="the edited limit")
    edited = http_json("GET", f"{gateway.base_url}/v1/api-keys/{key['id']}", headers=SECRET)[2]
    assert (edited["budget_usd"], edited["cache"]) == ("12.5", False)

    row_of(page, key["id"]).locator("[data-action=rotate]").click()
    page.fill("#grace", "0")
    page.click("#confirm-rotate")
    page.wait_for_selector("#new-secret")
    rotated = page.inner_text("#new-secret")
    assert rotated.startswith("sk-") and rotated != secret
    wait_until(lambda: http_json("GET", gateway.base_url + "/v1/key",
                                 headers={"Authorization": f"Bearer {secret}"})[0] == 401, message="old secret refused")
    assert http_json("GET", gateway.base_url + "/v1/key", headers={"Authorization": f"Bearer {rotated}"})[0] == 200

    revoke = row_of(page, key["id"]).locator("[data-action=revoke]")
    revoke.click()
    assert revoke.inner_text() == "Confirm revoke"
    revoke.click()
    page.wait_for_selector(".message.info:has-text('Revoked')")
    assert http_json("GET", f"{gateway.base_url}/v1/api-keys/{key['id']}", headers=SECRET)[2]["revoked_at"]
    wait_until(lambda: http_json("GET", gateway.base_url + "/v1/key",
                                 headers={"Authorization": f"Bearer {rotated}"})[0] == 401, message="revoked")
    assert row_of(page, key["id"]).locator("[data-action]").count() == 0
    goto(page, "/ui/playground")  # the system secret is not a key: the playground says so
    assert "cannot call models" in page.inner_text("#secret-no-playground")
    assert page.errors == []


def test_operator_creates_edits_and_suspends_a_tenant_and_the_api_agrees(new_page, gateway, clean_db):
    """Through the Tenants page: create with a budget and key limits, edit the budget, suspend
    (its keys stop working), reactivate; each change is what GET /v1/tenants/<id> says."""
    page = new_page()
    sign_in_as_operator(page, "/ui/admin/tenants")
    page.fill("#tenant-name", "made-in-browser")
    page.fill("#new-tenant-budget", "40")
    page.fill("#new-tenant-rpm_limit", "120")
    page.click("#create-tenant")
    page.wait_for_selector(".message.info:has-text('Created tenant')")
    [tenant] = [t for t in http_json("GET", gateway.base_url + "/v1/tenants", headers=SECRET)[2]["data"]
                if t["name"] == "made-in-browser"]
    assert (tenant["budget_usd"], tenant["key_limits"]["rpm_limit"], tenant["status"]) == ("40", 120, "active")
    key = mint(gateway, name="tenant-key", tenant="made-in-browser")
    row = page.locator(f"tr[data-tenant-id='{tenant['id']}']")
    row.locator("[data-action=edit]").click()
    page.fill("#edit-tenant-budget", "55.5")
    page.click("#save-tenant")
    page.wait_for_selector(".message.info:has-text('Saved')")
    tenant_now = lambda: http_json("GET", f"{gateway.base_url}/v1/tenants/{tenant['id']}", headers=SECRET)[2]  # noqa: E731
    assert tenant_now()["budget_usd"] == "55.5"
    row.locator("[data-action=suspend]").click()
    page.wait_for_selector(".message.info:has-text('Suspended')")
    assert tenant_now()["status"] == "suspended"
    wait_until(lambda: http_json("GET", gateway.base_url + "/v1/key", headers=bearer(key))[0] == 401,
               message="the suspended tenant's key refused")
    row.locator("[data-action=activate]").click()
    page.wait_for_selector(".message.info:has-text('Reactivated')")
    assert tenant_now()["status"] == "active"
    assert page.errors == []


def test_member_sees_no_admin_page_and_its_admin_calls_are_refused(new_page, gateway, clean_db):
    """A member's menu has no admin page; opening one by URL says it is not allowed and loads no
    data; the same calls made directly from the page with the member's key get 403."""
    key = mint(gateway, name="just-a-member")
    page = new_page()
    sign_in(page, key["key"])
    assert page.locator("#nav a").all_inner_texts() == ["Playground", "My key", "Usage", "Metrics"]
    for path in ("/ui/admin/keys", "/ui/admin/tenants", "/ui/admin/audit", "/ui/admin/providers"):
        goto(page, path)
        assert "member key" in page.inner_text("#not-allowed")
        assert page.locator("table").count() == 0
    statuses = page.evaluate("""async () => {
        const token = JSON.parse(sessionStorage.getItem('llm-gateway-console')).token;
        const call = (method, path, body) => fetch(path, {method, headers: {Authorization: `Bearer ${token}`,
            'Content-Type': 'application/json'}, body: body && JSON.stringify(body)}).then(r => r.status);
        return [await call('GET', '/v1/api-keys'), await call('POST', '/v1/api-keys', {name: 'x'}),
                await call('GET', '/v1/tenants'), await call('GET', '/v1/audit'),
                await call('POST', '/v1/tenants', {name: 'x'})];
    }""")
    assert statuses == [403, 403, 403, 403, 403]


XSS_TENANT = '<img src=x onerror="window.__xss=1">tenant'
XSS_KEY = "<script>window.__xss=2</script><b>key</b>"


def test_names_with_html_and_script_are_shown_as_text(new_page, gateway, clean_db):
    """A tenant and a key named with HTML and <script> show those characters on every page that
    lists them (keys, tenants, usage, the header), and nothing runs or renders as markup."""
    key = mint(gateway, name=XSS_KEY, tenant=XSS_TENANT)
    seed_usage(clean_db, key)
    admin = new_page()
    sign_in_as_operator(admin, "/ui/admin/keys")
    cells = admin.locator(f"tr[data-key-id='{key['id']}'] td").all_text_contents()
    assert XSS_KEY in cells and XSS_TENANT in cells
    goto(admin, "/ui/admin/tenants")
    assert XSS_TENANT in admin.locator("#tenant-list td").all_text_contents()
    goto(admin, "/ui/usage")
    show_october(admin)
    assert XSS_KEY in admin.locator("#breakdown-key td").all_text_contents()
    assert XSS_TENANT in admin.locator("#breakdown-tenant td").all_text_contents()
    member = new_page()
    sign_in(member, key["key"])
    assert XSS_KEY in member.inner_text(".who-name")
    goto(member, "/ui/key")
    for page in (admin, member):
        assert page.evaluate("window.__xss") is None
        assert page.evaluate("document.querySelectorAll('main img, main script, main b, header b').length") == 0
        assert page.errors == []


# --- every page at desktop and phone width -----------------------------------------------------

def test_every_page_at_desktop_and_phone_width(new_page, gateway, clean_db, tmp_path):
    """Each page renders at 1280 px and 375 px without sideways scrolling and without script or
    CSP errors (the screenshots in docs/ come from here), and in dark mode."""
    admin = mint(gateway, name="team-lead", tenant="research", role="admin", rpm_limit=60, tpm_limit=100000,
                 daily_token_limit=2000000, max_concurrent=10, budget_usd="25")
    member = mint(gateway, name="analyst", tenant="research", rpm_limit=30, budget_usd="5")
    seed_usage(clean_db, member)
    http_json("PATCH", f"{gateway.base_url}/v1/tenants/{admin['tenant_id']}", {"budget_usd": "100"}, SECRET)
    http_json("POST", gateway.base_url + "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "warm up"}]}, bearer(admin))
    for viewport, suffix in ((DESKTOP, "desktop"), (PHONE, "phone")):
        page = new_page(viewport)
        page.goto("/ui/")
        ready(page, "sign-in")
        shot(page, f"sign-in-{suffix}", tmp_path)
        sign_in(page, admin["key"])
        page.fill("#system-prompt", "Answer in one sentence.")
        ask_side_by_side(page, "gpt-4o-mini", "demo", "Say hello to the console")
        wait_until(lambda: page.locator(".turn[data-outcome='done'] [data-metric='cost']:has-text('$')").count() == 2,
                   message="both answers billed")
        shot(page, f"playground-{suffix}", tmp_path)
        goto(page, "/ui/key")
        shot(page, f"my-key-{suffix}", tmp_path)
        goto(page, "/ui/usage")
        show_october(page)
        shot(page, f"usage-{suffix}", tmp_path)
        goto(page, "/ui/admin/providers")
        page.click("#probe")
        page.wait_for_selector("#probe-result table")
        shot(page, f"providers-{suffix}", tmp_path)
        assert page.errors == []
        system = new_page(viewport)
        sign_in_as_operator(system, "/ui/admin/keys")
        shot(system, f"keys-{suffix}", tmp_path)
        for path, name in (("/ui/admin/tenants", "tenants"), ("/ui/admin/audit", "audit")):
            goto(system, path)
            shot(system, f"{name}-{suffix}", tmp_path)
        assert system.errors == []
    dark = new_page(DESKTOP, dark=True)
    sign_in(dark, member["key"], path="/ui/usage")
    ready(dark, "usage")
    show_october(dark)
    shot(dark, "usage-dark", tmp_path)
    assert dark.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(15, 20, 26)"
