"""Template filters that turn stored values into what a person reads: times, durations, settings."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

NOTHING = "–"


def readable_time(value) -> str:
    """'2026-12-01 21:03:04 UTC' from a datetime or an ISO string; naive times (purchase dates) without a zone."""
    if value is None or value == "":
        return NOTHING
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return f"{value:%Y-%m-%d %H:%M}"
        return f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
    if isinstance(value, date):
        return f"{value:%Y-%m-%d}"
    return str(value)


def readable_duration(milliseconds) -> str:
    """'850 ms', '2.4 s', '3 min 5 s', '2 h 10 min'."""
    if milliseconds is None:
        return NOTHING
    ms = float(milliseconds)
    if ms < 1000:
        return f"{ms:,.0f} ms" if ms >= 10 else f"{ms:.1f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def readable_value(value) -> str:
    """A setting or ranker figure as text: lists joined, mappings as 'key value' pairs, no JSON syntax."""
    if value is None:
        return NOTHING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float | Decimal):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if value != int(value) else f"{int(value):,}"
    if isinstance(value, list | tuple):
        return ", ".join(readable_value(item) for item in value) or NOTHING
    if isinstance(value, dict):
        return "; ".join(f"{str(key).replace('_', ' ')} {readable_value(item)}" for key, item in value.items()) \
            or NOTHING
    return str(value)


def label(key) -> str:
    """'candidates_ranked' → 'candidates ranked'."""
    return str(key).replace("_", " ")


FILTERS = {"when": readable_time, "duration": readable_duration, "readable": readable_value, "label": label}
