"""A worker that dies holding leases loses them within about a minute, not after STAGE_A_LEASE_SECONDS.

The store knows each leased image's holder (the worker process name) and that worker's last
heartbeat, which a busy worker keeps writing every STAGE_A_HEARTBEAT_INTERVAL. The reclaimer
re-sends the images of a holder whose heartbeat is older than STAGE_A_HOLDER_TIMEOUT (or that says
stopped); a slow worker, still beating, is never called dead. Status names the dead holder and
claims no ETA while its images wait.
"""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from support.cli import base_env, cli
from support.farm import MISSION, Farm, RedisServer, farm_factory, make_tree, wait_for  # noqa: F401
from support.store import image_rows

from stage_a.config import RunSpec
from stage_a.settings import Settings
from stage_a.store import GroupInput, ResultStore
from stage_a.store.models import WorkerRow
from stage_a.work import WorkItem
from workers.reclaimer import Reclaimer, ReclaimReport

QUEUE = "stage_a_dead_holder"
HOLDER = "gpu-host-7@farm:4242"


def _farm_run(store: ResultStore, n_groups: int = 3) -> tuple[int, list[WorkItem]]:
    groups = [GroupInput(f"QC-DH-20240101-{g:07d}", "pass", (f"x/{g}/a.jpg", f"x/{g}/b.jpg")) for g in range(n_groups)]
    run_id = store.create_run(RunSpec(mission=MISSION, dataset="bbu", input_root="/nowhere"), groups, farm=True)
    return run_id, store.unfinished_items(run_id)


def _set_heartbeat(store: ResultStore, name: str, at: datetime, state: str = "busy") -> None:
    with store.engine.begin() as c:
        c.execute(update(WorkerRow).where(WorkerRow.name == name).values(heartbeat_at=at, state=state))


def test_default_settings_resend_a_dead_holders_images_within_two_minutes(pg_url: str, redis: RedisServer) -> None:
    """Every setting at its default (lease 1800 s): a worker beating through a 10-minute batch keeps its
    images; once it stops beating, its images are re-sent by the first pass after STAGE_A_HOLDER_TIMEOUT,
    at worst 75 s after its last beat, which leaves a batch's time inside the 2 minutes."""
    settings = Settings(broker_url=redis.url, database_url=pg_url, queue=QUEUE)
    assert settings.lease_seconds == 1800 and settings.heartbeat_interval == 15
    interval, timeout = settings.reclaim_interval, settings.holder_timeout_seconds
    assert timeout is not None
    store = ResultStore(pg_url)
    try:
        run_id, items = _farm_run(store)
        store.heartbeat(HOLDER, "busy", started=True)
        store.lease([it.key for it in items], HOLDER, settings.lease_seconds)
        start = store.queries.worker_beats()[0].heartbeat_at

        def reclaim_at(t: datetime) -> ReclaimReport:
            return Reclaimer(settings, store, clock=lambda: t, host="test-host").once()

        # Slow, not dead: it beats every interval through a 10-minute batch; each pass comes just
        # before its next beat (the oldest its heartbeat ever is).
        beat = start
        while beat < start + timedelta(minutes=10):
            _set_heartbeat(store, HOLDER, beat)
            assert reclaim_at(beat + timedelta(seconds=settings.heartbeat_interval - 0.01)) == ReclaimReport(0, 0, 0)
            beat += timedelta(seconds=settings.heartbeat_interval)
        assert {r["status"] for r in image_rows(store, run_id)} == {"leased"}
        assert redis.queued(QUEUE) == 0

        # SIGKILLed right after a beat. The worst phase: a pass lands just before the beat is stale,
        # the next one a reclaim interval later.
        died = beat
        _set_heartbeat(store, HOLDER, died)
        t = died + timedelta(seconds=timeout - 0.01)
        assert reclaim_at(t).dead_holders == 0
        t += timedelta(seconds=interval)
        assert reclaim_at(t) == ReclaimReport(0, 0, len(items))
        assert (t - died).total_seconds() <= 75 < 120
        assert redis.queued_images(QUEUE) == len(items)
        rows = image_rows(store, run_id)
        assert {r["status"] for r in rows} == {"pending"} and {r["attempts"] for r in rows} == {1}
        # Each image is re-sent once, whichever reclaimer wins it.
        assert reclaim_at(t).dead_holders == 0 and redis.queued_images(QUEUE) == len(items)
    finally:
        store.close()


