"""Prometheus metrics of a worker host: counted in the pool processes, served by the main process.

Prefork pool processes cannot each serve a port, so prometheus-client's multiprocess mode is used:
``setup`` (worker_init, main process, before the pool forks) points PROMETHEUS_MULTIPROC_DIR at a
directory of this worker's own, emptied at start, and serves STAGE_A_METRICS_PORT from it; each pool
process writes its values to memory-mapped files there and ``process_dead`` (worker_process_shutdown)
folds a finished process's live gauges away. Without STAGE_A_METRICS_PORT nothing is served and the
values stay in each process's memory (tests driving WorkerRuntime directly read them from there).

Labels are bounded: mission, model (the base model identity a worker holds), engine, outcome or failure
class, stage, gpu; never a run or image id. The hot path is a few counter increments per model batch.
Whether a worker host is up is Prometheus' own ``up`` series of the scrape (deploy/prometheus);
``stage_a_worker_processes_ready`` counts its pool processes that hold a model.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stage_a.failures import failure_class

if TYPE_CHECKING:
    from engine.steploop import BatchDone
    from stage_a.settings import Settings

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Seconds: a tiny CPU batch takes ~0.1 s, a 32-image vLLM batch of 2 MP photos tens of seconds."""
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LOAD_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0)

_metrics: Any = None
_server: Any = None


class _Metrics:
    """Every series a pool process writes (created once per process, after the environment is set)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        base = ["mission", "model", "engine"]
        self.images = Counter("stage_a_worker_images", "Images through the model, by outcome (done or failed).",
                              [*base, "outcome"])
        self.failures = Counter("stage_a_worker_failures", "Failed images by reason class (stage_a/failures.py).",
                                [*base, "class"])
        self.prompt_tokens = Counter("stage_a_worker_prompt_tokens", "Prompt tokens (text and vision) processed.",
                                     base)
        self.generation_tokens = Counter("stage_a_worker_generation_tokens", "Tokens generated.", base)
        self.messages = Counter(
            "stage_a_worker_messages",
            "Task messages by outcome: done, failed, rejected (dead letter), cancelled, skipped, handed_back, "
            "redelivered (re-queued after a database or broker outage).", ["outcome"])
        self.dead_letters = Counter("stage_a_worker_dead_letters", "Messages this worker dead-lettered.")
        self.batch_seconds = Histogram(
            "stage_a_worker_batch_seconds",
            "Model batch latency by stage: prepare (decode and preprocess, prefetched), generate, and "
            "batch (generate plus recording the results).", ["stage", "model", "engine"], buckets=LATENCY_BUCKETS)
        self.batch_images = Histogram("stage_a_worker_batch_images", "Images per model batch.", ["model", "engine"],
                                      buckets=SIZE_BUCKETS)
        self.model_load_seconds = Histogram("stage_a_worker_model_load_seconds", "Seconds to load a model.",
                                            ["engine"], buckets=LOAD_BUCKETS)
        self.ready = Gauge("stage_a_worker_processes_ready", "Pool processes started and ready for work.",
                           multiprocess_mode="livesum")
        self.memory_used = Gauge("stage_a_worker_device_memory_used_bytes", "Device memory in use on the GPU "
                                 "(all processes on it).", ["gpu"], multiprocess_mode="livemax")
        self.memory_total = Gauge("stage_a_worker_device_memory_total_bytes", "Device memory of the GPU.", ["gpu"],
                                  multiprocess_mode="livemax")
        self.kv_cache = Gauge("stage_a_worker_vllm_kv_cache_usage_ratio", "vLLM engine: share of its KV cache in use.",
                              ["gpu"], multiprocess_mode="livemax")
        self.sequences = Gauge("stage_a_worker_vllm_sequences", "vLLM engine: sequences running or waiting.",
                               ["gpu", "state"], multiprocess_mode="livesum")


def metrics() -> _Metrics:
    global _metrics
    if _metrics is None:
        _metrics = _Metrics()
    return _metrics


# ---- the main process ------------------------------------------------------------------------------


def multiproc_dir(settings: Settings, node: str | None) -> Path:
    """This worker's own directory (one per worker on a host: several share the cache folder)."""
    name = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in (node or f"pid{os.getpid()}"))
    return settings.cache_path / "metrics" / name


def setup(settings: Settings, node: str | None) -> int | None:
    """Main process, before the pool forks: multiprocess mode in a fresh directory and the HTTP exporter on
    STAGE_A_METRICS_PORT. Returns the port served (None: metrics off)."""
    global _server
    if not settings.metrics_port:
        return None
    path = multiproc_dir(settings, node)
    shutil.rmtree(path, ignore_errors=True)  # the last run's files would add to this one's counters
    path.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server, values

    values.ValueClass = values.get_value_class()  # in case prometheus_client was imported before the variable
    registry = CollectorRegistry()
    registry.register(_LiveOnly(str(path)))
    ProcessCollector(registry=registry)  # the main process's start time: restarts (flapping) show in it
    _server = start_http_server(settings.metrics_port, registry=registry)
    log.info("worker metrics on port %d (multiprocess files in %s)", settings.metrics_port, path)
    return settings.metrics_port


