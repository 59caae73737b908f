"""SQLAlchemy 2 models of the results store. Alembic (migrations/) owns the schema."""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, CheckConstraint, ForeignKeyConstraint, Index, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class ImageStatus(str, enum.Enum):
    """Where one image stands. "leased" = handed to a worker, lease_until says until when."""

    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


PENDING, LEASED, DONE, FAILED = (s.value for s in ImageStatus)
UNFINISHED = (PENDING, LEASED)
STATUS_CHECK = "status IN ('pending', 'leased', 'done', 'failed')"


def utcnow() -> datetime:
    """The store's clock: naive UTC."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    mission: Mapped[str] = mapped_column(String(200))
    dataset: Mapped[str] = mapped_column(String(16))
    prompt_profile: Mapped[str] = mapped_column(String(64))
    checkpoint: Mapped[str] = mapped_column(Text)
    input_root: Mapped[str] = mapped_column(Text)
    sharding_mode: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any]]
    sampling: Mapped[dict[str, Any]]
    n_groups: Mapped[int]
    n_images: Mapped[int]
    created_at: Mapped[datetime]
    farm: Mapped[bool] = mapped_column(default=False)
    """True when enqueued for the worker farm (the reclaimer only re-enqueues farm runs)."""
    model: Mapped[str | None] = mapped_column(String(255))
    """Fingerprint of the model the run must be served with (workers serve exactly this model)."""
    cancelled_at: Mapped[datetime | None]
    """Set by `stage-a cancel`: workers drop the run's messages, status says cancelled."""
    base_model: Mapped[str | None] = mapped_column(String(255))
    """Identity of the base model that serves the run (its route): ``model`` itself unless that is a LoRA adapter."""
    inputs_key: Mapped[str | None] = mapped_column(String(64), index=True)
    """Hash of what defines the run's work (root, mission, model, options, sampling): a second identical
    enqueue finds the unfinished first one by it."""


class GroupRow(Base):
    """One group occurrence; (run, position) and never group_id alone, because of resubmissions."""

    __tablename__ = "groups"
    __table_args__ = (ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
                      Index("ix_groups_label", "run_id", "label", "position"))

    run_id: Mapped[int] = mapped_column(primary_key=True)
    position: Mapped[int] = mapped_column(primary_key=True)
    group_id: Mapped[str] = mapped_column(String(255))
    label: Mapped[str] = mapped_column(String(8))
    n_images: Mapped[int]
    n_done: Mapped[int] = mapped_column(default=0, server_default="0")
    """Its images done; kept by the images triggers (revision 0006), like every counter of RunCountsRow."""
    n_failed: Mapped[int] = mapped_column(default=0, server_default="0")


class ImageRow(Base):
    """One image of one group; the primary key makes every result write an idempotent upsert."""

    __tablename__ = "images"
    __table_args__ = (
        # No foreign key to groups on PostgreSQL (revision 0007: its per-row check was ~45% of registering a
        # run); rows are inserted with their group only, and deleting groups deletes their images by trigger.
        # A run's rows of one status in output order (unfinished ones for publishing, leases, search). Not
        # partial: a generic plan's `status = $1` does not prove a partial index's predicate.
        Index("ix_images_run_status", "run_id", "status", "group_position", "image_index"),
        # Written rows only on PostgreSQL (a registered row has no updated_at: registration inserts nothing here).
        Index("ix_images_run_updated", "run_id", "updated_at", postgresql_where=text("updated_at IS NOT NULL")),
        Index("ix_images_reuse_key", "reuse_key", postgresql_where=text("reuse_key IS NOT NULL"),
              sqlite_where=text("reuse_key IS NOT NULL")),
        # The run page's filters in output order; on PostgreSQL with pg_trgm, also ix_images_search (a
        # trigram GIN index over search.search_text, created by the migration when the extension is there).
        Index("ix_images_failed", "run_id", "group_position", "image_index", postgresql_where=text("status = 'failed'"),
              sqlite_where=text("status = 'failed'")),
        Index("ix_images_irrelevant", "run_id", "group_position", postgresql_where=text("summary = '无关图片'"),
              sqlite_where=text("summary = '无关图片'")),
        Index("ix_images_stat_key", "stat_key", postgresql_where=text("stat_key IS NOT NULL"),
              sqlite_where=text("stat_key IS NOT NULL")),
        Index("ix_images_reused_from", "run_id", "reused_from", postgresql_where=text("reused_from IS NOT NULL"),
              sqlite_where=text("reused_from IS NOT NULL")),
        CheckConstraint(STATUS_CHECK, name="ck_images_status"),
    )

    run_id: Mapped[int] = mapped_column(primary_key=True)
    group_position: Mapped[int] = mapped_column(primary_key=True)
    image_index: Mapped[int] = mapped_column(primary_key=True)
    rel_path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(8), default=PENDING)
    summary: Mapped[str | None] = mapped_column(Text)
    raw_text: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    vision_tokens: Mapped[int | None]
    preprocess_ms: Mapped[float | None]
    generate_ms: Mapped[float | None]
    worker: Mapped[str | None] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(default=0)
    lease_until: Mapped[datetime | None]
    updated_at: Mapped[datetime | None]
    model: Mapped[str | None] = mapped_column(String(255))
    """Fingerprint of the model that produced this row's result."""
    engine: Mapped[str | None] = mapped_column(String(32))
    """Engine that produced it: transformers or vllm."""
    reuse_key: Mapped[str | None] = mapped_column(String(64))
    """Hash of what decides this image's summary (its bytes, the model, prompt and options; stage_a.reuse):
    a later image with the same key may take this row's summary. Set on generated done rows only."""
    reused_from: Mapped[int | None]
    """The run that generated the summary this row took instead of generating one (None: generated here)."""
    stat_key: Mapped[str | None] = mapped_column(String(64))
    """Hash of the run's scope, the file's path and stat signature when this row learned them (the cheap
    pre-check: an unchanged file is found without reading it)."""


