"""The operator views on a real PostgreSQL store with seeded rows: RunReport and its states, the
`status` / `runs` / `dead-letters` commands, the web pages, thumbnails and their path checks, /metrics.

Writers of heartbeats, cancellation and dead letters are other parts of the product: here their rows
are written directly, as those writers would.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import text
from support.store import age_run

REPO = Path(__file__).resolve().parents[1]
MISSION = "挡风板安装检查"
STATS = '{"统计": [{"类别": "BBU设备", "品牌": {"华为": 1}}, {"类别": "挡风板", "安装状态": {"已安装": 2}}], "备注": ["无"]}'


def _jpeg(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (120, 90)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")


@pytest.fixture()
def seeded(pg_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Two runs: run A (farm, 3 groups, results, one failure, one irrelevant) and run B (one image)."""
    from stage_a.config import RunSpec
    from stage_a.store import GroupInput, ResultStore
    from stage_a.work import ImageKey, ImageResult

    root_a, root_b = tmp_path / "root_a", tmp_path / "root_b"
    files_a = [f"{MISSION}/审核不通过/QC-1/a_{i}.jpg" for i in (1, 2)] + [f"{MISSION}/审核通过/QC-2/b_1.jpg",
                                                                           f"{MISSION}/审核通过/QC-3/c_1.jpg"]
    for i, f in enumerate(files_a):
        _jpeg(root_a / f, (40 * i, 100, 200))
    _jpeg(root_b / "m/审核通过/QC-9/z.jpg", (0, 0, 0))
    _jpeg(root_b / "m/审核通过/QC-9/only_in_b.jpg", (255, 0, 0))
    store = ResultStore(pg_url)
    a = store.create_run(RunSpec(mission=MISSION, dataset="bbu", input_root=str(root_a), checkpoint="/m/ck-a"),
                         [GroupInput("QC-1", "fail", tuple(files_a[:2])), GroupInput("QC-2", "pass", (files_a[2],)),
                          GroupInput("QC-3", "pass", (files_a[3],))], farm=True)
    b = store.create_run(RunSpec(mission=MISSION, dataset="bbu", input_root=str(root_b), checkpoint="/m/ck-b"),
                         [GroupInput("QC-9", "pass", ("m/审核通过/QC-9/z.jpg", "m/审核通过/QC-9/only_in_b.jpg"))])
    store.record_results([ImageResult(key=ImageKey(a, 0, 1), summary=STATS, raw_text="<DOMAIN=bbu>\n" + STATS,
                                      completion_tokens=40, generate_ms=200.0, preprocess_ms=10.0),
                          ImageResult(key=ImageKey(a, 0, 2), error="cannot identify image file"),
                          ImageResult(key=ImageKey(a, 1, 1), summary="无关图片", completion_tokens=4,
                                      generate_ms=50.0, preprocess_ms=6.0)], "gpu0@host-a")
    try:
        yield store, a, b, root_a, root_b
    finally:
        store.close()


def _cli(args: list[str], db: str, **env: str) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("STAGE_A_")}
    e.update({"PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8", "STAGE_A_BROKER_URL": "redis://127.0.0.1:6379/0",
              "STAGE_A_QUEUE": "stage_a_test_monitor", **env})
    return subprocess.run([sys.executable, "-m", "cli.main", args[0], "--db", db, *args[1:]], capture_output=True, text=True,
                          cwd=REPO, env=e, timeout=120)


def _heartbeat(store, name: str, run_id: int | None, age_s: float = 1.0, model: str | None = None,  # type: ignore[no-untyped-def]
               state: str = "busy", pinned: bool | None = None) -> None:
    from stage_a.store import utcnow
    from stage_a.store.models import WorkerRow

    now = utcnow()
    with store.engine.begin() as c:
        c.execute(WorkerRow.__table__.insert().values(
            name=name, model=model, pinned=pinned, engine="transformers", device="cuda:0", state=state,
            started_at=now - timedelta(minutes=5), heartbeat_at=now - timedelta(seconds=age_s), run_id=run_id,
            last_batch_at=now - timedelta(seconds=age_s), last_batch_images=32, last_batch_seconds=4.0,
            images_per_s=8.0, tokens_per_s=300.0, images_total=640))


