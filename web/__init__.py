"""Flask app: JSON API (/api/v1) and admin pages (/admin). Served by gunicorn via `recsys serve`."""

from __future__ import annotations

import logging
import secrets
from datetime import date, datetime, timedelta
from decimal import Decimal
from uuid import UUID

from flask import Flask, redirect, url_for
from flask.json.provider import DefaultJSONProvider
from flask.sessions import SecureCookieSessionInterface

from recsys.config import Settings, get_settings
from recsys.platform.auth import ApiKeyCache

MAX_BODY_BYTES = 64 * 1024
# A verified API key is trusted this long without asking Postgres again; a revocation takes effect
# within this time. Saves three round trips (ping, query, rollback) on every API request.
API_KEY_CACHE_SECONDS = 2.0


class JSONProvider(DefaultJSONProvider):
    """ISO 8601 dates (Flask's default is the HTTP date format), Decimal as number, keys in insertion order."""

    sort_keys = False

    @staticmethod
    def default(o):
        if isinstance(o, datetime | date):
            return o.isoformat()
        if isinstance(o, Decimal):
            return float(o)
        if isinstance(o, UUID):
            return str(o)
        return DefaultJSONProvider.default(o)


class CookieSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, without building the signing serializer for a request that sends no
    session cookie (every API call): an empty session needs no key to read."""

    def open_session(self, app, request):
        # a request without a Cookie header (every API client) skips parsing the cookies too
        if app.secret_key and ("HTTP_COOKIE" not in request.environ
                               or not request.cookies.get(self.get_cookie_name(app))):
            return self.session_class()
        return super().open_session(app, request)


def create_app(settings: Settings | None = None, config: dict | None = None) -> Flask:
    """Build the app for these settings (default: the environment's); `config` overrides Flask config keys."""
    settings = settings or get_settings()
    from web import admin, admin_discover, api
    from web.csrf import init_csrf
    from web.errors import register_error_handlers
    from web.metrics import init_metrics

    app = Flask(__name__)
    app.json = JSONProvider(app)
    app.session_interface = CookieSessions()
    app.config.update(
        # Without RECSYS_SECRET_KEY sessions last as long as the process; `recsys serve` sets one per start.
        SECRET_KEY=settings.secret_key or secrets.token_hex(32),
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        MAX_FORM_MEMORY_SIZE=MAX_BODY_BYTES,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_NAME="recsys_session",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=12),
        RECSYS_SETTINGS=settings,
        API_KEY_CACHE_SECONDS=API_KEY_CACHE_SECONDS,
    )
    app.config.update(config or {})
    app.extensions["recsys_api_keys"] = ApiKeyCache(app.config["API_KEY_CACHE_SECONDS"])
    app.logger.setLevel(getattr(logging, settings.log_level.upper(), logging.INFO))

    register_error_handlers(app)
    init_metrics(app)
    init_csrf(app, (admin.bp.name, admin_discover.bp.name))
    app.register_blueprint(api.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(admin_discover.bp)

    @app.after_request
    def security_headers(response):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    @app.get("/")
    def index():
        return redirect(url_for("admin.dashboard"))

    @app.get("/favicon.ico")
    def favicon():
        """Browsers ask for it on pages without an icon link (the JSON API); the admin pages link the SVG."""
        return redirect(url_for("static", filename="favicon.svg"), 301)

    from web.display import FILTERS

    app.jinja_env.filters["num"] = _number
    app.jinja_env.filters.update(FILTERS)
    return app


def _number(value, digits: int = 2) -> str:
    """Thousands separators for counts, fixed decimals for measures, a dash for nothing."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float | Decimal):
        return f"{value:,.{digits}f}"
    return value if isinstance(value, str) else str(value)