def test_a_stopped_holder_is_dead_at_once_and_no_heartbeats_turn_the_rule_off(pg_url: str, redis: RedisServer) -> None:
    store = ResultStore(pg_url)
    try:
        run_id, items = _farm_run(store, 1)
        store.heartbeat(HOLDER, "busy", started=True)
        store.lease([it.key for it in items], HOLDER, 1800)
        _set_heartbeat(store, HOLDER, store.queries.worker_beats()[0].heartbeat_at - timedelta(hours=1))
        off = Settings(broker_url=redis.url, database_url=pg_url, queue=QUEUE, heartbeat_interval=0)
        assert off.holder_timeout_seconds is None
        assert Reclaimer(off, store).once() == ReclaimReport(0, 0, 0)  # only the lease counts then

        store.heartbeat(HOLDER, "stopped")  # a fresh beat, but it says it stopped while holding leases
        on = Settings(broker_url=redis.url, database_url=pg_url, queue=QUEUE)
        assert Reclaimer(on, store).once() == ReclaimReport(0, 0, len(items))
        assert redis.queued_images(QUEUE) == len(items)
    finally:
        store.close()


def test_status_names_the_offline_holder_and_claims_no_eta(pg_url: str, tmp_path: Path) -> None:
    from stage_a.work import ImageResult

    store = ResultStore(pg_url)
    try:
        run_id, items = _farm_run(store, 2)
        store.heartbeat("alive@farm:1", "ready", started=True)
        store.heartbeat(HOLDER, "busy", started=True)
        done, held = items[:2], items[2:]
        store.lease([it.key for it in items], "alive@farm:1", 1800)
        store.record_results([ImageResult(key=it.key, summary="ok") for it in done], "alive@farm:1")
        store.lease([it.key for it in held], HOLDER, 1800)
        last_beat = store.queries.worker_beats()[1].heartbeat_at - timedelta(minutes=3)
        _set_heartbeat(store, HOLDER, last_beat)
    finally:
        store.close()
    env = base_env(STAGE_A_DATABASE_URL=pg_url, STAGE_A_BROKER_URL=f"redis://127.0.0.1:{_closed_port()}/0")
    since = last_beat.strftime("%Y-%m-%d %H:%M:%S") + "Z"
    text = cli(["status", str(run_id)], env, tmp_path, timeout=120)
    assert text.returncode == 0, text.stderr
    assert f"2 images leased by offline worker {HOLDER} since {since}" in text.stdout, text.stdout
    assert "ETA -" in text.stdout, text.stdout
    js = cli(["status", str(run_id), "--json"], env, tmp_path, timeout=120)
    report = json.loads(js.stdout)
    assert report["throughput"]["eta_s"] is None
    assert f"2 images leased by offline worker {HOLDER} since {since}" in report["reason"]
    assert [(h["worker"], h["images"]) for h in report["dead_holders"]] == [(HOLDER, 2)]


def _closed_port() -> int:
    from support.farm import free_port

    return free_port()


# ---- real worker processes -------------------------------------------------------------------


