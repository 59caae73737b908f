"""Worker heartbeats, the write side: one row per worker process, written at start, while loading,
after each batch, periodically while idle, and `stopped` at shutdown. Readers: views.py
(`worker_beats`, for `stage-a status` and the web page)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert, update

from stage_a.store.base import StoreBase, _retrying, utcnow
from stage_a.store.models import WorkerRow

WORKER_STATES = ("starting", "loading", "ready", "busy", "stopped")


class WorkersPart(StoreBase):
    def heartbeat(self, name: str, state: str, *, model: str | None = None, engine: str | None = None,
                  device: str | None = None, pinned: bool | None = None, started: bool = False) -> None:
        """Upsert the worker's row with its state; fields left None keep their stored value.

        ``started`` (the first beat of a process) resets started_at and the per-process totals, so a
        name reused by a restarted process does not carry the old one's figures."""
        if state not in WORKER_STATES:
            raise ValueError(f"worker state must be one of {', '.join(WORKER_STATES)}, got {state!r}")
        now = utcnow()
        values: dict[str, Any] = {"state": state, "heartbeat_at": now}
        for key, value in (("model", model), ("engine", engine), ("device", device), ("pinned", pinned)):
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
