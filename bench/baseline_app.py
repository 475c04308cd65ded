"""The API benchmark's ceiling: a minimal Flask app that answers with the measured endpoints' own JSON bodies.

bench/api.py serves it with the same gunicorn command line as `recsys serve` (config, workers,
threads, worker class) and loads it with the same wrk scripts, so the difference between the two
is what recsys does per request: authentication, validation, SQL, the broker, metrics.
BENCH_BASELINE_BODIES names a JSON file {scenario: {"status": int, "body": {...}}} written by bench/api.py
from real responses; each request re-serializes its body, as the real views do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flask import Flask, jsonify, request


def create_app() -> Flask:
    answers = json.loads(Path(os.environ["BENCH_BASELINE_BODIES"]).read_text())
    app = Flask(__name__)

    @app.get("/baseline/<scenario>")
    @app.get("/baseline/<scenario>/<path:_rest>")
    def read(scenario: str, _rest: str = ""):
        answer = answers[scenario]
        return jsonify(answer["body"]), answer["status"]

    @app.post("/baseline/<scenario>")
    def write(scenario: str):
        request.get_json()
        answer = answers[scenario]
        return jsonify(answer["body"]), answer["status"]

    return app
