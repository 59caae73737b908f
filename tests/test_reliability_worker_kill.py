"""A worker SIGKILLed while generating: a surviving worker (never restarted) finishes the run.

Redis only hands unacknowledged messages back to a consumer that starts after the visibility
timeout, so the survivor alone would never see the dead worker's batch; the store's leases and
the reclaimer in every worker re-enqueue it within STAGE_A_LEASE_SECONDS.

Both URLs carry a password (Redis with requirepass; PostgreSQL trust auth ignores it), and no
log line, status or export output may show it.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from support.farm import (  # noqa: F401
    Farm,
    check_export,
    check_rows,
    cli,
    farm_factory,
    make_tree,
    wait_for,
)
from support.store import image_rows

pytestmark = pytest.mark.slow


SECRET = "SECRETPW"


def test_worker_killed_mid_batch_run_completes_via_reclaimer(pg_url: str, farm_factory, tmp_path: Path) -> None:  # noqa: F811
    expected = make_tree(tmp_path / "in", groups=6, per_group=2)
    db_url = pg_url.replace("postgres@", f"postgres:{SECRET}@", 1)
    assert SECRET in db_url
    farm: Farm = farm_factory(db_url, redis_password=SECRET, STAGE_A_LEASE_SECONDS="6", STAGE_A_FLUSH_SIZE="4")
    a, b = farm.worker("a"), farm.worker("b")
    wait_for(lambda: a.ready() and b.ready(), 90, "both workers ready", on_timeout=farm.logs)
    run_id = farm.enqueue(tmp_path / "in")
    store = farm.store()

    def leased_by_one_worker():  # type: ignore[no-untyped-def]
        """The worker whose pool process holds leased rows right now (it is generating)."""
        for w in (a, b):
            pids = w.pids()
            rows = [r for r in image_rows(store, run_id)
                    if r["status"] == "leased" and int(str(r["worker"]).rsplit(":", 1)[1]) in pids]
            if rows:
                return w, rows
        return None

    victim, leased = wait_for(leased_by_one_worker, 120, "a worker to lease a batch", 0.05, on_timeout=farm.logs)
    survivor = b if victim is a else a
    survivor_pids = survivor.pids()
    victim_pids = victim.pids()
    victim.kill(signal.SIGKILL)  # main process and pool child: nothing acks, nothing restarts it
    assert not victim.alive()
    # What the victim held when it died (re-read: it cannot have finished anything since).
    lost_keys = {(r["group_position"], r["image_index"]) for r in image_rows(store, run_id)
                 if r["status"] == "leased" and int(str(r["worker"]).rsplit(":", 1)[1]) in victim_pids}
    assert lost_keys, "the kill must land while the batch is in flight"

    counts = farm.wait_finished(run_id, 180)
    assert counts.done == 12 and counts.failed == 0
    assert survivor.pids() == survivor_pids, "the surviving worker must not have been restarted"
    assert "whose lease expired" in survivor.log(), survivor.log()[-3000:]
    rows = check_rows(store, run_id, 12)
    by_key = {(r["group_position"], r["image_index"]): r for r in rows}
    for key in lost_keys:  # the killed batch was delivered again and finished by the survivor
        assert by_key[key]["attempts"] >= 2
        assert int(str(by_key[key]["worker"]).rsplit(":", 1)[1]) in survivor_pids

    out = tmp_path / "out"
    proc = farm.export(run_id, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_export(out, expected)
    store.close()
    status = cli(["status", str(run_id)], farm.env(), tmp_path)
    assert status.returncode == 0 and "state: finished" in status.stdout, status.stdout + status.stderr
    for text in (proc.stdout, proc.stderr, status.stdout, status.stderr, a.log(), b.log()):
        assert SECRET not in text