# ---- RunReport ----------------------------------------------------------------------------------


def test_report_counts_rates_and_states(seeded) -> None:  # type: ignore[no-untyped-def]
    from monitor.report import build_report
    from stage_a.settings import Settings
    from stage_a.store import utcnow

    store, a, _, _, _ = seeded
    settings = Settings.from_env({})
    r = build_report(store, a, settings)
    assert (r.images_total, r.done, r.failed, r.pending, r.in_flight) == (4, 2, 1, 1, 0)
    assert (r.groups_total, r.groups_complete, r.groups_with_failures) == (3, 1, 1)
    # Four results in one instant: no rate from that single timestamp (it once said 4,000,000 images/s).
    assert r.throughput.overall_images_per_s is None or r.throughput.overall_images_per_s < 100
    assert r.throughput.recent_images_per_s is None or r.throughput.recent_images_per_s < 100
    assert r.timings.tokens_per_s == pytest.approx(44 / 0.25)
    assert r.timings.preprocess_ms == pytest.approx(8.0)
    # A farm run with no worker online but a result just now: running (older workers write no heartbeat).
    assert r.state == "running" and r.workers_online == 0
    # No worker and no result for longer than the heartbeat timeout: stalled, and it says what to do.
    later = build_report(store, a, settings, now=utcnow() + timedelta(seconds=settings.heartbeat_timeout + 5))
    assert later.state == "stalled" and "no worker online" in (later.reason or "")
    # A worker online serving the run: running until no result for STAGE_A_STALL_SECONDS.
    _heartbeat(store, "gpu0@host-a", a, age_s=0)
    soon = build_report(store, a, settings, now=utcnow() + timedelta(seconds=30))
    assert soon.state == "running" and soon.workers_online == 1 and soon.workers[0].images_per_s == 8.0
    stale = build_report(store, a, Settings.from_env({"STAGE_A_STALL_SECONDS": "5",
                                                      "STAGE_A_HEARTBEAT_TIMEOUT": "600"}),
                         now=utcnow() + timedelta(seconds=60))
    assert stale.state == "stalled" and "no result for" in (stale.reason or "")
    # Cancelled wins; finished once nothing is pending.
    with store.engine.begin() as c:
        c.execute(text("UPDATE runs SET cancelled_at = now() WHERE id = :r"), {"r": a})
    assert build_report(store, a, settings).state == "cancelled"
    js = build_report(store, a, settings).to_json()
    for key in ("state", "queue_length", "workers_online", "dead_letters", "done", "failed", "pending", "in_flight"):
        assert key in js
    json.dumps(js)


def test_rate_needs_a_span(seeded) -> None:  # type: ignore[no-untyped-def]
    """Results spread over 10 s give their rate; the ETA follows the recent rate."""
    from monitor.report import build_report
    from stage_a.settings import Settings
    from stage_a.store import utcnow

    store, a, _, _, _ = seeded
    now = utcnow()
    with store.engine.begin() as c:
        c.execute(text("UPDATE runs SET created_at = :t WHERE id = :r"), {"t": now - timedelta(seconds=20), "r": a})
        c.execute(text("UPDATE images SET updated_at = :t WHERE run_id = :r AND group_position = 0 AND image_index = 1"),
                  {"t": now - timedelta(seconds=10), "r": a})
    r = build_report(store, a, Settings.from_env({}), now=now)
    assert r.throughput.overall_images_per_s == pytest.approx(3 / 10, rel=0.05)
    # The window starts at the first activity (10 s ago), not at creation (20 s ago: a model load),
    # and says so: not "the last 120s" on a run this young.
    assert r.throughput.window_s == pytest.approx(10, abs=0.5)
    assert r.throughput.recent_images_per_s == pytest.approx(3 / 10, rel=0.05)
    assert r.throughput.eta_s == pytest.approx(1 / (3 / 10), rel=0.05)
    assert r.to_json()["throughput"]["window_s"] == pytest.approx(10, abs=0.5)
    from monitor.text import describe
    assert "over the last 10s" in describe(r)


