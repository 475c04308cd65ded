"""One error shape for machines, {"error": {"code", "message"}}, and plain pages for people.

Anything under /api (and /metrics) answers JSON; a client's mistake is a 4xx with a message that
says what to fix, and an unexpected failure is a logged 500 without a stack trace in the body.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, render_template, request
from sqlalchemy.exc import DataError, OperationalError
from werkzeug.exceptions import HTTPException

from recsys.recommend.request import RequestError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error meant for the client: HTTP status, a stable code, a message."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def wants_json() -> bool:
    path = request.path
    return path.startswith("/api/") or path == "/api" or path == "/metrics" or path.endswith(".json")


def _page(status: int, title: str, message: str):
    return render_template("error.html", status=status, title=title, message=message), status


def _http_code(exc: HTTPException) -> str:
    return (exc.name or "error").lower().replace(" ", "_").replace("'", "")


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        if wants_json():
            return error_response(exc.status, exc.code, exc.message, exc.headers)
        return _page(exc.status, exc.code.replace("_", " "), exc.message)

    @app.errorhandler(RequestError)
    def request_error(exc: RequestError):
        if wants_json():
            return error_response(400, "invalid_request", str(exc))
        return _page(400, "Bad request", str(exc))

    @app.errorhandler(DataError)
    def data_error(exc: DataError):
        # The database refused a value the client sent (a NUL byte, a number out of range).
        log.info("database rejected client data: %s", str(exc.orig).splitlines()[0] if exc.orig else exc)
        message = "a value in the request cannot be stored or compared (out of range or containing NUL bytes)"
        if wants_json():
            return error_response(400, "invalid_request", message)
        return _page(400, "Bad request", message)

    @app.errorhandler(OperationalError)
    def database_down(exc: OperationalError):
        log.error("database unavailable: %s", str(exc.orig or exc).splitlines()[0])
        message = "the database is unavailable; try again shortly"
        if wants_json():
            return error_response(503, "service_unavailable", message, {"Retry-After": "5"})
        return _page(503, "Service unavailable", message)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        status = exc.code or 500
        if status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            message = f"the request body is larger than {limit} bytes" if limit else "the request body is too large"
        else:
            message = exc.description or exc.name
        if wants_json():
            headers = {}
            if status == 405 and getattr(exc, "valid_methods", None):
                headers["Allow"] = ", ".join(exc.valid_methods)
            return error_response(status, _http_code(exc), message, headers)
        return _page(status, exc.name, message)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        if wants_json():
            return error_response(500, "internal_error", "an unexpected error occurred; it has been logged")
        return _page(500, "Internal server error", "An unexpected error occurred; it has been logged.")
