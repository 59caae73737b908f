"""Redis restarted mid-run (the test's own Redis, no persistence: every queued message is lost).

The workers reconnect by themselves, and the reclaimer running in them (the producer side of
recovery) reconnects too and re-enqueues the pending images whose messages vanished.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from test_reliability_support import Farm, check_export, check_rows, farm_factory, make_tree, wait_for  # noqa: F401

pytestmark = pytest.mark.slow
ORPHAN_LINE = "pending images with no message on the broker"


def test_redis_restart_mid_run_nothing_lost_or_duplicated(pg_url: str, farm_factory, tmp_path: Path) -> None:  # noqa: F811
    expected = make_tree(tmp_path / "in", groups=8, per_group=2)
    farm: Farm = farm_factory(pg_url, STAGE_A_LEASE_SECONDS="30")
    workers = [farm.worker("r1"), farm.worker("r2")]
    wait_for(lambda: all(w.ready() for w in workers), 90, "workers ready", on_timeout=farm.logs)
    pids = [w.pids() for w in workers]
    run_id = farm.enqueue(tmp_path / "in")
    store = farm.store()

    wait_for(lambda: store.counts(run_id).done >= 4, 150, "the first results", 0.1, on_timeout=farm.logs)
    queued = farm.redis.queued(farm.queue)
    at_kill = store.counts(run_id)
    farm.redis.kill()  # SIGKILL: queued and unacked messages are gone
    time.sleep(2)
    farm.redis.start()
    restarted = time.monotonic()
    assert farm.redis.queued(farm.queue) == 0

    counts = farm.wait_finished(run_id, 180)
    assert counts.done == 16 and counts.failed == 0
    for w, before in zip(workers, pids, strict=True):
        w.assert_alive()
        assert w.pids() == before, f"worker {w.name} was restarted"
        assert "Connection to broker lost" in w.log() or "Cannot connect to redis" in w.log(), w.log()[-3000:]
    resent = [int(m) for w in workers for m in re.findall(rf"re-enqueued (\d+) {ORPHAN_LINE}", w.log())]
    if queued:  # messages were lost with the old Redis: the reclaimer found and re-sent them
        assert resent, farm.logs()
    # ... once: the reclaimers of both hosts saw the same orphans, only one of them re-sent each.
    assert sum(resent) <= at_kill.pending + at_kill.leased, (resent, at_kill)
    assert time.monotonic() - restarted < 180
    check_rows(store, run_id, 16)
    store.close()

    out = tmp_path / "out"
    proc = farm.export(run_id, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_export(out, expected)