def test_no_eta_without_a_recent_rate_or_when_stalled(seeded) -> None:  # type: ignore[no-untyped-def]
    """Nothing finished within the window: no ETA from the overall rate (it said `ETA 51s` on a stalled
    run); a stalled run names its dead letters beside its cause; failures are counted by class."""
    from monitor.report import build_report
    from monitor.text import describe
    from stage_a.failures import failure_class
    from stage_a.settings import Settings
    from stage_a.store import utcnow
    from stage_a.store.models import DeadLetter

    store, a, _, _, _ = seeded
    now = utcnow()
    age_run(store, a, 400)
    with store.engine.begin() as c:
        c.execute(text("UPDATE runs SET created_at = :t WHERE id = :r"), {"t": now - timedelta(seconds=900), "r": a})
        c.execute(DeadLetter.__table__.insert(), [{"received_at": now, "reason": "bad", "payload": "{}",
                                                   "worker": "gpu0@host-a:1", "run_id": a}])
    _heartbeat(store, "gpu0@host-a:1", a, age_s=0)
    quiet = build_report(store, a, Settings.from_env({"STAGE_A_STALL_SECONDS": "600"}), now=now)
    assert quiet.state == "running" and quiet.throughput.recent_images_per_s == 0
    assert quiet.throughput.overall_images_per_s and quiet.throughput.eta_s is None
    stalled = build_report(store, a, Settings.from_env({}), now=now)
    assert stalled.state == "stalled" and stalled.throughput.eta_s is None
    assert "1 dead letters (stage-a dead-letters" in (stalled.reason or ""), stalled.reason
    cls = failure_class("cannot identify image file")
    assert stalled.failures_by_class == {cls: 1}
    assert stalled.to_json()["failures_by_class"] == {cls: 1}
    assert f"failures by class: {cls} 1" in describe(stalled)
    assert "ETA -" in describe(stalled)


def test_all_workers_stopped_is_stalled_at_once(seeded) -> None:  # type: ignore[no-untyped-def]
    """Every worker announced a warm stop after the last result: stalled now, not `running` until the
    heartbeat timeout (2m20s) runs out."""
    from monitor.report import build_report
    from stage_a.settings import Settings
    from stage_a.store import utcnow

    store, a, _, _, _ = seeded
    _heartbeat(store, "gpu0@host-a:1", a, age_s=0, state="stopped")
    _heartbeat(store, "gpu1@host-a:2", a, age_s=0, state="stopped")
    r = build_report(store, a, Settings.from_env({}), now=utcnow() + timedelta(seconds=1))
    assert r.state == "stalled" and r.throughput.eta_s is None
    assert (r.reason or "").startswith("every worker for model"), r.reason


def test_an_unpinned_worker_busy_with_another_model_still_serves_the_run(seeded) -> None:  # type: ignore[no-untyped-def]
    """An unpinned worker loads each run's model: that its last batch was another run's (another
    model) does not make this run's state "no worker online"; a worker pinned to another model does."""
    from monitor.report import build_report
    from stage_a.settings import Settings
    from stage_a.store import utcnow

    store, a, b, _, _ = seeded
    settings = Settings.from_env({})
    with store.engine.begin() as c:
        c.execute(text("UPDATE runs SET model = 'm-aaaaaaaaaaaaaaaaaaaaaaaa' WHERE id = :r"), {"r": a})
    age_run(store, a, 3600)
    _heartbeat(store, "gpu0@host-b", b, age_s=0, model="m-bbbbbbbbbbbbbbbbbbbbbbbb", state="busy", pinned=True)
    r = build_report(store, a, settings, now=utcnow())
    assert r.workers_online == 0 and r.state == "stalled"
    assert r.reason.startswith("no worker holds model m-aaaaaaaaaaaaaaaaaaaaaaaa; online workers hold m-bbbbbbbbbbbbbbbbbbbbbbbb,"), r.reason
    _heartbeat(store, "gpu1@host-b", b, age_s=0, model="m-bbbbbbbbbbbbbbbbbbbbbbbb", state="busy", pinned=False)
    r = build_report(store, a, settings, now=utcnow())
    assert r.workers_online == 1 and [w.name for w in r.workers] == ["gpu1@host-b"]
    assert "no worker" not in (r.reason or ""), r.reason
    assert r.workers[0].pinned is False and r.to_json()["workers"][0]["pinned"] is False


