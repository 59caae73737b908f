"""Redis restarted mid-run (the test's own Redis, no persistence: every queued message is lost).

The workers reconnect by themselves, and the reclaimer running in them reconnects too and
re-enqueues the pending images whose messages vanished. The outcome is what is asserted: every
image done exactly once, by the same worker processes, and the export complete. How lost messages
are found and re-sent once is the second test's subject, step by step.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from support.farm import Farm, check_export, check_rows, farm_factory, make_tree, wait_for  # noqa: F401

pytestmark = pytest.mark.slow


def test_redis_restart_mid_run_nothing_lost_or_duplicated(pg_url: str, farm_factory, tmp_path: Path) -> None:  # noqa: F811
    # Enough work that messages still wait on the broker when it dies (two workers finish 28 images
    # of 4 tokens in about a second): with less, both workers may have prefetched the rest between
    # the queue length read and the kill (kombu then restores them).
    expected = make_tree(tmp_path / "in", groups=40, per_group=2)
    total = 80
    farm: Farm = farm_factory(pg_url, STAGE_A_LEASE_SECONDS="30")
    workers = [farm.worker("r1"), farm.worker("r2")]
    store = farm.store()  # opened (schema checked) before the run starts: the first results are seen at once
    wait_for(lambda: all(w.ready() for w in workers), 90, "workers ready", on_timeout=farm.logs)
    pids = [w.pids() for w in workers]
    run_id = farm.enqueue(tmp_path / "in", "--max-new-tokens", "32")

    wait_for(lambda: store.queries.counts(run_id).done >= 4, 150, "the first results", 0.1, on_timeout=farm.logs)
    queued = farm.redis.queued(farm.queue)
    assert queued > 0, "the run finished before Redis was killed: nothing was tested"
    farm.redis.kill()  # SIGKILL: queued and unacked messages are gone

    def lost_broker(w) -> bool:  # type: ignore[no-untyped-def]
        return "Connection to broker lost" in w.log() or "Cannot connect to redis" in w.log()

    # Redis stays down until both workers have seen it go.
    wait_for(lambda: all(lost_broker(w) for w in workers), 60, "both workers to lose the broker", 0.1,
             on_timeout=farm.logs)
    farm.redis.start()
    restarted = time.monotonic()
    assert farm.redis.queued(farm.queue) == 0

    counts = farm.wait_finished(run_id, 180)
    assert counts.done == total and counts.failed == 0
    for w, before in zip(workers, pids, strict=True):
        w.assert_alive()
        assert w.pids() == before, f"worker {w.name} was restarted"
        assert lost_broker(w), w.log()[-3000:]
    assert time.monotonic() - restarted < 180
    check_rows(store, run_id, total)
    store.close()

    out = tmp_path / "out"
    proc = farm.export(run_id, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_export(out, expected)


def test_orphan_recovery_ignores_in_flight_messages_and_re_sends_once(pg_url: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The reclaimer's orphan path, step by step on a real Redis and PostgreSQL (no model needed).

    Pending images are re-sent only when no message of their queue exists anywhere on the broker:
    not while one waits in the queue, nor while a worker holds one unacknowledged (prefetched while
    its model loads); yes once Redis lost them, whatever other queues hold; and with two reclaimers
    (two worker hosts) each image is re-sent once.
    """
    from kombu import Connection
    from support.farm import MISSION, RedisServer

    from producer.publish import Publisher
    from producer.register import register_run
    from stage_a.config import RunSpec
    from stage_a.settings import Settings
    from stage_a.store import ResultStore, utcnow
    from workers.reclaimer import Reclaimer

    make_tree(tmp_path / "in", groups=1, per_group=2)
    store = ResultStore(pg_url)
    reg = register_run(store, RunSpec(mission=MISSION, dataset="bbu", input_root=""), tmp_path / "in", farm=True)
    redis = RedisServer(tmp_path)
    redis.start()
    settings = Settings(broker_url=redis.url, database_url=pg_url, queue="orphans", orphan_grace=30)
    # Every pass judges the grace period a minute from now: only the broker decides what is lost.
    later = lambda: utcnow() + timedelta(seconds=60)  # noqa: E731
    reclaimers = [Reclaimer(settings, clock=later), Reclaimer(settings, clock=later)]
    conn, other = Connection(redis.url), Connection(redis.url)
    try:
        Publisher(settings).publish_items(store.unfinished_items(reg.run_id), "per_image", store.store_id)
        assert reclaimers[0].once().orphaned == 0  # the messages wait in the queue

        ours = conn.SimpleQueue("orphans")
        held = [ours.get(timeout=5), ours.get(timeout=5)]  # a worker holds both, unacknowledged
        assert redis.queued("orphans") == 0 and redis.unacked() == 2
        assert reclaimers[0].once().orphaned == 0  # in flight, not lost

        redis.client().flushall()  # Redis lost everything (what a restart without persistence does)
        foreign = other.SimpleQueue("another_farm")
        foreign.put({"x": 1})
        held.append(foreign.get(timeout=5))  # another queue's unacknowledged message does not count
        assert redis.unacked() == 1
        assert sum(r.once().orphaned for r in reclaimers) == 2
        assert redis.queued_images("orphans") == 2
        assert all(r.once().orphaned == 0 for r in reclaimers)  # re-sent, queued again: nothing to do
    finally:
        for c in (conn, other):  # closed while Redis is up (kombu hands unacked messages back on close)
            c.release()
        redis.kill()
        store.close()
