"""Shared helpers of the reliability tests (no tests here): own Redis servers, Celery workers,
`stage-a` subprocesses, input trees and polling with deadlines.

Every process a test starts is started in its own session and killed by process group in the
fixtures' teardown, so a failing test never leaves a worker or a Redis behind.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from PIL import Image

from support.cli import REPO, base_env, cli, cli_popen, read_jsonl  # noqa: F401  (re-exported)
from support.counts import assert_counters_exact
from support.store import image_rows

MISSION = "挡风板安装检查"
PASS, FAIL = "审核通过", "审核不通过"
JSONL = f"{MISSION}_stage_a.jsonl"
FAILURES = f"{MISSION}_stage_a_failures.jsonl"
T = TypeVar("T")


# ---- polling --------------------------------------------------------------------------------


def wait_for(pred: Callable[[], T], timeout: float, what: str, interval: float = 0.2,
             on_timeout: Callable[[], str] | None = None) -> T:
    """Poll ``pred`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = on_timeout() if on_timeout else ""
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{extra}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_group(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    """Signal a process started with start_new_session=True and everything it forked."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


# ---- input trees ----------------------------------------------------------------------------


def image_bytes(seed: int, size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def make_tree(root: Path, groups: int, per_group: int = 2, seed: int = 0) -> list[tuple[str, str]]:
    """``groups`` small groups (half fail, half pass) of ``per_group`` JPEGs; returns (group_id, label)
    in output order (fail groups first, then pass, by name)."""
    out: list[tuple[str, str]] = []
    sizes = [(64, 48), (48, 64), (96, 64), (64, 64)]
    n_fail = groups // 2
    for g in range(groups):
        label, folder = ("fail", FAIL) if g < n_fail else ("pass", PASS)
        gid = f"QC-REL-20240101-{g:07d}"
        d = root / MISSION / folder / gid
        d.mkdir(parents=True, exist_ok=True)
        for i in range(1, per_group + 1):
            (d / f"{gid}-{i}.jpg").write_bytes(image_bytes(seed * 100_000 + g * 100 + i, sizes[(g + i) % 4]))
        out.append((gid, label))
    return out


# ---- subprocesses ---------------------------------------------------------------------------


class RedisServer:
    """A Redis the test owns, on its own port, without persistence (a restart loses every message)."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://{':' + password + '@' if password else ''}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(self.workdir / f"redis-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.workdir),
             *(["--requirepass", self.password] if self.password else [])],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for(self.ping, 15, f"redis-server on port {self.port}", 0.05)

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=1,
                           socket_timeout=5)

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:
            return False

    def kill(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc.wait(10)
            self.proc = None

    def unacked(self) -> int:
        return int(self.client().hlen("unacked"))

    def unacked_images(self) -> int:
        """Images carried by the unacknowledged messages (a chunk message carries several)."""
        from support.queues import unacked_images

        return unacked_images(self.client())

    def queued(self, queue: str) -> int:
        """Messages waiting on ``queue`` and on its per-model queues (``queue.<model>``)."""
        from support.queues import queue_names

        client = self.client()
        return sum(int(client.llen(n)) for n in queue_names(client, queue))

    def queued_images(self, queue: str) -> int:
        """Images carried by the messages waiting on ``queue`` and its per-model queues."""
        from support.queues import queued_images

        return queued_images(self.client(), queue)


class Worker:
    """`celery -A workers worker` (prefork, one pool process unless told) in its own process group."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path, app: str = "workers", concurrency: int = 1) -> None:
        self.name = name
        self.app = app
        self.concurrency = concurrency
        self.env = env
        self.log_path = workdir / f"worker-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", self.app, "worker", "--loglevel", "INFO", "--concurrency", str(self.concurrency),
             "--pool", "prefork", "-n", f"{self.name}@%h", "--without-gossip", "--without-mingle",
             "--without-heartbeat"],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO, start_new_session=True)
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def ready(self) -> bool:
        self.assert_alive()
        return " ready." in self.log()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def assert_alive(self) -> None:
        if not self.alive():
            pytest.fail(f"worker {self.name} exited ({self.proc.returncode if self.proc else None}):\n"
                        f"{self.log()[-4000:]}")

    def pids(self) -> set[int]:
        """The main process and its pool children."""
        import psutil

        if not self.alive():
            return set()
        assert self.proc is not None
        try:
            main = psutil.Process(self.proc.pid)
            return {main.pid, *(c.pid for c in main.children(recursive=True))}
        except psutil.NoSuchProcess:
            return set()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None:
            kill_group(self.proc, sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                kill_group(self.proc, signal.SIGKILL)
                self.proc.wait(10)

    def stop(self) -> None:
        """Teardown: SIGKILL the whole group at once (fast; no pool child is left behind)."""
        if self.proc is None:
            return
        kill_group(self.proc, signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


class Farm:
    """One test's farm: its own Redis, a database URL, workers, and the `stage-a` CLI wired to them."""

    def __init__(self, workdir: Path, db_url: str, checkpoint: Path, redis_password: str | None = None,
                 **settings: str) -> None:
        self.workdir = workdir
        self.db_url = db_url
        self.checkpoint = checkpoint
        self.redis = RedisServer(workdir, redis_password)
        self.queue = "stage_a_rel"
        self.settings = {
            "STAGE_A_FLUSH_SIZE": "4", "STAGE_A_FLUSH_INTERVAL": "0.5", "STAGE_A_LEASE_SECONDS": "10",
            "STAGE_A_RECLAIM_INTERVAL": "1", "STAGE_A_ORPHAN_GRACE": "4", **settings,
        }
        self.workers: list[Worker] = []

    def env(self, **extra: str) -> dict[str, str]:
        return base_env(**{"STAGE_A_BROKER_URL": self.redis.url, "STAGE_A_DATABASE_URL": self.db_url,
                           "STAGE_A_CHECKPOINT": str(self.checkpoint), "STAGE_A_QUEUE": self.queue,
                           "OMP_NUM_THREADS": "1", **self.settings, **extra})

    def worker(self, name: str, app: str = "workers", unpinned: bool = False, concurrency: int = 1,
               **extra: str) -> Worker:
        """A started worker, pinned to the farm's checkpoint (or STAGE_A_CHECKPOINT in ``extra``), or
        ``unpinned`` (no STAGE_A_CHECKPOINT: it serves each run's model), of ``concurrency`` pool processes."""
        env = self.env(**extra)
        if unpinned:
            del env["STAGE_A_CHECKPOINT"]
        w = Worker(name, env, self.workdir, app, concurrency).start()
        self.workers.append(w)
        return w

    def enqueue(self, input_dir: Path, *extra: str) -> int:
        proc = cli(["enqueue", "--mission", MISSION, "--input-dir", str(input_dir), "--max-new-tokens", "4",
                    "--batch-size", self.settings["STAGE_A_FLUSH_SIZE"], "--sharding-mode", "per_image",
                    "--checkpoint", str(self.checkpoint), *extra], self.env(), self.workdir, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return int(proc.stdout.rsplit("run_id=", 1)[1].split()[0])

    def store(self) -> Any:
        from stage_a.store import ResultStore

        return ResultStore(self.db_url)

    def logs(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.log()[-3000:]}" for w in self.workers)

    def wait_finished(self, run_id: int, timeout: float) -> Any:
        store = self.store()
        try:
            def done() -> Any:
                for w in self.workers:
                    if w.proc is not None and w.proc.returncode not in (None, -9):
                        w.assert_alive()
                c = store.queries.counts(run_id)
                return c if c.finished else None

            def report() -> str:
                rows = [(r["group_position"], r["image_index"], r["status"], r["attempts"], r["worker"])
                        for r in image_rows(store, run_id) if r["status"] != "done"]
                return (f"{store.queries.counts(run_id)}\nunfinished rows: {rows}\nqueued {self.redis.queued(self.queue)} "
                        f"unacked {self.redis.unacked() if self.redis.ping() else '?'}\n{self.logs()}")

            counts = wait_for(done, timeout, f"run {run_id} to finish", 0.5, on_timeout=report)
            # Every farm test, the fault tests included, checks the run's counters against a full count.
            assert_counters_exact(store.engine, [run_id])
            return counts
        finally:
            store.close()

    def export(self, run_id: int, out: Path) -> subprocess.CompletedProcess[str]:
        return cli(["export", str(run_id), "--output-dir", str(out)], self.env(), self.workdir, timeout=120)

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.redis.kill()


@pytest.fixture()
def farm_factory(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Callable[..., Farm]]:
    """Build farms (own Redis started); every process is killed at teardown, pass or fail."""
    farms: list[Farm] = []

    def make(db_url: str, redis_password: str | None = None, **settings: str) -> Farm:
        farm = Farm(tmp_path, db_url, tiny_checkpoint, redis_password, **settings)
        farms.append(farm)
        farm.redis.start()
        return farm

    yield make
    for farm in farms:
        farm.close()


def check_export(out: Path, expected: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Every expected group exactly once, in order, every image summarized; nothing failed."""
    records = read_jsonl(out / JSONL)
    keys = [(r["group_id"], r["label"]) for r in records]
    assert keys == expected, f"export groups differ: missing {set(expected) - set(keys)}, extra/dup {len(keys) - len(set(keys))}"
    for r in records:
        assert len(r["per_image"]) == len(r["images"]) and all(r["per_image"].values())
    assert (out / FAILURES).read_text(encoding="utf-8") == ""
    return records


def check_rows(store: Any, run_id: int, n_images: int) -> list[dict[str, Any]]:
    """One row per image (no duplicates by construction of the key, asserted anyway), all done."""
    rows = image_rows(store, run_id)
    keys = [(r["group_position"], r["image_index"]) for r in rows]
    assert len(rows) == n_images and len(set(keys)) == n_images
    assert {r["status"] for r in rows} == {"done"}, [(r["rel_path"], r["status"], r["error"]) for r in rows
                                                      if r["status"] != "done"]
    return rows