class DeadLetter(Base):
    """A task message that could not be processed (malformed, unknown run, path outside roots)."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    received_at: Mapped[datetime]
    reason: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255))
    run_id: Mapped[int | None] = mapped_column(index=True)
    """The run the message named, when it could be read (no foreign key: unknown runs too)."""


class WorkerRow(Base):
    """One worker process's heartbeat: what it serves and how its last batch went."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    model: Mapped[str | None] = mapped_column(String(255))
    pinned: Mapped[bool | None]
    """Serves only its STAGE_A_CHECKPOINT model (False: loads each run's; None: not recorded)."""
    engine: Mapped[str | None] = mapped_column(String(32))
    device: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    """starting, loading, ready, busy or stopped."""
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    run_id: Mapped[int | None]
    """The run of the last batch."""
    last_batch_at: Mapped[datetime | None]
    last_batch_images: Mapped[int | None]
    last_batch_seconds: Mapped[float | None]
    images_per_s: Mapped[float | None]
    tokens_per_s: Mapped[float | None]
    images_total: Mapped[int] = mapped_column(default=0)
    problem: Mapped[str | None] = mapped_column(Text)
    """Why this worker cannot serve what it was asked to (e.g. the model at a run's path differs), or None."""


class StoreMeta(Base):
    """Facts about the store itself; ``store_id`` is written once, when the schema is created."""

    __tablename__ = "store_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ReclaimerRow(Base):
    """One host's recovery loop: when it last ran, and since when and why it fails (None: it works)."""

    __tablename__ = "reclaimers"

    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    checked_at: Mapped[datetime]
    failing_since: Mapped[datetime | None]
    problem: Mapped[str | None] = mapped_column(Text)


class RunCountsRow(Base):
    """A run's counters, kept by triggers on images and groups in the same transaction as every write
    (revision 0006): the operator views read this row, never the run's images."""

    __tablename__ = "run_counts"
    __table_args__ = (ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),)

    run_id: Mapped[int] = mapped_column(primary_key=True)
    pending: Mapped[int] = mapped_column(BigInteger, default=0)
    leased: Mapped[int] = mapped_column(BigInteger, default=0)
    done: Mapped[int] = mapped_column(BigInteger, default=0)
    failed: Mapped[int] = mapped_column(BigInteger, default=0)
    reused: Mapped[int] = mapped_column(BigInteger, default=0)
    """Done images whose summary was taken from an earlier run."""
    groups_done: Mapped[int] = mapped_column(BigInteger, default=0)
    groups_failed: Mapped[int] = mapped_column(BigInteger, default=0)
    preprocess_n: Mapped[int] = mapped_column(BigInteger, default=0)
    generate_n: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    preprocess_ms_sum: Mapped[float] = mapped_column(default=0.0)
    generate_ms_sum: Mapped[float] = mapped_column(default=0.0)
    generate_ms_with_tokens: Mapped[float] = mapped_column(default=0.0)
    first_activity: Mapped[datetime | None]
    first_result: Mapped[datetime | None]
    last_result: Mapped[datetime | None]


class RunModelRow(Base):
    """Done images of a run by the (model, engine) that produced them ('' for none recorded)."""

    __tablename__ = "run_models"
    __table_args__ = (ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),)

    run_id: Mapped[int] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(String(255), primary_key=True)
    engine: Mapped[str] = mapped_column(String(32), primary_key=True)
    images: Mapped[int] = mapped_column(BigInteger, default=0)


class RunRecentRow(Base):
    """Images of a run finished per 10-second bucket: the recent rate reads a window of these."""

    __tablename__ = "run_recent"
    __table_args__ = (ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),)

    run_id: Mapped[int] = mapped_column(primary_key=True)
    bucket: Mapped[datetime] = mapped_column(primary_key=True)
    finished: Mapped[int] = mapped_column(BigInteger, default=0)


class RunWorkerRow(Base):
    """Every worker name that leased or wrote an image of a run."""

    __tablename__ = "run_workers"
    __table_args__ = (ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),)

    run_id: Mapped[int] = mapped_column(primary_key=True)
    worker: Mapped[str] = mapped_column(String(255), primary_key=True)
