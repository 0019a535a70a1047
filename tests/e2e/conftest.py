"""The console in a real browser: Debian's headless Chromium driven by Playwright (sync
API), against a live Stagegate server (tests/live.py) on the test database, with the
demo model behind it.

The browser is the system one (/usr/bin/chromium, installed by .ci/run with apt),
never one downloaded by ``playwright install``. Without it, or without the playwright
package, every test here is skipped with the reason, so ``make test`` passes on a
machine that has neither.

Each test gets a fresh browser context (no cookies, no storage) and a ``Console``: its
page signs in through /console/login/, accepts confirmation dialogs, and records every
console error, uncaught exception and Content-Security-Policy violation, which the
fixture asserts are none when the test ends.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# STAGEGATE_E2E_CHROMIUM names another Chromium binary (on a machine without Debian's).
CHROMIUM = Path(os.environ.get("STAGEGATE_E2E_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# The longest any single browser step may wait (navigation, a selector): generous
# for a loaded CI machine, far below pytest's patience.
STEP_TIMEOUT_MS = 15_000
PLAYWRIGHT_MISSING = importlib.util.find_spec("playwright") is None
# Fills window.__cspViolations before any page script runs (init scripts are injected
# by the browser, not subject to the page's CSP).
CSP_LISTENER = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(event.violatedDirective + " " + (event.blockedURI || "inline"));
});
"""

DUPLICATE_IDS = """(() => { const seen = new Set(), twice = new Set();
  for (const e of document.querySelectorAll("[id]")) {
    if (seen.has(e.id)) twice.add(e.id); seen.add(e.id); }
  return [...twice]; })()"""


def pytest_collection_modifyitems(config, items):
    reason = None
    if PLAYWRIGHT_MISSING:
        reason = "playwright is not installed (pip install -e '.[test]')"
    elif not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    if reason is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.skip(reason=f"browser tests skipped: {reason}"))


@pytest.fixture
def browser():
    """Chromium for one test: the browser, and the asyncio loop Playwright's sync API
    runs in this thread, last no longer than the test. (Module-scoped, the loop outlived
    the e2e tests whenever pytest-django ran other modules' tests between them, and
    every later test that used asyncio or the ORM failed.)"""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


@pytest.fixture(autouse=True)
def _django_beside_playwright(monkeypatch):
    """Playwright's sync API keeps an asyncio loop running in this thread (in another
    greenlet), so Django would refuse the tests' ORM calls as if made from async code.
    Set per test, after the module's server started, so the server never sees it."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@dataclass
class Console:
    """One browser tab on the console of ``base_url``, with its errors recorded."""

    page: object
    base_url: str
    errors: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base_url + path

    def goto(self, path: str):
        response = self.page.goto(self.url(path))
        assert response is not None and response.ok, f"{path}: {response and response.status}"
        self.check_ids()
        return response

    def check_ids(self) -> None:
        """Record ids used twice on the page: a label's ``for`` and a field's error then
        point at the wrong element for screen readers and for Playwright alike."""
        twice = self.page.evaluate(DUPLICATE_IDS)
        if twice:
            self.errors.append(f"{self.page.url}: ids used more than once: {twice}")

    def sign_in(self, username: str, password: str | None = None) -> None:
        """Through the login form, as a person would; lands on the page after it."""
        self.page.goto(self.url("/console/login/"))
        self.page.get_by_label("Username").fill(username)
        self.page.get_by_label("Password").fill(password or f"{username}-pass-9137")
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_url(lambda url: "/console/login/" not in url)

    def sign_out(self) -> None:
        self.page.get_by_role("button", name="Sign out").click()
        self.page.wait_for_url(lambda url: "/console/login/" in url)

    def record(self, message) -> None:
        """A console message, kept when it is an error or a warning. The browser's own
        request for /favicon.ico (the console declares no icon) is not the page's."""
        if message.type not in ("error", "warning"):
            return
        source = message.location.get("url", "")
        if source.endswith("/favicon.ico"):
            return
        self.errors.append(f"console {message.type}: {message.text} ({source})")

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and CSP violations seen so far."""
        with contextlib.suppress(Exception):
            self.check_ids()
        found = list(self.errors)
        with contextlib.suppress(Exception):  # the page is closed or mid-navigation
            found += [
                f"CSP violation: {v}" for v in self.page.evaluate("window.__cspViolations || []")
            ]
        return found


@pytest.fixture
def console(browser, proxy_server):
    context = browser.new_context(
        base_url=proxy_server.url, viewport={"width": 1366, "height": 900}
    )
    context.set_default_timeout(STEP_TIMEOUT_MS)
    context.add_init_script(CSP_LISTENER)
    page = context.new_page()
    tab = Console(page=page, base_url=proxy_server.url)
    page.on("console", tab.record)
    page.on("pageerror", lambda error: tab.errors.append(f"uncaught: {error}"))
    page.on("dialog", lambda dialog: dialog.accept())
    yield tab
    problems = tab.problems()
    context.close()
    assert problems == [], "the browser reported errors:\n" + "\n".join(problems)


@pytest.fixture
def artifacts_dir() -> Path | None:
    """Where to write screenshots for the docs, when STAGEGATE_E2E_SCREENSHOTS names
    a directory; None otherwise."""
    target = os.environ.get("STAGEGATE_E2E_SCREENSHOTS")
    return Path(target) if target else None
