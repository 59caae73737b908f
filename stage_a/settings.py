"""Every STAGE_A_* environment variable, read here and nowhere else.

Each field below is one variable (its name is STAGE_A_ + the field name upper-cased, unless the
field says otherwise), its default written once, its meaning in the docstring under it.
deploy/stage-a.env.example documents the same variables for operators. Entry points (each
`stage-a` command, workers/celery.py, the alembic env) call Settings.from_env() once and pass it down.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stage_a.config import DEFAULT_BATCH_SIZE, ENGINES
from stage_a.errors import UserError

if TYPE_CHECKING:
    from stage_a.store import ResultStore

LOG_FORMATS = ("text", "json")
"""STAGE_A_LOG_FORMAT values."""


def _env(name: str, *legacy: str) -> dict[str, Any]:
    return {"env": name, "legacy": legacy}


@dataclass(frozen=True)
class Settings:
    """How producers and workers reach each other and behave; credentials only ever come from here."""

    broker_url: str = "redis://127.0.0.1:6379/0"
    """Redis URL of the task queue."""
    database_url: str = ""
    """Results store (postgresql+psycopg://... for a farm; empty: SQLite next to `run`'s output)."""
    checkpoint: str = ""
    """Model folder a worker is pinned to. Empty: a worker serves each run's own checkpoint."""
    gpus: tuple[str, ...] = ()
    """GPU indices for this host's worker processes, e.g. 0,1,2,3 (empty: STAGE_A_DEVICE)."""
    device: str = "auto"
    """auto, cpu or cuda (used when STAGE_A_GPUS is empty)."""
    engine: str = "transformers"
    """Generation engine of workers: transformers (left-padded static batches) or vllm."""
    queue: str = "stage_a"
    """Queue name on the broker."""
    flush_size: int = field(default=0, metadata=_env("STAGE_A_FLUSH_SIZE", "STAGE_A_BATCH_SIZE"))
    """Images a worker buffers before it flushes them to its pool processes (see flush_images; 0: by
    engine). Not the model batch size (a run's --batch-size): several model batches per flush let the
    worker order by length and prefetch inside it (bench/farm_overhead.py: 72.9% of the engine's
    images/s at 1 model batch per flush, 82.4% at 4, 92.6% at 8). STAGE_A_BATCH_SIZE is the old name."""
    flush_interval: float = 1.0
    """Seconds before a partial buffer is flushed."""
    lease_seconds: float = 1800.0
    """An in-flight image not finished within this is re-enqueued (keep well above one flush's time)."""
    reclaim_interval: float = 15.0
    """How often each worker host looks for expired leases, dead holders and lost messages (a pass that
    fails waits twice as long each time, up to 8 x this)."""
    holder_timeout: float = 0.0
    """Seconds without a heartbeat after which a worker holding leases counts as dead: the reclaimer
    re-sends its images without waiting out STAGE_A_LEASE_SECONDS (a busy worker beats every
    STAGE_A_HEARTBEAT_INTERVAL, so a slow batch is not a dead one). 0: max(60, 4 x heartbeat interval);
    with STAGE_A_HEARTBEAT_INTERVAL=0 only the lease counts."""
    orphan_grace: float = 0.0
    """Seconds without activity before a pending image of a farm run counts as lost (0: max(120, 4 x
    flush interval))."""
    input_roots: tuple[str, ...] = ()
    """os.pathsep-separated folders workers may read; empty: each run's own input root."""
    task_events: bool = True
    """Send per-task events so Flower lists tasks (0 to save broker traffic)."""
    max_delivery_attempts: int = field(default=5, metadata=_env("STAGE_A_MAX_ATTEMPTS"))
    """An image delivered this many times without a result is failed."""
    heartbeat_interval: float = 15.0
    """Seconds between a worker process's heartbeats, idle or busy (it also writes one at start, while
    loading, after every batch and at shutdown); 0 turns them off, and with them the dead-holder rule."""
    model_load_timeout: float = 900.0
    """Seconds a worker pool process may take to load its model at start before Celery kills it
    (Celery's worker_proc_alive_timeout, 4 s by default, far too short for a real checkpoint)."""
    stall_seconds: float = 300.0
    """`status` calls a run stalled when it has pending work and no result for this long."""
    heartbeat_timeout: float = 120.0
    """A worker whose last heartbeat is older than this many seconds counts as offline in `status`."""
    rate_window: float = 120.0
    """Seconds of recent results behind `status`'s recent images/s and its ETA."""
    metrics_port: int = 0
    """Port on which a worker serves Prometheus metrics for all its pool processes (one per worker: several
    workers on a host each need their own); 0 or empty: off. deploy/prometheus/prometheus.yml scrapes it."""
    worker_shown_for: float = 3600.0
    """Seconds a stopped or offline worker stays in the workers tables of `status` and the run page."""
    log_format: str = "text"
    """text, or json: one JSON object per log line (time, level, logger, message, and run, worker, batch,
    images, seconds, tokens where the line has them), for `stage-a` commands and workers."""
    serve_basic_auth: str = ""
    """user:password that `stage-a serve` asks for (HTTP basic auth, like FLOWER_BASIC_AUTH); empty: none."""
    db_pool_size: int = 5
    """Most database connections one process opens (no overflow; see README: hosts x GPUs x 2 x this
    <= PostgreSQL max_connections, or pgbouncer in front)."""
    torch_threads: int = 0
    """CPU threads of torch in each model process (0: this host's CPUs divided evenly among its model
    processes: a worker's pool processes, `stage-a run --gpus`'s ranks; torch's own default gives every
    process all CPUs, and N processes then thrash N-fold oversubscribed cores)."""
    export_processes: int = min(8, os.cpu_count() or 1)
    """Processes (default: one per CPU, at most 8) that encode a large run's export (`stage-a export`, the end of `stage-a run`), each
    over its own range of groups; the output is the same bytes as from one."""
    export_parallel_min: int = 200_000
    """Runs of fewer images are exported by one process (starting the others costs more than it saves)."""
    sqlite_busy_timeout: float = 30.0
    """Seconds one SQLite statement waits for another writer's lock before the store retries."""
    cache_dir: str = ""
    """Where the embedded default keeps its tiny model and sample data (empty: ~/.cache/stage-a)."""
    data_dir: str = ""
    """Folder of mission and prompt data overriding the packaged one (empty: packaged)."""
    reuse: str = "auto"
    """Default of `run` and `enqueue`'s --reuse/--no-reuse, recorded with each run (workers obey the run's):
    auto takes summaries already made for the same image bytes, model, prompt and options under greedy
    decoding only; on also for sampled runs; off never (every run still records what it generates)."""
    reuse_precheck: bool = True
    """Reuse: trust a file whose path and stat signature (size, mtime, ctime, inode) match a summarized one
    without reading it (any write changes ctime); 0: hash every image's bytes to find its summary."""
    vllm_max_model_len: int = 8192
    """vLLM engine: longest prompt + completion in tokens. A 2 MP image is ~2,150 vision tokens, the
    prompt ~1,100, the completion up to max_new_tokens (1024): 8192 leaves room."""
    vllm_gpu_memory_utilization: float = 0.90
    """vLLM engine: fraction of GPU memory vLLM may take (weights + activations + KV cache). GPU only."""
    vllm_max_num_seqs: int = 128
    """vLLM engine: sequences decoded at once. A worker's default flush is 4 x this (flush_images), so a
    call can hold several times more rows and a finished sequence is replaced at once."""
    vllm_cpu_kv_cache_gib: float = 1.0
    """vLLM engine on CPU: KV cache size (vLLM's CPU backend would otherwise reserve a share of RAM)."""
    vllm_enforce_eager: bool = False
    """vLLM engine: skip CUDA graphs / torch.compile (faster start, slower steps)."""
    vllm_max_lora_rank: int = 64
    """vLLM engine: largest LoRA rank of the adapters it serves."""
    vllm_lora: bool = True
    """vLLM engine: start with LoRA support, so a worker holding a base model also serves its runs of LoRA
    adapters on that base per request, without a reload (0: full models only, slightly faster)."""
    vllm_max_loras: int = 4
    """vLLM engine: adapters held on the GPU at once (others are swapped in from CPU memory)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every variable; a malformed value is a UserError naming the variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            names = (f.metadata.get("env") or f"STAGE_A_{f.name.upper()}", *f.metadata.get("legacy", ()))
            name, raw = next(((n, env[n]) for n in names if env.get(n, "") != ""), (names[0], None))
            if raw is not None:
                values[f.name] = _parse(name, raw, f.default)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        for name in ("lease_seconds", "max_delivery_attempts", "db_pool_size", "flush_interval",
                     "model_load_timeout", "reclaim_interval", "stall_seconds", "heartbeat_timeout", "rate_window",
                     "worker_shown_for", "export_processes", "export_parallel_min",
                     "vllm_max_model_len", "vllm_max_num_seqs", "vllm_cpu_kv_cache_gib", "vllm_max_lora_rank",
                     "vllm_max_loras"):
            if getattr(self, name) <= 0:
                raise UserError(f"{_var(name)} must be > 0, got {getattr(self, name)}")
        for name in ("flush_size", "torch_threads", "heartbeat_interval", "orphan_grace", "holder_timeout", "sqlite_busy_timeout"):  # 0 has a meaning here
            if getattr(self, name) < 0:
                raise UserError(f"{_var(name)} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.metrics_port <= 65535:
            raise UserError(f"STAGE_A_METRICS_PORT must be a TCP port (1-65535) or 0 for off, got {self.metrics_port}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise UserError(f"STAGE_A_VLLM_GPU_MEMORY_UTILIZATION must be a fraction in (0, 1], "
                            f"got {self.vllm_gpu_memory_utilization}")
        user, _, password = self.serve_basic_auth.partition(":")
        if self.serve_basic_auth and not (user and password):
            raise UserError("STAGE_A_SERVE_BASIC_AUTH must be user:password, both non-empty")
        if self.log_format not in LOG_FORMATS:
            raise UserError(f"STAGE_A_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if self.reuse not in ("auto", "on", "off"):
            raise UserError(f"STAGE_A_REUSE must be one of auto, on, off, got {self.reuse!r}")
        if self.engine not in ENGINES:
            raise UserError(f"STAGE_A_ENGINE must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if not all(g.isascii() and g.isdigit() for g in self.gpus):
            raise UserError(f"STAGE_A_GPUS must be a comma-separated list of GPU indices like 0,1,2,3, "
                            f"got {','.join(self.gpus)!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device.strip().lower()):
            raise UserError(f"STAGE_A_DEVICE must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def flush_images(self) -> int:
        """Images per flush: STAGE_A_FLUSH_SIZE, else 4 model batches of the default --batch-size
        (transformers), or 4 x STAGE_A_VLLM_MAX_NUM_SEQS (vllm: a call of max_num_seqs rows leaves
        slots idle as its rows finish; README, "Batch size, flush size and max_num_seqs")."""
        if self.flush_size:
            return self.flush_size
        return 4 * (self.vllm_max_num_seqs if self.engine == "vllm" else DEFAULT_BATCH_SIZE)

    @property
    def orphan_grace_seconds(self) -> float:
        return self.orphan_grace or max(120.0, 4 * self.flush_interval)

    @property
    def holder_timeout_seconds(self) -> float | None:
        """Heartbeat age at which a lease holder is dead; None: the rule is off (no periodic heartbeats)."""
        if self.heartbeat_interval <= 0:
            return None
        return self.holder_timeout or max(60.0, 4 * self.heartbeat_interval)

    @property
    def cache_path(self) -> Path:
        base = self.cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                              "stage-a")
        return Path(base)

    def allows_input_root(self, path: str | Path) -> bool:
        """Whether workers may read below ``path`` (STAGE_A_INPUT_ROOTS; empty allows every root)."""
        if not self.input_roots:
            return True
        real = os.path.realpath(path)
        for root in self.input_roots:
            allowed = os.path.realpath(root)
            if os.path.commonpath([allowed, real]) == allowed:
                return True
        return False

    def require_database(self) -> str:
        if not self.database_url:
            raise UserError("STAGE_A_DATABASE_URL is not set (e.g. postgresql+psycopg://user@host/stage_a)")
        return self.database_url

    def open_store(self, url: str | None = None, migrate: bool = True) -> ResultStore:
        """The results store at ``url`` (default STAGE_A_DATABASE_URL, required) with this process's
        pool size and SQLite busy timeout."""
        from stage_a.store import ResultStore

        return ResultStore(url or self.require_database(), migrate, pool_size=self.db_pool_size,
                           sqlite_busy_timeout=self.sqlite_busy_timeout)

    def results_database(self, db: str | None, output_dir: Path | None = None) -> str:
        """--db (a path or an SQLAlchemy URL), else STAGE_A_DATABASE_URL, else SQLite next to the output."""
        value = db or self.database_url
        if not value:
            return f"sqlite:///{Path(output_dir or Path.cwd()).resolve() / 'stage_a_results.db'}"
        if "://" in value:
            return value
        return f"sqlite:///{Path(value).expanduser().resolve()}"


def _var(name: str) -> str:
    f = next(f for f in fields(Settings) if f.name == name)
    return str(f.metadata.get("env") or f"STAGE_A_{name.upper()}")


def _parse(name: str, raw: str, default: Any) -> Any:
    raw = raw.strip()
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{name} must be 1/0, true/false, yes/no or on/off, got {raw!r}")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise UserError(f"{name} must be an integer, got {raw!r}") from None
    if isinstance(default, float):
        try:
            value = float(raw)
        except ValueError:
            raise UserError(f"{name} must be a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {raw!r}")
        return value
    if isinstance(default, tuple):
        sep = os.pathsep if name.endswith("INPUT_ROOTS") else ","
        return tuple(p.strip() for p in raw.split(sep) if p.strip())
    return raw