# ---- commands -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_status_runs_and_dead_letters_commands(seeded, pg_url: str) -> None:  # type: ignore[no-untyped-def]
    from stage_a.store import utcnow
    from stage_a.store.models import DeadLetter

    store, a, b, _, _ = seeded
    with store.engine.begin() as c:
        c.execute(DeadLetter.__table__.insert(), [
            {"received_at": utcnow(), "reason": "path outside STAGE_A_INPUT_ROOTS: /etc/passwd",
             "payload": json.dumps({"run_id": a, "path": "/etc/passwd"}), "worker": "gpu1@host-b", "run_id": a},
            {"received_at": utcnow(), "reason": "malformed message", "payload": "{not json", "worker": "gpu0@host-a",
             "run_id": None},
        ])
    st = _cli(["status", str(a)], pg_url)
    assert st.returncode == 0, st.stderr
    assert "images 3/4 finished (done 2, failed 1, pending 1, in flight 0)" in st.stdout
    assert "dead letters: 1" in st.stdout and "workers: gpu0@host-a" in st.stdout and "state: running" in st.stdout
    js = json.loads(_cli(["status", str(a), "--json"], pg_url).stdout)
    assert js["dead_letters"] == 1 and js["workers_online"] == 0 and js["state"] == "running"
    assert isinstance(js["queue_length"], int)  # the farm run's queue on the real Redis
    # The broker down: the queue is unknown, status still answers.
    down = json.loads(_cli(["status", str(a), "--json"], pg_url, STAGE_A_BROKER_URL="redis://127.0.0.1:1/0").stdout)
    assert down["queue_length"] is None and "unreachable" in down["queue_note"]
    # Unknown ids: the nearest existing ones; 0 and negatives: a clear error. One line, no traceback.
    for bad, expected in ((b + 40, f"nearest existing: {a}, {b}"), (0, "run ids start at 1"),
                          (-3, "run ids start at 1")):
        proc = _cli(["status", "--", str(bad)], pg_url)
        assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    runs = _cli(["runs"], pg_url)
    assert runs.returncode == 0 and runs.stdout.index(f"\n{b} ") < runs.stdout.index(f"\n{a} "), runs.stdout
    listed = json.loads(_cli(["runs", "--json"], pg_url).stdout)
    assert [r["run_id"] for r in listed] == [b, a] and listed[1]["dead_letters"] == 1
    dl = _cli(["dead-letters", str(a)], pg_url)
    assert "gpu1@host-b" in dl.stdout and "path outside" in dl.stdout and "malformed" not in dl.stdout
    every = json.loads(_cli(["dead-letters", "--json"], pg_url).stdout)
    assert {d["reason"] for d in every} == {"path outside STAGE_A_INPUT_ROOTS: /etc/passwd", "malformed message"}
    for cmd in (["status", "--help"], ["runs", "--help"], ["dead-letters", "--help"], ["serve", "--help"],
                ["diff", "--help"]):
        assert subprocess.run([sys.executable, "-m", "cli.main", *cmd], capture_output=True, text=True, cwd=REPO,
                              timeout=60).returncode == 0


# ---- web ----------------------------------------------------------------------------------------


@pytest.fixture()
def client(seeded):  # type: ignore[no-untyped-def]
    from starlette.testclient import TestClient

    from monitor.web.app import create_app
    from stage_a.settings import Settings

    store = seeded[0]
    return TestClient(create_app(store, Settings.from_env({"STAGE_A_BROKER_URL": "redis://127.0.0.1:6379/0"})),
                      raise_server_exceptions=False)