@pytest.mark.slow
def test_sigkilled_worker_images_are_done_well_within_two_minutes(pg_url: str, farm_factory, tmp_path: Path) -> None:  # noqa: F811
    """Default lease (1800 s); heartbeats every second, a holder dead after 4 s of silence."""
    make_tree(tmp_path / "in", groups=6, per_group=2)
    farm: Farm = farm_factory(pg_url, STAGE_A_LEASE_SECONDS="1800", STAGE_A_HEARTBEAT_INTERVAL="1",
                              STAGE_A_HOLDER_TIMEOUT="4", STAGE_A_TEST_SLOW_BATCH_S="1.5")
    a, b = farm.worker("a", app="support.slow_app"), farm.worker("b", app="support.slow_app")
    wait_for(lambda: a.ready() and b.ready(), 90, "both workers ready", on_timeout=farm.logs)
    # What the victim holds leased is re-sent by the dead-holder rule; a chunk it prefetched and never leased
    # is restored from the broker (the next test isolates that case).
    run_id = farm.enqueue(tmp_path / "in")
    store = farm.store()

    def holder_pids(w) -> set[int]:  # type: ignore[no-untyped-def]
        pids = w.pids()
        return {int(str(r["worker"]).rsplit(":", 1)[1]) for r in image_rows(store, run_id)
                if r["status"] == "leased" and int(str(r["worker"]).rsplit(":", 1)[1]) in pids}

    victim = wait_for(lambda: next((w for w in (a, b) if holder_pids(w)), None), 120, "a worker to lease a batch",
                      0.05, on_timeout=farm.logs)
    survivor = b if victim is a else a
    victim_pids = victim.pids()
    victim.kill(signal.SIGKILL)
    killed = time.monotonic()
    lost = {(r["group_position"], r["image_index"]) for r in image_rows(store, run_id)
            if r["status"] == "leased" and int(str(r["worker"]).rsplit(":", 1)[1]) in victim_pids}
    assert lost, "the kill must land while the batch is in flight"

    counts = farm.wait_finished(run_id, 110)
    took = time.monotonic() - killed
    assert counts.done == 12 and counts.failed == 0
    assert took < 120, took
    # Whichever comes first brings the chunk back: its message restored from the broker, or its leases released.
    log = survivor.log()
    assert "leased by offline workers" in log or "held unacknowledged by offline worker" in log, log[-3000:]
    by_key = {(r["group_position"], r["image_index"]): r for r in image_rows(store, run_id)}
    for key in lost:
        assert by_key[key]["status"] == "done" and by_key[key]["attempts"] >= 2
    store.close()


@pytest.mark.slow
def test_slow_worker_that_beats_is_never_called_dead(pg_url: str, farm_factory, tmp_path: Path) -> None:  # noqa: F811
    """One batch takes 6 s, twice the holder timeout: the heartbeat thread beats through it, so neither
    the worker's own reclaimer (every second) nor `stage-a reclaim` re-sends anything."""
    make_tree(tmp_path / "in", groups=2, per_group=2)
    farm: Farm = farm_factory(pg_url, STAGE_A_LEASE_SECONDS="1800", STAGE_A_HEARTBEAT_INTERVAL="1",
                              STAGE_A_HOLDER_TIMEOUT="3", STAGE_A_TEST_SLOW_BATCH_S="6", STAGE_A_FLUSH_INTERVAL="2")
    w = farm.worker("slow", app="support.slow_app")
    wait_for(w.ready, 90, "the worker ready", on_timeout=farm.logs)
    run_id = farm.enqueue(tmp_path / "in")
    store = farm.store()
    wait_for(lambda: any(r["status"] == "leased" for r in image_rows(store, run_id)), 60, "the batch leased", 0.05,
             on_timeout=farm.logs)
    leased_at = time.monotonic()
    time.sleep(max(0.0, 4.0 - (time.monotonic() - leased_at)))  # past the holder timeout, mid-batch
    assert any(r["status"] == "leased" for r in image_rows(store, run_id)), "the batch must still be running"
    reclaim = cli(["reclaim"], farm.env(), tmp_path, timeout=120)
    assert reclaim.returncode == 0 and "0 from offline workers" in reclaim.stdout, reclaim.stdout + reclaim.stderr
    counts = farm.wait_finished(run_id, 120)
    assert counts.done == 4
    assert {r["attempts"] for r in image_rows(store, run_id)} == {1}
    assert "offline workers" not in w.log() and farm.redis.queued(farm.queue) == 0
    store.close()


