"""SQLAlchemy 2 models of the results store. Alembic (migrations/) owns the schema."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKeyConstraint, Index, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Image status values. "leased" = handed to a worker, lease_until says until when.
PENDING, LEASED, DONE, FAILED = "pending", "leased", "done", "failed"
UNFINISHED = (PENDING, LEASED)


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


class GroupRow(Base):
    """One group occurrence; (run, position) and never group_id alone, because of resubmissions."""

    __tablename__ = "groups"
    __table_args__ = (ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),)

    run_id: Mapped[int] = mapped_column(primary_key=True)
    position: Mapped[int] = mapped_column(primary_key=True)
    group_id: Mapped[str] = mapped_column(String(255))
    label: Mapped[str] = mapped_column(String(8))
    n_images: Mapped[int]


class ImageRow(Base):
    """One image of one group; the primary key makes every result write an idempotent upsert."""

    __tablename__ = "images"
    __table_args__ = (
        ForeignKeyConstraint(
            ["run_id", "group_position"], ["groups.run_id", "groups.position"], ondelete="CASCADE"
        ),
        Index("ix_images_run_status", "run_id", "status"),
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


class DeadLetter(Base):
    """A task message that could not be processed (malformed, unknown run, path outside roots)."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    received_at: Mapped[datetime]
    reason: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255))
