"""`stage-a serve`: a busy port is one line and exit 2 (not "startup complete", then exit 3); a free
one serves the pages."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from support.cli import base_env
from support.farm import free_port, wait_for

REPO = Path(__file__).resolve().parents[1]


def _serve(db: Path, port: int, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--db", str(db), "--port", str(port)],
                            cwd=tmp_path, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _db(tmp_path: Path) -> Path:
    from stage_a.store import ResultStore

    db = tmp_path / "r.db"
    ResultStore(f"sqlite:///{db}").close()
    return db


def test_a_busy_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    db = _db(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = _serve(db, port, tmp_path)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert lines == [f"stage-a: error: cannot listen on 127.0.0.1:{port}: Address already in use (another process "
                     f"listens there: pick another --port)"], err
    assert "startup complete" not in err


def test_a_free_port_serves(tmp_path: Path) -> None:
    db = _db(tmp_path)
    port = free_port()
    proc = _serve(db, port, tmp_path)
    try:
        def health() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200
            except OSError:
                return False

        assert wait_for(health, 60, "serve to answer /healthz")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
