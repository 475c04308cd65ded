"""The discover admin page in headless Chromium: need → grouped result → "purchased" → replacement shown.

gunicorn and a real Celery worker (with the tiny random-weight model as its LLM) on a test database.
Screenshots go to test-output/browser/.
"""

from __future__ import annotations

import pytest
from support.discover import tiny_llm_folder  # noqa: F401  (fixture)
from test_browser import CHROMIUM_ARGS, SCREENSHOTS, chromium_path, web_server  # noqa: F401  (fixtures)
from web_fixtures import ADMIN_NAME, ADMIN_PASSWORD

pytestmark = pytest.mark.browser


def test_need_result_purchase_and_replacement(loaded_db, start_worker, web_server, chromium_path,  # noqa: F811
                                              tiny_llm_folder):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    from recsys.platform.auth import create_admin_user

    create_admin_user(ADMIN_NAME, ADMIN_PASSWORD, loaded_db)
    start_worker(loaded_db, pool="solo", RECSYS_LLM_MODEL=tiny_llm_folder)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(f"{web_server}/admin/login")
            page.fill("input[name=username]", ADMIN_NAME)
            page.fill("input[name=password]", ADMIN_PASSWORD)
            page.click("button:has-text('Log in')")
            page.click("nav >> text=Discover")
            expect(page.locator("h1")).to_have_text("Discover")

            page.fill("#discover input[name=need]", "a gift for someone who loves bags")
            page.fill("#discover input[name=customer_id]", "15781")
            page.click("#discover button[type=submit]")
            group = page.locator(".discover-group").first
            expect(group.locator("tbody tr")).to_have_count(3, timeout=120_000)
            page.screenshot(path=SCREENSHOTS / "discover-01-result.png", full_page=True)

            first_row = group.locator("tbody tr").first
            bought = first_row.get_attribute("data-stock-code")
            first_row.locator("button:has-text('purchased')").click()
            expect(page.locator(".flash.info")).to_contain_text(f"Recorded the purchase of {bought}")
            expect(page.locator(".flash.info")).to_contain_text("now shows")
            expect(group.locator(f"tbody tr[data-stock-code='{bought}']")).to_have_count(0)
            expect(group.locator(f".replaced[data-stock-code='{bought}']")).to_be_visible()
            expect(group.locator("tbody tr")).to_have_count(3)
            page.screenshot(path=SCREENSHOTS / "discover-02-replaced.png", full_page=True)
        finally:
            browser.close()