def test_pages_show_runs_groups_and_every_image(client, seeded) -> None:  # type: ignore[no-untyped-def]
    _, a, b, _, _ = seeded
    index = client.get("/")
    assert index.status_code == 200 and f'href="/runs/{a}"' in index.text and f'href="/runs/{b}"' in index.text
    page = client.get(f"/runs/{a}")
    assert page.status_code == 200
    for gid in ("QC-1", "QC-2", "QC-3"):
        assert gid in page.text
    for pos, idx in ((0, 1), (0, 2), (1, 1), (2, 1)):
        assert f'src="/runs/{a}/thumb/{pos}/{idx}"' in page.text
    assert "品牌" in page.text and "华为" in page.text and "<details>" in page.text  # 统计 table, raw text
    assert "cannot identify image file" in page.text  # failures first
    failed = client.get(f"/runs/{a}?failed=1")
    assert failed.text.count('data-status="failed"') == 1 and 'data-status="done"' not in failed.text
    irr = client.get(f"/runs/{a}?irrelevant=1")
    assert irr.text.count('class="img ') == 1 and "QC-2" in irr.text
    assert "QC-1" in client.get(f"/runs/{a}?q=%E5%8D%8E%E4%B8%BA").text  # 华为
    assert "QC-1" not in client.get(f"/runs/{a}?label=pass").text.split("Groups", 1)[1]
    # Keyset pages: one group per page, forward then back.
    first = client.get(f"/runs/{a}?per=1")
    assert "QC-1" in first.text and 'id="next"' in first.text and 'id="prev"' not in first.text
    second = client.get(f"/runs/{a}?per=1&after=0")
    assert "#1</span> QC-2" in second.text and 'id="prev"' in second.text
    back = client.get(f"/runs/{a}?per=1&before=1")
    assert "#0</span> QC-1" in back.text
    assert client.get("/runs/999").status_code == 404


def test_api_is_the_status_json(client, seeded, pg_url: str) -> None:  # type: ignore[no-untyped-def]
    _, a, _, _, _ = seeded
    api = client.get(f"/api/runs/{a}").json()
    cli = json.loads(_cli(["status", str(a), "--json"], pg_url).stdout)
    skip = {"now", "elapsed_s", "throughput"}
    assert {k: v for k, v in api.items() if k not in skip} == {k: v for k, v in cli.items() if k not in skip}
    assert [r["run_id"] for r in client.get("/api/runs").json()][-1] == a
    assert client.get("/api/runs/12345").status_code == 404
    assert client.get("/healthz").text == "ok\n"


def test_thumbnails_are_images(client, seeded) -> None:  # type: ignore[no-untyped-def]
    _, a, _, _, _ = seeded
    res = client.get(f"/runs/{a}/thumb/0/1")
    assert res.status_code == 200 and res.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(res.content))
    assert im.size[0] > 0 and max(im.size) <= 320
    again = client.get(f"/runs/{a}/thumb/0/1", headers={"If-None-Match": res.headers["etag"]})
    assert again.status_code == 304


