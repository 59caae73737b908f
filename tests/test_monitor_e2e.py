"""Real runs of the tiny Qwen3-VL into PostgreSQL, then `stage-a diff`, the run page and a real
headless Chromium looking at it (thumbnails rendered, the failures filter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.db import pg_database
from support.store import image_rows

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MISSION = "挡风板安装检查"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def db_url() -> Iterator[str]:
    with pg_database() as url:
        yield url


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGE_A_")}
    env.update(PYTHONPATH=str(REPO), PYTHONIOENCODING="utf-8", STAGE_A_CACHE_DIR=str(cwd / "cache"))
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def runs(db_url: str, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Run A and B with the same checkpoint, run C with another one (another seed), same input."""
    from engine.tiny_model import build_tiny_checkpoint
    from producer.sample_data import make_sample_tree

    base = tmp_path_factory.mktemp("monitor_e2e")
    tree = make_sample_tree(base / "in", MISSION, n_fail=2, n_pass=2, seed=3)
    broken = next((tree / MISSION / "审核通过").iterdir())
    (broken / "zz_garbage.jpg").write_bytes(b"not a jpeg at all" * 50)
    # A hostile folder name: ESC sequences must reach no terminal (they are printed escaped).
    group = next((tree / MISSION / "审核不通过").iterdir())
    group.rename(group.with_name(group.name + "\x1b[2J\x1b]0;owned\x07"))
    other = build_tiny_checkpoint(base / "tiny-seed-1", seed=1)
    ids = {}
    for name, ck in (("a", tiny_checkpoint), ("b", tiny_checkpoint), ("c", other)):
        proc = _cli(["run", "--mission", MISSION, "--input-dir", str(tree), "--output-dir", str(base / name),
                     "--checkpoint", str(ck), "--device", "cpu", "--max-new-tokens", "12", "--db", db_url], base)
        assert proc.returncode == 3, proc.stderr  # the garbage image fails its group
        ids[name] = max(_run_ids(db_url))
    return ids


def _run_ids(db_url: str) -> list[int]:
    from stage_a.store import ResultStore

    store = ResultStore(db_url)
    try:
        return store.queries.run_ids()
    finally:
        store.close()


def test_diff_same_checkpoint_is_unchanged_other_checkpoint_changes(runs: dict[str, int], db_url: str,
                                                                    tmp_path: Path) -> None:
    same = _cli(["diff", str(runs["a"]), str(runs["b"]), "--json", "--db", db_url], tmp_path)
    assert same.returncode == 0, same.stderr
    d = json.loads(same.stdout)
    assert d["changed"] == 0 and d["same"] > 0 and d["failed_in_either"] == 1 and d["only_a"] == d["only_b"] == 0
    other = _cli(["diff", str(runs["a"]), str(runs["c"]), "--json", "--db", db_url], tmp_path)
    assert other.returncode == 0, other.stderr
    d2 = json.loads(other.stdout)
    assert d2["changed"] > 0 and d2["changed"] + d2["same"] == d["same"]
    assert len(d2["changed_images"]) == d2["changed"]
    text = _cli(["diff", str(runs["a"]), str(runs["c"]), "--db", db_url], tmp_path)
    assert text.returncode == 0 and f"{d2['changed']} changed" in text.stdout
    assert "\x1b" not in text.stdout and "\x07" not in text.stdout, text.stdout
    assert "\\x1b[2J\\x1b]0;owned\\x07" in text.stdout, text.stdout  # the hostile group, shown escaped


def test_run_page_and_diff_page_of_real_runs(runs: dict[str, int], db_url: str) -> None:
    from starlette.testclient import TestClient

    from monitor.web.app import create_app
    from stage_a.settings import Settings
    from stage_a.store import ResultStore

    store = ResultStore(db_url)
    try:
        rows = image_rows(store, runs["a"])
        client = TestClient(create_app(store, Settings.from_env({})))
        page = client.get(f"/runs/{runs['a']}?per=200").text
        for r in rows:  # every image of the page, each with its thumbnail
            assert f'/runs/{runs["a"]}/thumb/{r["group_position"]}/{r["image_index"]}"' in page
            assert client.get(f'/runs/{runs["a"]}/thumb/{r["group_position"]}/{r["image_index"]}').status_code == 200
        assert "finished" in page and "zz_garbage.jpg" in page
        diff = client.get(f"/runs/{runs['a']}/diff/{runs['c']}")
        assert diff.status_code == 200 and ("<ins>" in diff.text or "<del>" in diff.text)
    finally:
        store.close()


# ---- a real browser -----------------------------------------------------------------------------


class _Server:
    def __init__(self, db_url: str) -> None:
        import uvicorn

        from monitor.web.app import create_app
        from stage_a.settings import Settings
        from stage_a.store import ResultStore

        self.store = ResultStore(db_url)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.store, Settings.from_env({})),
                                                    host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.store.close()


class _Chromium:
    """Headless Chromium driven over the DevTools protocol (websocket-client)."""

    def __init__(self, profile: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--no-first-run", f"--user-data-dir={profile}", f"--remote-debugging-port={self.port}",
             "--window-size=1280,2000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._id = 0

    def __enter__(self) -> _Chromium:
        import websocket

        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as res:
                    pages = [t for t in json.load(res) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.2)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            self.proc.wait(10)

    def call(self, method: str, **params: object) -> dict:  # type: ignore[type-arg]
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                assert "error" not in msg, msg
                return msg.get("result", {})  # type: ignore[no-any-return]

    def eval(self, expr: str) -> object:
        res = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        return res["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 30
        while self.eval("document.readyState + '|' + location.href") != f"complete|{url}":
            assert time.monotonic() < deadline, f"{url} did not load"
            time.sleep(0.1)

    def screenshot(self, path: Path) -> None:
        import base64

        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium package is not installed (.ci/run installs it)")
def test_browser_sees_thumbnails_and_filters_failures(runs: dict[str, int], db_url: str, tmp_path: Path) -> None:
    run = runs["a"]
    from stage_a.store import ResultStore

    store = ResultStore(db_url)
    try:
        n_images = len(image_rows(store, run))
    finally:
        store.close()
    with _Server(db_url) as base, _Chromium(tmp_path / "profile") as browser:
        browser.open(f"{base}/runs/{run}?per=200")
        # Every thumbnail loaded and decoded (lazy images: wait for them to come in).
        wait = ("new Promise(r => { const t0 = Date.now(); (function check() { const imgs = [...document.images]; "
                "if (imgs.every(i => i.complete) || Date.now() - t0 > 15000) r(imgs.map(i => i.naturalWidth)); "
                "else setTimeout(check, 100); })(); })")
        widths = browser.eval("(() => { document.querySelectorAll('img').forEach(i => i.loading = 'eager'); })()") \
            or browser.eval(wait)
        assert isinstance(widths, list) and len(widths) == n_images and all(w > 0 for w in widths), widths
        browser.screenshot(tmp_path / "run.png")
        # Filter to failures with the form, as a user does.
        browser.eval("document.querySelector('input[name=failed]').click()")
        browser.eval("document.getElementById('apply').click()")
        deadline = time.monotonic() + 20
        while "failed=1" not in str(browser.eval("location.href")) or browser.eval("document.readyState") != "complete":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        statuses = browser.eval("[...document.querySelectorAll('.img')].map(e => e.dataset.status)")
        assert statuses == ["failed"], statuses
        browser.screenshot(tmp_path / "failures.png")
    assert (tmp_path / "run.png").stat().st_size > 10_000
