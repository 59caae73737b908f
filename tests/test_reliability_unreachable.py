"""Unreachable services: a wrong Redis or database URL makes every entry point fail within seconds
with one clear line, and the password in the URL never appears in any output.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.db import PG_ADMIN_URL
from support.farm import MISSION, REPO, base_env, free_port, make_tree

SECRET = "SECRETPW"
LIMIT_S = 20


def _closed_port() -> int:
    return free_port()  # bound then released: nothing listens there, connections are refused


BAD_REDIS = f"redis://:{SECRET}@127.0.0.1:{_closed_port()}/0"
BAD_DB = f"postgresql+psycopg://u:{SECRET}@127.0.0.1:{_closed_port()}/x"
BROKER_LINE = "cannot reach broker redis://:***@127.0.0.1:"
DB_LINE = "cannot connect to database postgresql+psycopg://u:***@127.0.0.1:"


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unreachable") / "in"
    make_tree(root, groups=1, per_group=1)
    return root


def _cases(input_dir: Path, good_db: str, good_redis: str) -> dict[str, tuple[list[str], dict[str, str], str]]:
    enqueue = ["-m", "cli.main", "enqueue", "--mission", MISSION, "--input-dir", str(input_dir)]
    worker = ["-m", "celery", "-A", "workers", "worker", "--concurrency", "1", "--without-gossip",
              "--without-mingle", "-n", "unreachable@%h"]
    return {
        # enqueue refuses SQLite before the broker is tried; the broker is tried before the database
        "enqueue-redis": (enqueue, {"STAGE_A_BROKER_URL": BAD_REDIS, "STAGE_A_DATABASE_URL": PG_ADMIN_URL}, BROKER_LINE),
        "enqueue-db": (enqueue, {"STAGE_A_BROKER_URL": good_redis, "STAGE_A_DATABASE_URL": BAD_DB}, DB_LINE),
        "status-db": (["-m", "cli.main", "status", "1", "--db", BAD_DB], {}, DB_LINE),
        "export-db": (["-m", "cli.main", "export", "1", "--db", BAD_DB], {"STAGE_A_BROKER_URL": BAD_REDIS}, DB_LINE),
        "worker-redis": (worker, {"STAGE_A_BROKER_URL": BAD_REDIS, "STAGE_A_DATABASE_URL": good_db}, BROKER_LINE),
        "worker-db": (worker, {"STAGE_A_BROKER_URL": good_redis, "STAGE_A_DATABASE_URL": BAD_DB}, DB_LINE),
    }


@pytest.mark.parametrize("case", ["enqueue-redis", "enqueue-db", "status-db", "export-db", "worker-redis",
                                  "worker-db"])
def test_wrong_url_fails_fast_with_one_line_and_no_password(case: str, input_dir: Path, tmp_path: Path) -> None:
    from conftest import REDIS_URL

    args, env_extra, expected = _cases(input_dir, f"sqlite:///{tmp_path / 'ok.db'}", REDIS_URL)[case]
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                              env=base_env(**env_extra), timeout=LIMIT_S + 40)
    except subprocess.TimeoutExpired as exc:  # a hang: the very thing this test exists to catch
        pytest.fail(f"{case}: still running after {exc.timeout}s")
    elapsed = time.monotonic() - t0
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert elapsed < LIMIT_S, f"{case} took {elapsed:.1f}s"
    assert SECRET not in output, output
    assert "Traceback" not in output, output
    errors = [ln for ln in output.splitlines() if "error:" in ln]
    assert len(errors) == 1 and expected in errors[0], output
    if args[1] == "cli.main":  # the CLI prints that line and nothing else
        assert proc.stderr.strip().splitlines() == errors and proc.stdout == ""


@pytest.mark.parametrize("setting, value, expected", [
    ("STAGE_A_FLUSH_SIZE", "abc", "STAGE_A_FLUSH_SIZE must be an integer, got 'abc'"),
    ("STAGE_A_ENGINE", "vlm", "STAGE_A_ENGINE must be one of transformers, vllm, got 'vlm'"),
    ("STAGE_A_DATABASE_URL", f"postgersql://u:{SECRET}@127.0.0.1/x", "unsupported database URL postgersql://u:***@"),
])
def test_worker_with_a_malformed_setting_stops_with_one_line(setting: str, value: str, expected: str,
                                                              tmp_path: Path) -> None:
    """A setting the worker cannot even build its Celery app with: exit 2 and one line, like the CLI."""
    from conftest import REDIS_URL

    worker = ["-m", "celery", "-A", "workers", "worker", "--concurrency", "1", "--without-gossip",
              "--without-mingle", "-n", "malformed@%h"]
    env = base_env(STAGE_A_BROKER_URL=REDIS_URL, STAGE_A_DATABASE_URL=f"sqlite:///{tmp_path / 'ok.db'}")
    env[setting] = value
    proc = subprocess.run([sys.executable, *worker], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=LIMIT_S + 40)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert SECRET not in output and "Traceback" not in output, output
    errors = [ln for ln in output.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and expected in errors[0], output