def test_path_tricks_never_read_outside_the_run_root(seeded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from starlette.testclient import TestClient

    from monitor.web.app import create_app
    from stage_a.config import RunSpec
    from stage_a.settings import Settings
    from stage_a.store import GroupInput

    store, a, b, root_a, root_b = seeded
    secret = tmp_path / "secret.jpg"
    _jpeg(secret, (1, 2, 3), (77, 33))
    (root_a / "link").symlink_to(tmp_path)  # a symlink inside the root that escapes it
    (root_a / "link.jpg").symlink_to(secret)
    evil = store.create_run(
        RunSpec(mission=MISSION, dataset="bbu", input_root=str(root_a), checkpoint=""),
        [GroupInput("QC-E", "pass", ("../secret.jpg", str(secret), "link/secret.jpg", "link.jpg",
                                     f"{MISSION}/审核通过/QC-2/../../../secret.jpg"))])
    client = TestClient(create_app(store, Settings.from_env({})))
    for idx in range(1, 6):  # paths the store holds that leave the root: refused
        assert client.get(f"/runs/{evil}/thumb/0/{idx}").status_code == 404, idx
    tricks = [
        f"/runs/{a}/thumb/0/..%2F..%2Fsecret.jpg", f"/runs/{a}/thumb/..%2F..%2F/1", f"/runs/{a}/thumb/0/1/../../9/1",
        f"/runs/{a}/thumb/%2Fetc%2Fpasswd/1", f"/runs/{a}/thumb/0/{secret}", f"/runs/{a}/thumb/0/-1",
        f"/runs/{a}/thumb/5/1",  # no such image in run a
        f"/runs/{b + 100}/thumb/0/1",
        f"/runs/{b}/thumb/2/1",  # a key of run a asked of run b
        "/runs/0/thumb/0/1",
    ]
    for url in tricks:
        res = client.get(url)
        assert res.status_code == 404, url
        assert res.headers.get("content-type", "").startswith(("text/", "application/json")), url
    # Every image served belongs to its run's own root: run b's key (0, 2) is run b's file.
    own = Image.open(io.BytesIO(client.get(f"/runs/{b}/thumb/0/2").content)).convert("RGB")
    assert own.getpixel((5, 5))[0] > 200  # the red only_in_b.jpg


def test_metrics_parse_with_prometheus_parser(client, seeded) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client.parser import text_string_to_metric_families

    _, a, _, _, _ = seeded
    res = client.get("/metrics")
    assert res.status_code == 200
    fams = {f.name: f for f in text_string_to_metric_families(res.text)}
    for name in ("stage_a_run_images", "stage_a_run_state", "stage_a_run_images_per_second",
                 "stage_a_run_dead_letters", "stage_a_workers_online", "stage_a_broker_up", "stage_a_queue_length"):
        assert name in fams, name
    images = {(s.labels["run"], s.labels["state"]): s.value for s in fams["stage_a_run_images"].samples}
    assert images[(str(a), "done")] == 2 and images[(str(a), "failed")] == 1 and images[(str(a), "pending")] == 1
    states = {s.labels["state"] for s in fams["stage_a_run_state"].samples if s.labels["run"] == str(a) and s.value}
    assert states == {"running"}
    # Bounded labels only: never an image, group or worker name.
    assert all(set(s.labels) <= {"run", "state", "mission", "model", "outcome"} for f in fams.values() for s in f.samples)


def test_basic_auth(seeded) -> None:  # type: ignore[no-untyped-def]
    from starlette.testclient import TestClient

    from monitor.web.app import create_app
    from stage_a.settings import Settings

    store, a, _, _, _ = seeded
    client = TestClient(create_app(store, Settings.from_env({"STAGE_A_SERVE_BASIC_AUTH": "ops:s3cret"})))
    assert client.get("/").status_code == 401 and client.get("/metrics").status_code == 401
    assert client.get("/healthz").status_code == 200
    good = "Basic " + base64.b64encode(b"ops:s3cret").decode()
    bad = "Basic " + base64.b64encode(b"ops:wrong").decode()
    assert client.get(f"/runs/{a}", headers={"Authorization": good}).status_code == 200
    assert client.get("/", headers={"Authorization": bad}).status_code == 401


def test_basic_auth_with_non_ascii_credentials_and_garbage_headers(seeded) -> None:  # type: ignore[no-untyped-def]
    """A non-ASCII password, a header with non-ASCII bytes or credentials: 200 or 401, never a 500."""
    from starlette.testclient import TestClient

    from monitor.web.app import create_app
    from stage_a.settings import Settings

    store, a, _, _, _ = seeded
    for creds in ("ops:s3cret", "опс:pässwört"):
        client = TestClient(create_app(store, Settings.from_env({"STAGE_A_SERVE_BASIC_AUTH": creds})),
                            raise_server_exceptions=False)
        good = b"Basic " + base64.b64encode(creds.encode())
        assert client.get(f"/runs/{a}", headers=[(b"authorization", good)]).status_code == 200, creds
        for header in (b"Basic " + base64.b64encode("ops:wörd".encode()), b"Basic \xff\xfe", b"Basic " +
                       base64.b64encode(b"ops:\xff"), b"Basic " + base64.b64encode(creds.encode("utf-8")[:-1])):
            res = client.get("/metrics", headers=[(b"authorization", header)])
            assert res.status_code == 401, (creds, header, res.status_code)
            assert "s3cret" not in res.text and "pässwört" not in res.text


def test_out_of_range_numbers_in_urls_are_not_found_not_500(client, seeded) -> None:  # type: ignore[no-untyped-def]
    """Numbers past the database's integer columns in a thumbnail address or a page key: never a 500."""
    _, a, _, _, _ = seeded
    for big in (2**31, 2**40, 2**63, 10**30):
        for url in (f"/runs/{a}/thumb/0/{big}", f"/runs/{a}/thumb/{big}/1", f"/runs/{big}/thumb/0/1"):
            assert client.get(url).status_code == 404, url
        after = client.get(f"/runs/{a}?after={big}")
        assert after.status_code == 200 and 'id="no-groups"' in after.text, big
        before = client.get(f"/runs/{a}?before={big}&per=1")
        assert before.status_code == 200 and "#2</span> QC-3" in before.text, big


def test_search_text_with_nul_or_too_long_is_answered(client, seeded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """NUL in the search (PostgreSQL text cannot hold it) searches for the U+FFFD the store keeps in
    its place; a search past SQLite's LIKE pattern limit is a 400 that says so, on both backends."""
    from starlette.testclient import TestClient

    from monitor.web.app import create_app
    from stage_a.config import RunSpec
    from stage_a.settings import Settings
    from stage_a.store import GroupInput, ResultStore
    from stage_a.work import ImageKey, ImageResult

    store, a, _, _, _ = seeded
    store.record_results([ImageResult(key=ImageKey(a, 2, 1), summary="bad\x00byte")], "gpu0@host-a")
    res = client.get(f"/runs/{a}", params={"q": "d\x00b"})
    assert res.status_code == 200 and "QC-3" in res.text and "QC-1" not in res.text.split("Groups", 1)[1]
    lite = ResultStore(f"sqlite:///{tmp_path / 'lite.db'}")
    try:
        r = lite.create_run(RunSpec(mission=MISSION, dataset="bbu", input_root=str(tmp_path), checkpoint=""),
                            [GroupInput("QC-1", "pass", ("x.jpg",))])
        for c, run in ((client, a), (TestClient(create_app(lite, Settings.from_env({})),
                                                raise_server_exceptions=False), r)):
            long = c.get(f"/runs/{run}", params={"q": "a" * 50_001})
            assert long.status_code == 400 and "search text too long" in long.text, long.status_code
    finally:
        lite.close()


def test_metrics_keep_every_unfinished_run_past_the_newest(seeded, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """/metrics: the newest runs and every unfinished one (README), not only the newest."""
    from prometheus_client.parser import text_string_to_metric_families
    from starlette.testclient import TestClient

    import monitor.web.metrics
    from monitor.web.app import create_app
    from stage_a.config import RunSpec
    from stage_a.settings import Settings
    from stage_a.store import GroupInput
    from stage_a.work import ImageKey, ImageResult

    store, a, b, root_a, _ = seeded
    newer = [store.create_run(RunSpec(mission=MISSION, dataset="bbu", input_root=str(root_a), checkpoint=""),
                              [GroupInput("QC-1", "pass", ("x.jpg",))]) for _ in range(2)]
    store.record_results([ImageResult(key=ImageKey(r, 0, 1), summary="无关图片") for r in newer], "gpu0@host-a")
    with store.engine.begin() as c:  # b: cancelled with images pending, a final state
        c.execute(text("UPDATE runs SET cancelled_at = now() WHERE id = :r"), {"r": b})
    monkeypatch.setattr(monitor.web.metrics, "RUNS_IN_METRICS", 2)
    res = TestClient(create_app(store, Settings.from_env({}))).get("/metrics")
    fams = {f.name: f for f in text_string_to_metric_families(res.text)}
    runs = {s.labels["run"] for s in fams["stage_a_run_state"].samples}
    assert runs == {str(newer[0]), str(newer[1]), str(a)}, runs


@pytest.mark.parametrize("creds", ["ops:", ":s3cret", ":", "ops"])
def test_basic_auth_needs_a_user_and_a_password(creds: str) -> None:
    """`ops:` (say, an unset $PASSWORD in the env file) would let anyone in with an empty password."""
    from stage_a.errors import UserError
    from stage_a.settings import Settings

    with pytest.raises(UserError, match="STAGE_A_SERVE_BASIC_AUTH must be user:password") as exc:
        Settings.from_env({"STAGE_A_SERVE_BASIC_AUTH": creds})
    assert "s3cret" not in str(exc.value)


def test_status_exit_code_per_state(seeded, pg_url: str) -> None:  # type: ignore[no-untyped-def]
    """`status --exit-code`: 4 running, 5 stalled, 3 finished with failures, 0 finished clean, 6 cancelled;
    without the flag, 0 whatever the state."""
    from cli.commands.status import state_exit_code

    store, a, b, _, _ = seeded
    assert (state_exit_code("finished", 0), state_exit_code("finished", 2), state_exit_code("running", 1),
            state_exit_code("stalled", 0), state_exit_code("cancelled", 0)) == (0, 3, 4, 5, 6)
    assert _cli(["status", str(a), "--exit-code"], pg_url).returncode == 4  # a result just now
    age_run(store, a, 3600)
    stalled = _cli(["status", str(a), "--exit-code"], pg_url)
    assert stalled.returncode == 5 and "state: stalled" in stalled.stdout, stalled.stdout
    assert _cli(["status", str(a)], pg_url).returncode == 0
    with store.engine.begin() as c:
        c.execute(text("UPDATE images SET status = 'done' WHERE run_id = :r AND status = 'pending'"), {"r": a})
    assert _cli(["status", str(a), "--exit-code"], pg_url).returncode == 3
    with store.engine.begin() as c:
        c.execute(text("UPDATE images SET status = 'done' WHERE run_id = :r"), {"r": b})
    assert _cli(["status", str(b), "--exit-code", "--json"], pg_url).returncode == 0
    with store.engine.begin() as c:
        c.execute(text("UPDATE runs SET cancelled_at = now() WHERE id = :r"), {"r": a})
    assert _cli(["status", str(a), "--exit-code"], pg_url).returncode == 6


def test_run_page_report_classes_cancelled_and_short_labels(client, seeded) -> None:  # type: ignore[no-untyped-def]
    """A finished run's page shows the end-of-run report and failures by class; a cancelled run's
    unprocessed images say so and when; the runs list keeps the reason in a title (hover); a worker
    stopped over an hour ago has left the workers table."""
    from stage_a.failures import failure_class
    from stage_a.store import utcnow

    store, a, b, _, _ = seeded
    with store.engine.begin() as c:
        c.execute(text("UPDATE images SET status = 'done', summary = '无关图片' WHERE run_id = :r AND status = 'pending'"),
                  {"r": a})
    _heartbeat(store, "old@gone:1", a, age_s=3601, state="stopped")
    _heartbeat(store, "recent@here:2", a, age_s=30, state="stopped")
    page = client.get(f"/runs/{a}").text
    assert 'id="report"' in page and "p95" in page and "device-hours" in page and "gpu0@host-a" in page
    assert f"<b>{failure_class('cannot identify image file')}</b> 1" in page
    assert "recent@here:2" in page and "old@gone:1" not in page
    with store.engine.begin() as c:
        c.execute(text("UPDATE runs SET cancelled_at = :t WHERE id = :r"), {"t": utcnow(), "r": b})
    cancelled = client.get(f"/runs/{b}").text
    assert "not processed: run cancelled at " in cancelled
    index = client.get("/").text
    assert 'title="cancelled at ' in index and 'class="reason small"' not in index