@pytest.mark.slow
def test_status_of_a_run_whose_only_worker_was_sigkilled(pg_url: str, farm_factory, tmp_path: Path) -> None:  # noqa: F811
    """The only worker is SIGKILLed holding a batch: status names it (its node:pid, the name on the rows
    and in Flower's node), claims no ETA, and --exit-code says stalled (5) once it is offline: its leased
    images and the run's last small chunks, which no live worker takes, are all that is left."""
    make_tree(tmp_path / "in", groups=2, per_group=2)
    farm: Farm = farm_factory(pg_url, STAGE_A_LEASE_SECONDS="1800", STAGE_A_HEARTBEAT_INTERVAL="1",
                              STAGE_A_HOLDER_TIMEOUT="4", STAGE_A_TEST_SLOW_BATCH_S="30",
                              STAGE_A_FLUSH_SIZE="4", STAGE_A_HEARTBEAT_TIMEOUT="4")
    w = farm.worker("solo", app="support.slow_app")
    wait_for(lambda: w.ready(), 90, "the worker ready", on_timeout=farm.logs)
    run_id = farm.enqueue(tmp_path / "in")
    store = farm.store()
    try:
        leased = wait_for(lambda: [r for r in image_rows(store, run_id) if r["status"] == "leased"] or None, 120,
                          "the worker to lease its batch", 0.05, on_timeout=farm.logs)
        w.kill(signal.SIGKILL)
        holder = str(leased[0]["worker"])
        assert holder.startswith("solo@") and holder.rsplit(":", 1)[1].isdigit(), holder
        env = farm.env()

        def report() -> dict | None:  # type: ignore[type-arg]
            proc = cli(["status", str(run_id), "--json", "--exit-code"], env, tmp_path, timeout=120)
            js = json.loads(proc.stdout)
            return js if js["dead_holders"] and js["state"] == "stalled" and proc.returncode == 5 else None

        js = wait_for(report, 60, "status to call the run stalled with a dead holder", 1.0,
                      on_timeout=lambda: cli(["status", str(run_id)], env, tmp_path, timeout=120).stdout)
        assert js["throughput"]["eta_s"] is None
        assert f"leased by offline worker {holder} since" in js["reason"], js["reason"]
        text = cli(["status", str(run_id)], env, tmp_path, timeout=120)
        assert f"leased by offline worker {holder}" in text.stdout and "ETA -" in text.stdout, text.stdout
    finally:
        store.close()


@pytest.mark.slow
def test_sigkilled_workers_prefetched_unleased_messages_are_restored_at_once(pg_url: str, farm_factory,  # noqa: F811
                                                                            tmp_path: Path) -> None:
    """The victim runs one chunk (leased) and holds the next, prefetched and not yet leased: its images are
    pending and its message unacknowledged, which neither the dead-holder rule (no lease) nor orphan recovery
    (the queue is busy while kombu holds it) can see. The victim named it on the broker (stage_a.held), so a
    reclaimer restores it once the victim's alive key expires, not after the 1,860 s visibility timeout."""
    make_tree(tmp_path / "in", groups=6, per_group=2)  # 12 images: 3 chunks of 4 (the flush size)
    farm: Farm = farm_factory(pg_url, STAGE_A_LEASE_SECONDS="1800", STAGE_A_HEARTBEAT_INTERVAL="1",
                              STAGE_A_HOLDER_TIMEOUT="4", STAGE_A_TEST_SLOW_BATCH_S="5")
    victim = farm.worker("victim", app="support.slow_app")
    wait_for(victim.ready, 90, "the victim ready", on_timeout=farm.logs)
    run_id = farm.enqueue(tmp_path / "in")
    store = farm.store()

    def holds_a_prefetched_chunk() -> bool:
        rows = image_rows(store, run_id)
        return sum(r["status"] == "leased" for r in rows) == 4 and farm.redis.unacked() >= 2

    wait_for(holds_a_prefetched_chunk, 60, "the victim running one chunk and holding the next", 0.05,
             on_timeout=farm.logs)
    victim.kill(signal.SIGKILL)
    killed = time.monotonic()
    assert farm.redis.unacked() >= 2  # the running chunk's message and the prefetched one
    survivor = farm.worker("survivor", app="support.slow_app")
    counts = farm.wait_finished(run_id, 90)
    assert counts.done == 12 and counts.failed == 0
    assert time.monotonic() - killed < 90
    assert "held unacknowledged by offline worker processes" in survivor.log(), survivor.log()[-3000:]
    assert farm.redis.unacked() == 0
    store.close()
