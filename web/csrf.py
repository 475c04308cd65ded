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


def init_csrf(app: Flask, blueprints: tuple[str, ...] = ("admin",)) -> None:
    app.jinja_env.globals["csrf_token"] = csrf_token

    @app.before_request
    def check_csrf():
        if request.method not in UNSAFE_METHODS or request.blueprint not in blueprints:
            return
        expected = session.get("csrf_token")
        sent = request.form.get("csrf_token") or request.headers.get("X-CSRF-Token")
        if not expected or not sent or not hmac.compare_digest(str(expected), str(sent)):
            raise ApiError(400, "csrf_failed",
                           "The form expired or did not come from this site; reload the page and try again.")
