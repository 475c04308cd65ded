"""Feedback events from shops and the admin pages: what was shown, clicked or purchased.

The one place events are stored; the API and admin views only parse and call `record`.
"""

from __future__ import annotations

import uuid

from sqlalchemy import insert

from recsys.config import Settings
from recsys.platform.db import get_engine
from recsys.platform.models import FEEDBACK_EVENTS, FeedbackEvent


class FeedbackError(ValueError):
    """An event that cannot be recorded as given; the message says why, for the client."""


def record(event: str, stock_code: str, settings: Settings, *, customer_id: int | None = None,
           job_id: uuid.UUID | None = None, position: int | None = None) -> dict:
    """Store one event and return it as stored."""
    if event not in FEEDBACK_EVENTS:
        raise FeedbackError(f"event must be one of {', '.join(FEEDBACK_EVENTS)}")
    with get_engine(settings).begin() as conn:
        row = conn.execute(
            insert(FeedbackEvent)
            .values(event=event, stock_code=stock_code, customer_id=customer_id, job_id=job_id, position=position)
            .returning(FeedbackEvent.id, FeedbackEvent.created_at)
        ).one()
    return {"id": row.id, "event": event, "stock_code": stock_code, "customer_id": customer_id,
            "job_id": str(job_id) if job_id else None, "position": position, "created_at": row.created_at.isoformat()}
