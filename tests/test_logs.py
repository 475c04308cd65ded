"""RECSYS_LOG_FORMAT=json: one JSON object a line from the CLI, the worker's and gunicorn's handlers."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import subprocess
import sys

from recsys.config import Settings
from recsys.platform import logs


def _record(message: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc else None
    return logging.LogRecord("recsys.test", logging.WARNING, __file__, 1, message, (), exc_info)


def test_json_formatter_writes_one_parseable_object_with_the_traceback():
    try:
        raise RuntimeError("broker gone")
    except RuntimeError as exc:
        line = logs.JsonFormatter().format(_record("claim failed: \"x\"\nnext", exc))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING" and entry["logger"] == "recsys.test"
    assert entry["message"] == "claim failed: \"x\"\nnext"
    assert "RuntimeError: broker gone" in entry["exc_info"]
    assert entry["time"].endswith("+00:00")


def test_use_format_changes_handlers_only_for_json():
    handler = logging.StreamHandler(io.StringIO())
    text_formatter = logging.Formatter("%(message)s")
    handler.setFormatter(text_formatter)
    logs.use_format([handler], Settings(log_format="text"))
    assert handler.formatter is text_formatter
    logs.use_format([handler], Settings(log_format="json"))
    assert isinstance(handler.formatter, logs.JsonFormatter)


def test_gunicorn_log_config_is_valid_and_writes_json(capsys):
    assert logs.gunicorn_logconfig(Settings(log_format="text")) is None
    config = logs.gunicorn_logconfig(Settings(log_format="json", log_level="INFO"))
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logging.config.dictConfig(config)
        logging.getLogger("gunicorn.error").info("Booting worker with pid: %s", 42)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        for name in ("gunicorn.error", "gunicorn.access"):
            logging.getLogger(name).handlers.clear()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert json.loads(line)["message"] == "Booting worker with pid: 42"


def test_cli_logs_json_when_asked(tmp_path):
    """A real `recsys` process: its log lines on stderr are JSON objects."""
    code = "import sys; sys.argv[0] = 'recsys'; from recsys.cli import main; main()"
    compose = tmp_path / "compose.yml"
    compose.write_text("services: {}\n")
    env = {"RECSYS_LOG_FORMAT": "json", "RECSYS_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code, "-v", "deploy", "check", "--compose", str(compose)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1  # the empty compose file has every problem
    entries = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert [e["message"] for e in entries if e["logger"] == "recsys.platform.deploy"] == [f"checking {compose}"]
    assert all({"time", "level", "logger", "message", "process"} <= set(e) for e in entries)
