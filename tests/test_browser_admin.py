"""The admin pages a new user looks at first, in headless Chromium: readable figures, no raw JSON, no errors.

gunicorn and a real Celery worker on a test database (fixtures from test_browser.py). Every page is
loaded with console errors and failed requests collected (the missing favicon was one on every page).
Screenshots go to test-output/browser/.
"""

from __future__ import annotations

import re

import pytest
from test_browser import CHROMIUM_ARGS, SCREENSHOTS, chromium_path, web_server  # noqa: F401  (fixtures)
from web_fixtures import ADMIN_NAME, ADMIN_PASSWORD

pytestmark = pytest.mark.browser

ISO_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d")


def _record_failed_request(request, problems: list[str]) -> None:
    """A request the browser cancelled because the page navigated away (the favicon still loading when
    the test calls `goto`) is not a fault of the page; every other network failure is."""
    failure = request.failure or ""
    if "ERR_ABORTED" not in failure:
        problems.append(f"request failed: {request.url} ({failure})")


def test_first_hour_admin_pages(loaded_db, start_worker, web_server, chromium_path):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    from recsys.platform.auth import create_admin_user

    create_admin_user(ADMIN_NAME, ADMIN_PASSWORD, loaded_db)
    start_worker(loaded_db, pool="solo")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("requestfailed", lambda r: _record_failed_request(r, problems))
            page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)

            page.goto(f"{web_server}/admin/login")
            page.fill("input[name=username]", ADMIN_NAME)
            page.fill("input[name=password]", ADMIN_PASSWORD)
            page.click("button:has-text('Log in')")
            expect(page.locator("h1")).to_have_text("Dashboard")

            # A recommendation with the explain box as the form sets it (ticked): grounded reasons per item.
            page.goto(f"{web_server}/admin/customers/15781")
            expect(page.locator("#recommend input[name=explain]")).to_be_checked()
            page.fill("#recommend input[name=query]", "BAG CHARM")
            page.fill("#recommend input[name=k]", "3")
            page.select_option("#recommend select[name=ranker]", "copurchase")
            page.click("#recommend button[type=submit]")
            result = page.locator("#result table.result tbody")
            expect(result).to_contain_text("COPPER AND BRASS BAG CHARM", timeout=90_000)
            expect(result.locator("ul.reasons li").first).to_contain_text("matches 'BAG CHARM'")
            expect(page.locator("#ranking-note")).to_contain_text("retrieval order")
            page.screenshot(path=SCREENSHOTS / "11-explained-recommendation.png", full_page=True)

            page.click("text=job details")
            info = page.locator("#ranker-info")
            expect(info).to_be_visible()
            assert "{" not in info.inner_text() and page.locator("pre.raw:has-text('history_items')").count() == 0
            page.screenshot(path=SCREENSHOTS / "12-job-ranker-info.png", full_page=True)

            page.goto(f"{web_server}/admin/jobs")
            headers = page.locator("#jobs thead").inner_text().lower()
            assert "duration" in headers and "error" in headers
            first_row = page.locator("#jobs tbody tr").first
            expect(first_row).to_contain_text(re.compile(r"\d+(\.\d+)? (ms|s)\b"))
            assert not ISO_TIMESTAMP.search(page.locator("#jobs").inner_text())

            page.goto(f"{web_server}/admin/")
            expect(page.locator("#jobs-per-minute")).to_be_visible()
            assert "jobs per second" not in page.content()
            assert not ISO_TIMESTAMP.search(page.locator("main").inner_text())
            charts = page.locator("figure.chart svg")
            expect(charts).to_have_count(3)
            expect(page.locator("figure.chart svg circle").first).to_be_attached()
            page.screenshot(path=SCREENSHOTS / "13-dashboard-charts.png", full_page=True)

            page.goto(f"{web_server}/admin/products/22224")
            expect(page.locator("#sales")).to_contain_text("customers")
            expect(page.locator("#bought-together")).to_be_visible()
            page.screenshot(path=SCREENSHOTS / "14-product.png", full_page=True)

            page.goto(f"{web_server}/admin/evaluation")
            expect(page.locator("#no-evaluation")).to_contain_text("recsys eval")
        finally:
            browser.close()
    assert problems == []
