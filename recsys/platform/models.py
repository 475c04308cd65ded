"""Tables. Alembic migrations create them; these classes mirror them so `alembic check` stays quiet."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Computed,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, TSVECTOR, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

EMBEDDING_DIM = 384



class JobStatus(StrEnum):
    """A job's life: queued → running → succeeded | failed, or cancelled before it starts."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


JOB_STATUSES = tuple(status.value for status in JobStatus)
FINISHED_STATUSES = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)
FEEDBACK_EVENTS = ("shown", "clicked", "purchased")
JOB_KINDS = ("recommendation", "discover")
PURCHASE_SOURCES = ("ingest", "feedback")


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"

    stock_code: Mapped[str] = mapped_column(Text, primary_key=True)
    description: Mapped[str] = mapped_column(Text)
    price: Mapped[Decimal | None] = mapped_column(Numeric(12, 3))
    purchase_count: Mapped[int] = mapped_column(Integer, server_default="0")
    quantity_total: Mapped[int] = mapped_column(BigInteger, server_default="0")
    customer_count: Mapped[int] = mapped_column(Integer, server_default="0")
    is_non_product: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    search_tsv: Mapped[str | None] = mapped_column(
        TSVECTOR, Computed("to_tsvector('english'::regconfig, description)", persisted=True)
    )
    embedding: Mapped[list[float] | None] = mapped_column(Vector(EMBEDDING_DIM))
    embedding_model: Mapped[str | None] = mapped_column(Text)
    embedded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        Index(
            "ix_products_embedding_hnsw",
            "embedding",
            postgresql_using="hnsw",
            postgresql_with={"m": 16, "ef_construction": 100},
            postgresql_ops={"embedding": "vector_cosine_ops"},
        ),
        Index("ix_products_search_tsv", "search_tsv", postgresql_using="gin"),
        # the catalog version in every result-cache key: count and max read by an index-only scan
        Index("ix_products_embedded_at", "embedded_at"),
    )


class Customer(Base):
    __tablename__ = "customers"

    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    country: Mapped[str | None] = mapped_column(Text)
    purchase_count: Mapped[int] = mapped_column(Integer, server_default="0")
    first_purchase_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_purchase_at: Mapped[datetime | None] = mapped_column(DateTime)


class Purchase(Base):
    """One invoice line. `row_hash` identifies the source row so re-ingesting adds nothing."""

    __tablename__ = "purchases"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    row_hash: Mapped[bytes] = mapped_column(LargeBinary, unique=True)
    invoice_no: Mapped[str] = mapped_column(Text)
    stock_code: Mapped[str] = mapped_column(ForeignKey("products.stock_code"))
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.customer_id"))
    description: Mapped[str] = mapped_column(Text)
    quantity: Mapped[int] = mapped_column(Integer)
    unit_price: Mapped[Decimal] = mapped_column(Numeric(12, 3))
    invoiced_at: Mapped[datetime] = mapped_column(DateTime)
    country: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text, server_default="ingest")

    __table_args__ = (
        CheckConstraint(
            "source IN (" + ", ".join(f"'{source}'" for source in PURCHASE_SOURCES) + ")", name="ck_purchases_source"
        ),
        Index("ix_purchases_customer_invoiced", "customer_id", text("invoiced_at DESC")),
        Index("ix_purchases_stock_code", "stock_code"),
        Index("ix_purchases_invoice_no", "invoice_no"),
    )


class Job(Base):
    """A unit of background work. The row exists before its Celery message is sent."""

    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="queued")
    request: Mapped[dict] = mapped_column(JSONB)
    cache_key: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    result: Mapped[dict | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    run_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint(
            "status IN (" + ", ".join(f"'{status}'" for status in JOB_STATUSES) + ")", name="ck_jobs_status"
        ),
        CheckConstraint("kind IN (" + ", ".join(f"'{kind}'" for kind in JOB_KINDS) + ")", name="ck_jobs_kind"),
        # Each index entry is paid by every submission before its durable commit (migration 0011): queued rows
        # go only into the indexes that queries on queued rows use.
        Index("ix_jobs_status_created", "status", "created_at"),
        Index("ix_jobs_queued_created", "created_at", postgresql_where=text("status = 'queued'")),
        Index("ix_jobs_running_lease", "lease_expires_at", postgresql_where=text("status = 'running'")),
        Index("ix_jobs_finished_at", "finished_at", postgresql_where=text("finished_at IS NOT NULL")),
        Index("uq_jobs_idempotency_key", "idempotency_key", unique=True,
              postgresql_where=text("idempotency_key IS NOT NULL")),
    )


class CachedResult(Base):
    """A finished answer, keyed by everything that changes it."""

    __tablename__ = "result_cache"

    cache_key: Mapped[str] = mapped_column(Text, primary_key=True)
    result: Mapped[dict] = mapped_column(JSONB)
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    hits: Mapped[int] = mapped_column(Integer, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_hit_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class FeedbackEvent(Base):
    __tablename__ = "feedback_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    event: Mapped[str] = mapped_column(Text)
    customer_id: Mapped[int | None] = mapped_column(BigInteger)
    stock_code: Mapped[str] = mapped_column(Text)
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    position: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    idempotency_key: Mapped[str | None] = mapped_column(Text, unique=True)
    details: Mapped[dict | None] = mapped_column(JSONB)

    __table_args__ = (
        CheckConstraint("event IN ('shown', 'clicked', 'purchased')", name="ck_feedback_events_event"),
        Index("ix_feedback_events_customer_created", "customer_id", "created_at"),
        Index("ix_feedback_events_job", "job_id"),
    )


class ApiKey(Base):
    """Only a hash of the key is kept; the key itself is shown once at creation."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    key_prefix: Mapped[str] = mapped_column(Text)
    key_hash: Mapped[str] = mapped_column(Text, unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class IngestRun(Base):
    """Audit record of one `recsys ingest`."""

    __tablename__ = "ingest_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="running")
    rows_read: Mapped[int] = mapped_column(BigInteger, server_default="0")
    rows_rejected: Mapped[int] = mapped_column(BigInteger, server_default="0")
    rows_cleaned_out: Mapped[int] = mapped_column(BigInteger, server_default="0")
    rows_loaded: Mapped[int] = mapped_column(BigInteger, server_default="0")
    rows_new: Mapped[int] = mapped_column(BigInteger, server_default="0")
    seconds: Mapped[float | None] = mapped_column(Float)
    details: Mapped[dict | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AdminUser(Base):
    """A person who may use the admin pages; only a werkzeug password hash is kept."""

    __tablename__ = "admin_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    password_hash: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
