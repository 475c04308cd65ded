"""Feedback events from shops and the admin pages: what was shown, clicked or purchased.

The one place events are checked and stored: `FeedbackEvent` is the API's request body (and its
OpenAPI schema); the views only parse it and call `record`.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import Field
from sqlalchemy import insert, select

from recsys.config import Settings
from recsys.platform import models
from recsys.platform.bodies import Body, CustomerId, RequestError, StockCode
from recsys.platform.db import get_engine

MAX_POSITION = 1000


class FeedbackEvent(Body):
    """What a customer did with a recommended product."""

    event: Literal[models.FEEDBACK_EVENTS]
    stock_code: StockCode
    customer_id: CustomerId | None = None
    job_id: Annotated[uuid.UUID, Field(strict=False)] | None = Field(
        None, description="the job whose result showed the product")
    position: Annotated[int, Field(ge=1, le=MAX_POSITION)] | None = Field(
        None, description="the rank it was shown at, from 1")


def record(event: FeedbackEvent, settings: Settings) -> dict:
    """Store one event and return it as stored; RequestError (nothing stored) for an unknown product."""
    with get_engine(settings).begin() as conn:
        known = conn.execute(
            select(models.Product.stock_code).where(models.Product.stock_code == event.stock_code)
        ).first()
        if known is None:
            raise RequestError(f"unknown stock_code {event.stock_code!r}")
        row = conn.execute(
            insert(models.FeedbackEvent)
            .values(**event.model_dump())
            .returning(models.FeedbackEvent.id, models.FeedbackEvent.created_at)
        ).one()
    return {"id": row.id, **event.model_dump(mode="json"), "created_at": row.created_at.isoformat()}
