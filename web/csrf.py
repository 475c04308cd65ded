"""A per-session CSRF token, checked on every state-changing admin request.

The session cookie alone would let another site post a form on an admin's behalf; a token
that only our pages know (form field `csrf_token` or header X-CSRF-Token) stops that.
"""

from __future__ import annotations

import hmac
import secrets

from flask import Flask, request, session

from web.errors import ApiError

UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def csrf_token() -> str:
    token = session.get("csrf_token")
    if not token:
        token = session["csrf_token"] = secrets.token_urlsafe(32)
    return token


def rotate_csrf_token() -> str:
    session.pop("csrf_token", None)
    return csrf_token()


def init_csrf(app: Flask, blueprints: tuple[str, ...]) -> None:
    """Check the token on every unsafe request to these blueprints (the pages with forms), before their views.

    Registered per blueprint name (Flask's `before_request_funcs` scopes), not for the whole app: every blueprint
    that serves forms must be named here, and the JSON API (API keys, no session) does not run the check."""
    app.jinja_env.globals["csrf_token"] = csrf_token
    for name in blueprints:
        app.before_request_funcs.setdefault(name, []).append(check_csrf)


def check_csrf():
    if request.method not in UNSAFE_METHODS:
        return
    expected = session.get("csrf_token")
    sent = request.form.get("csrf_token") or request.headers.get("X-CSRF-Token")
    if not expected or not sent or not hmac.compare_digest(str(expected), str(sent)):
        raise ApiError(400, "csrf_failed",
                       "The form expired or did not come from this site; reload the page and try again.")
