"""Farm settings, read from the environment (deploy/stage-a.env documents every variable)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from stage_a.config import DEFAULT_BATCH_SIZE, ENGINES
from stage_a.errors import UserError


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{name} must be an integer, got {raw!r}") from None


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise UserError(f"{name} must be a number, got {raw!r}") from None


@dataclass(frozen=True)
class FarmSettings:
    """How producers and workers reach each other; credentials only ever come from here."""

    broker_url: str = "redis://127.0.0.1:6379/0"
    """STAGE_A_BROKER_URL: Redis URL of the task queue."""
    database_url: str = ""
    """STAGE_A_DATABASE_URL: results store (postgresql+psycopg://... for a farm)."""
    checkpoint: str = ""
    """STAGE_A_CHECKPOINT: model folder on every worker host (empty: tiny demo model)."""
    gpus: tuple[str, ...] = ()
    """STAGE_A_GPUS: GPU indices for this host's worker processes, e.g. 0,1,2,3 (empty: auto/CPU)."""
    device: str = "auto"
    """STAGE_A_DEVICE: auto, cpu or cuda (used when STAGE_A_GPUS is empty)."""
    engine: str = "transformers"
    """STAGE_A_ENGINE: transformers (left-padded static batches) or vllm (continuous batching)."""
    queue: str = "stage_a"
    """STAGE_A_QUEUE: queue name."""
    batch_size: int = 4 * DEFAULT_BATCH_SIZE
    """STAGE_A_BATCH_SIZE: messages buffered per flush (and prefetch per process). Several model
    batches per flush let the worker order by length and prefetch inside it (bench/farm_overhead.py:
    72.9% of the engine's images/s at 1 model batch per flush, 82.4% at 4, 92.6% at 8)."""
    flush_interval: float = 1.0
    """STAGE_A_FLUSH_INTERVAL: seconds before a partial batch is flushed."""
    lease_seconds: float = 1800.0
    """STAGE_A_LEASE_SECONDS: an in-flight image not finished within this is re-enqueued."""
    reclaim_interval: float = 30.0
    """STAGE_A_RECLAIM_INTERVAL: how often each worker host looks for expired leases / lost messages."""
    input_roots: tuple[str, ...] = field(default_factory=tuple)
    """STAGE_A_INPUT_ROOTS: os.pathsep-separated folders workers may read; empty: each run's root."""
    task_events: bool = True
    """STAGE_A_TASK_EVENTS: send per-task events so Flower lists tasks (0 to save broker traffic)."""
    max_delivery_attempts: int = 5
    """STAGE_A_MAX_ATTEMPTS: an image delivered this many times without a result is failed."""

    @classmethod
    def from_env(cls) -> FarmSettings:
        gpus = tuple(g.strip() for g in os.environ.get("STAGE_A_GPUS", "").split(",") if g.strip())
        roots = tuple(r for r in os.environ.get("STAGE_A_INPUT_ROOTS", "").split(os.pathsep) if r)
        settings = cls(
            broker_url=os.environ.get("STAGE_A_BROKER_URL", cls.broker_url),
            database_url=os.environ.get("STAGE_A_DATABASE_URL", ""),
            checkpoint=os.environ.get("STAGE_A_CHECKPOINT", ""),
            gpus=gpus,
            device=os.environ.get("STAGE_A_DEVICE", "auto"),
            engine=os.environ.get("STAGE_A_ENGINE", "transformers").strip().lower() or "transformers",
            queue=os.environ.get("STAGE_A_QUEUE", cls.queue),
            batch_size=_int("STAGE_A_BATCH_SIZE", 4 * DEFAULT_BATCH_SIZE),
            flush_interval=_float("STAGE_A_FLUSH_INTERVAL", 1.0),
            lease_seconds=_float("STAGE_A_LEASE_SECONDS", 1800.0),
            reclaim_interval=_float("STAGE_A_RECLAIM_INTERVAL", 30.0),
            input_roots=roots,
            max_delivery_attempts=_int("STAGE_A_MAX_ATTEMPTS", 5),
            task_events=os.environ.get("STAGE_A_TASK_EVENTS", "1").lower() not in ("0", "false", "no", "off"),
        )
        if settings.engine not in ENGINES:
            raise UserError(f"STAGE_A_ENGINE must be one of {', '.join(ENGINES)}, got {settings.engine!r}")
        if settings.batch_size <= 0:
            raise UserError(f"STAGE_A_BATCH_SIZE must be > 0, got {settings.batch_size}")
        if settings.lease_seconds <= 0:
            raise UserError(f"STAGE_A_LEASE_SECONDS must be > 0, got {settings.lease_seconds}")
        return settings

    def require_database(self) -> str:
        if not self.database_url:
            raise UserError("STAGE_A_DATABASE_URL is not set (e.g. postgresql+psycopg://user@host/stage_a)")
        return self.database_url
