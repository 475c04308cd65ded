"""Fixtures for the web layer (Flask tutorial style): app, client, runner, an API key, a logged-in admin."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

ADMIN_NAME = "admin"
ADMIN_PASSWORD = "correct horse battery"


@pytest.fixture
def app(db, broker):
    """The app on this test's own database and the session's broker."""
    from web import create_app

    app = create_app(db, {"TESTING": True, "API_KEY_CACHE_SECONDS": 0})
    yield app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner():
    """Runs `recsys` commands in-process (the settings are the test database's, set by `db`)."""
    return CliRunner()


@pytest.fixture
def api_key(db) -> str:
    from recsys.platform.auth import create_api_key

    return create_api_key("tests", db)


@pytest.fixture
def auth_headers(api_key) -> dict:
    return {"Authorization": f"Bearer {api_key}"}


def csrf_from(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


@pytest.fixture
def admin_client(app, db):
    """A test client logged in to the admin pages."""
    from recsys.platform.auth import create_admin_user

    create_admin_user(ADMIN_NAME, ADMIN_PASSWORD, db)
    client = app.test_client()
    token = csrf_from(client.get("/admin/login").get_data(as_text=True))
    response = client.post("/admin/login", data={"username": ADMIN_NAME, "password": ADMIN_PASSWORD,
                                                 "csrf_token": token})
    assert response.status_code == 302, response.get_data(as_text=True)
    return client