class _LiveOnly:
    """MultiProcessCollector that first folds away the live gauges of pool processes that died without a
    shutdown hook (SIGKILL, out of memory), so a killed process is not counted ready forever."""

    def __init__(self, path: str) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self.path = path
        self.inner = MultiProcessCollector(None, path)

    def collect(self) -> Any:
        for f in Path(self.path).glob("gauge_live*_*.db"):
            pid = f.stem.rsplit("_", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                process_dead(int(pid))
        return self.inner.collect()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_dead(pid: int) -> None:
    """A pool process ended: its live gauges no longer count (its counters stay summed)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)


# ---- pool processes --------------------------------------------------------------------------------


def record_batch(batch: BatchDone, mission: str, model: str | None, engine: str | None) -> None:
    """One model batch: images by outcome, failures by class, tokens, latencies, size (one call per batch)."""
    m = metrics()
    model, engine = model or "", engine or ""
    done = tokens_in = tokens_out = 0
    prepare_ms = generate_ms = 0.0
    classes: dict[str, int] = {}
    for r in batch.results:
        if r.ok:
            done += 1
        else:
            cls = failure_class(r.error or "empty summary")
            classes[cls] = classes.get(cls, 0) + 1
        tokens_in += r.prompt_tokens or 0
        tokens_out += r.completion_tokens or 0
        prepare_ms += r.preprocess_ms or 0.0
        generate_ms += r.generate_ms or 0.0
    failed = batch.images - done
    if done:
        m.images.labels(mission, model, engine, "done").inc(done)
    if failed:
        m.images.labels(mission, model, engine, "failed").inc(failed)
    for cls, n in classes.items():
        m.failures.labels(mission, model, engine, cls).inc(n)
    if tokens_in:
        m.prompt_tokens.labels(mission, model, engine).inc(tokens_in)
    if tokens_out:
        m.generation_tokens.labels(mission, model, engine).inc(tokens_out)
    m.batch_seconds.labels("batch", model, engine).observe(batch.seconds)
    if prepare_ms:
        m.batch_seconds.labels("prepare", model, engine).observe(prepare_ms / 1000)
    if generate_ms:
        m.batch_seconds.labels("generate", model, engine).observe(generate_ms / 1000)
    m.batch_images.labels(model, engine).observe(batch.images)


def record_messages(kinds: list[str]) -> None:
    """The outcome of each message of a buffer."""
    counts: dict[str, int] = {}
    for k in kinds:
        counts[k] = counts.get(k, 0) + 1
    for k, n in counts.items():
        metrics().messages.labels(k).inc(n)


def record_dead_letter() -> None:
    metrics().dead_letters.inc()


def record_load(seconds: float, engine: str) -> None:
    metrics().model_load_seconds.labels(engine).observe(seconds)


def set_ready(ready: bool) -> None:
    metrics().ready.set(1 if ready else 0)


def gpu_label() -> str:
    """The GPU this process uses as the host numbers it (its pinned STAGE_A_GPUS entry), "0" unpinned."""
    return (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]


def sample_device(engine: Any) -> None:
    """Device memory of this process's GPU (absent without CUDA) and the vLLM engine's scheduler figures."""
    m = metrics()
    gpu = gpu_label()
    import sys

    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            free, total = torch.cuda.mem_get_info()
            m.memory_used.labels(gpu).set(total - free)
            m.memory_total.labels(gpu).set(total)
    except Exception as exc:  # monitoring never fails work
        log.debug("device memory unavailable: %s", exc)
    stats: Callable[[], dict[str, float] | None] | None = getattr(engine, "scheduler_stats", None)
    figures = stats() if stats is not None else None
    if figures:
        m.kv_cache.labels(gpu).set(figures["kv_cache_usage"])
        m.sequences.labels(gpu, "running").set(figures["running"])
        m.sequences.labels(gpu, "waiting").set(figures["waiting"])


class DeviceSampler:
    """Samples the device and engine figures every ``interval`` seconds in a daemon thread (a vLLM batch runs
    for seconds: its KV-cache usage is only meaningful while it runs, never at a batch's end)."""

    def __init__(self, engine: Callable[[], Any], interval: float = 2.0) -> None:
        self.engine = engine
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="stage-a-device-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                sample_device(self.engine())
            except Exception as exc:
                log.debug("device sample failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
