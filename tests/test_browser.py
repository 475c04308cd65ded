"""End to end in headless Chromium: gunicorn + a real Celery worker on a test database.

Logs in, searches the catalog, opens customer 15781 and asks for "BAG CHARM"; the ranked
result must appear on the page once the worker has run the job. Screenshots go to
test-output/browser/.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import free_port, worker_env
from web_fixtures import ADMIN_NAME, ADMIN_PASSWORD

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-output" / "browser"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture
def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed (make browser-deps)")
    return path


@pytest.fixture
def web_server(loaded_db, tmp_path):
    """gunicorn serving the app against the test database; yields its base URL."""
    import requests

    from recsys.cli.web import gunicorn_argv

    port = free_port()
    env = worker_env(loaded_db, RECSYS_SECRET_KEY="browser-test-secret")
    log = open(tmp_path / "gunicorn.log", "ab")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(gunicorn_argv(loaded_db.with_(web_port=port), workers=1, threads=4), env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"gunicorn exited: {(tmp_path / 'gunicorn.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{base}/api/v1/health", timeout=2).status_code in (200, 503):
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail("gunicorn did not answer within 60 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_search_customer_and_recommend(loaded_db, start_worker, web_server, chromium_path):
    from playwright.sync_api import expect, sync_playwright

    from recsys.platform.auth import create_admin_user

    create_admin_user(ADMIN_NAME, ADMIN_PASSWORD, loaded_db)
    start_worker(loaded_db, pool="solo")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)

            page.goto(f"{web_server}/admin/")
            expect(page).to_have_url(f"{web_server}/admin/login?next=/admin/")
            page.fill("input[name=username]", ADMIN_NAME)
            page.fill("input[name=password]", ADMIN_PASSWORD)
            page.screenshot(path=SCREENSHOTS / "01-login.png")
            page.click("button:has-text('Log in')")
            expect(page.locator("h1")).to_have_text("Dashboard")
            expect(page.locator("text=alive")).to_be_visible()
            page.screenshot(path=SCREENSHOTS / "02-dashboard.png", full_page=True)

            page.click("nav >> text=Products")
            page.fill("input[name=q]", "lantern")
            page.click("button:has-text('Search')")
            rows = page.locator("#products tbody tr")
            expect(rows.first).to_contain_text("LANTERN")
            page.screenshot(path=SCREENSHOTS / "03-search-lantern.png", full_page=True)

            page.click("nav >> text=Customers")
            page.fill("input[name=id]", "15781")
            page.click("button:has-text('Open')")
            expect(page.locator("h1")).to_have_text("Customer 15781")
            expect(page.locator("#history")).to_contain_text("WHITE LOVEBIRD LANTERN")

            page.fill("#recommend input[name=query]", "BAG CHARM")
            page.fill("#recommend input[name=k]", "3")
            page.select_option("#recommend select[name=ranker]", "retrieval")
            page.click("#recommend button[type=submit]")
            result = page.locator("#result table.result tbody")
            expect(result).to_contain_text("COPPER AND BRASS BAG CHARM", timeout=90_000)
            expect(result.locator("tr")).to_have_count(3)
            for name in ("IVORY GOLD METAL BAG CHARM", "WHITE WITH METAL BAG CHARM"):
                expect(result).to_contain_text(name)
            page.screenshot(path=SCREENSHOTS / "04-recommendation.png", full_page=True)

            page.click("text=job details")
            expect(page.locator("h1")).to_contain_text("succeeded")
            expect(page.locator("#candidates")).to_contain_text("BAG CHARM")
            page.screenshot(path=SCREENSHOTS / "05-job.png", full_page=True)
        finally:
            browser.close()
