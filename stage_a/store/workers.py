"""Worker heartbeats: one row per worker process, written at start, while loading, after each batch,
periodically while idle, and `stopped` at shutdown. `stage-a status` and the web page read them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from stage_a.store.base import StoreBase, _retrying, utcnow
from stage_a.store.models import WorkerRow

WORKER_STATES = ("starting", "loading", "ready", "busy", "stopped")


@dataclass(frozen=True)
class WorkerBeat:
    """A worker row as readers see it."""

    name: str
    state: str
    model: str | None
    engine: str | None
    device: str | None
    started_at: datetime
    heartbeat_at: datetime
    run_id: int | None
    last_batch_at: datetime | None
    last_batch_images: int | None
    last_batch_seconds: float | None
    images_per_s: float | None
    tokens_per_s: float | None
    images_total: int


class WorkersPart(StoreBase):
    def heartbeat(self, name: str, state: str, *, model: str | None = None, engine: str | None = None,
                  device: str | None = None, started: bool = False) -> None:
        """Upsert the worker's row with its state; fields left None keep their stored value.

        ``started`` (the first beat of a process) resets started_at and the per-process totals, so a
        name reused by a restarted process does not carry the old one's figures."""
        if state not in WORKER_STATES:
            raise ValueError(f"worker state must be one of {', '.join(WORKER_STATES)}, got {state!r}")
        now = utcnow()
        values: dict[str, Any] = {"state": state, "heartbeat_at": now}
        for key, value in (("model", model), ("engine", engine), ("device", device)):
            if value is not None:
                values[key] = value
        if started:
            values.update(started_at=now, images_total=0, run_id=None, last_batch_at=None, last_batch_images=None,
                          last_batch_seconds=None, images_per_s=None, tokens_per_s=None)
        self._upsert(name, values, now)

    def record_batch(self, name: str, *, run_id: int, images: int, seconds: float, completion_tokens: int,
                     model: str | None = None, engine: str | None = None) -> None:
        """After a committed model batch: its size, time and rates, and the process's running total."""
        now = utcnow()
        rate = images / seconds if seconds > 0 else None
        tokens = completion_tokens / seconds if seconds > 0 else None
        values: dict[str, Any] = {
            "state": "busy", "heartbeat_at": now, "run_id": run_id, "last_batch_at": now,
            "last_batch_images": images, "last_batch_seconds": seconds, "images_per_s": rate,
            "tokens_per_s": tokens, "images_total": WorkerRow.images_total + images,
        }
        if model is not None:
            values["model"] = model
        if engine is not None:
            values["engine"] = engine
        self._upsert(name, values, now)

    def _upsert(self, name: str, values: dict[str, Any], now: datetime) -> None:
        def op() -> None:
            with self.engine.begin() as conn:
                res = conn.execute(update(WorkerRow).where(WorkerRow.name == name).values(**values))
                if res.rowcount:
                    return
                row = {"name": name, "started_at": now, "images_total": 0, **values}
                if not isinstance(row["images_total"], int):  # a first beat that is a batch
                    row["images_total"] = values.get("last_batch_images") or 0
                conn.execute(insert(WorkerRow).values(**row))

        _retrying(op, "worker heartbeat", attempts=3)

    def workers(self, since_seconds: float | None = None) -> list[WorkerBeat]:
        """Worker rows, newest heartbeat first; ``since_seconds`` keeps those heard from since then."""
        with Session(self.engine) as s:
            q = select(WorkerRow).order_by(WorkerRow.heartbeat_at.desc(), WorkerRow.name)
            if since_seconds is not None:
                q = q.where(WorkerRow.heartbeat_at >= utcnow() - timedelta(seconds=since_seconds))
            return [WorkerBeat(
                name=w.name, state=w.state, model=w.model, engine=w.engine, device=w.device,
                started_at=w.started_at, heartbeat_at=w.heartbeat_at, run_id=w.run_id,
                last_batch_at=w.last_batch_at, last_batch_images=w.last_batch_images,
                last_batch_seconds=w.last_batch_seconds, images_per_s=w.images_per_s,
                tokens_per_s=w.tokens_per_s, images_total=w.images_total,
            ) for w in s.scalars(q)]
