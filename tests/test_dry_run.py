"""`--dry-run` of `run` and `enqueue`: the plan is printed, and nothing is written or queued.

Checked against the real things: the output folder and SQLite file do not appear, the PostgreSQL
database stays empty (not even the schema), and the Redis queue stays at length 0.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from support.cli import base_env, cli

from producer.sample_data import make_sample_tree

MISSION = "挡风板安装检查"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sample_tree(tmp_path_factory.mktemp("dry") / "input", MISSION, n_fail=2, n_pass=3, seed=2)


def test_run_dry_run_writes_nothing(tree: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = cli(["run", "--mission", MISSION, "--input-dir", str(tree), "--checkpoint", str(tiny_checkpoint),
                "--output-dir", str(out), "--dry-run", "--pass-group-number", "2"], base_env(), tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "dry run: nothing written, nothing queued" in text
    assert "fail:        2 groups" in text and "pass:        2 groups" in text, text
    assert "4 groups (5 found)" in text
    assert f"input root:  {tree} (readable here" in text
    assert "config loads (model_type qwen3_vl" in text, text
    assert f"{out / (MISSION + '_stage_a.jsonl')}" in text
    assert "max_pixels 1048576" in text  # the dataset default, not 0
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_run_dry_run_reports_a_checkpoint_that_will_not_load(tree: Path, tmp_path: Path) -> None:
    bad = tmp_path / "ck"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    proc = cli(["run", "--mission", MISSION, "--input-dir", str(tree), "--checkpoint", str(bad),
                "--output-dir", str(tmp_path / "out"), "--dry-run"], base_env(), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "config does NOT load" in proc.stdout, proc.stdout
    assert not (tmp_path / "out").exists()


def test_enqueue_dry_run_queues_and_writes_nothing(tree: Path, tiny_checkpoint: Path, pg_url: str,
                                                   tmp_path: Path) -> None:
    import redis
    from conftest import REDIS_URL
    from sqlalchemy import create_engine, inspect

    queue = f"stage_a_dry_{uuid.uuid4().hex[:10]}"
    env = base_env(STAGE_A_DATABASE_URL=pg_url, STAGE_A_BROKER_URL=REDIS_URL, STAGE_A_QUEUE=queue,
                   STAGE_A_INPUT_ROOTS=str(tmp_path / "elsewhere"))
    proc = cli(["enqueue", "--mission", MISSION, "--input-dir", str(tree), "--checkpoint", str(tiny_checkpoint),
                "--sharding-mode", "per_image", "--dry-run"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "12 image tasks would go to" in proc.stdout and "(reachable, 0 messages waiting)" in proc.stdout
    assert "workers will REFUSE it: outside STAGE_A_INPUT_ROOTS" in proc.stdout, proc.stdout
    assert "run_id=" not in proc.stdout
    assert redis.Redis.from_url(REDIS_URL).llen(queue) == 0
    engine = create_engine(pg_url)
    try:
        assert inspect(engine).get_table_names() == []  # not even migrated
    finally:
        engine.dispose()


def test_help_shows_real_defaults() -> None:
    proc = cli(["run", "--help"], base_env(), Path.cwd())
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "[default: (from the dataset: bbu 1048576, rru 2097152)]" in text, text
    assert "--log-level [debug|info|warning|error]" in text and "[default: warning]" in text
    assert "--debug" in text and "--dry-run" in text and "STAGE_A_FLUSH_SIZE" in text
    enq = cli(["enqueue", "--help"], base_env(), Path.cwd())
    assert "--verify-inputs" in enq.stdout and "--dry-run" in enq.stdout


def test_excel_is_checked_before_inference(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = cli(["run", "--mission", MISSION, "--input-dir", str(tree), "--output-dir", str(out),
                "--add-gt-fail-reason", "--excel-path", str(tmp_path / "missing.xlsx")], base_env(), tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"stage-a: error: Excel file not found: {tmp_path / 'missing.xlsx'}"
    assert not out.exists()  # nothing registered, no model loaded
    rru = cli(["run", "--mission", "RRU安装检查", "--input-dir", str(tree), "--output-dir", str(out),
               "--add-gt-fail-reason"], base_env(), tmp_path)
    assert rru.returncode == 2 and "BBU only" in rru.stderr, rru.stderr


def test_debug_shows_the_traceback(tree: Path, tmp_path: Path) -> None:
    proc = cli(["run", "--mission", "不存在的任务", "--input-dir", str(tree), "--output-dir", str(tmp_path / "o"),
                "--debug"], base_env(), tmp_path)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "stage-a: error: unknown mission" in proc.stderr


@pytest.mark.parametrize("case", ["broker down", "database down", "sqlite", "no database"])
def test_enqueue_dry_run_exits_2_when_the_real_command_would_fail(case: str, tree: Path, tiny_checkpoint: Path,
                                                                  pg_url: str, tmp_path: Path) -> None:
    """The plan is still printed; then one line names what the real enqueue would fail on, exit 2."""
    from conftest import REDIS_URL
    from support.farm import free_port

    env = {"STAGE_A_DATABASE_URL": pg_url, "STAGE_A_BROKER_URL": REDIS_URL,
           "STAGE_A_QUEUE": f"stage_a_dry_{uuid.uuid4().hex[:10]}"}
    expected = {"broker down": "broker", "database down": "NOT reachable", "sqlite": "SQLite",
                "no database": "no results database"}[case]
    if case == "broker down":
        env["STAGE_A_BROKER_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    elif case == "database down":
        env["STAGE_A_DATABASE_URL"] = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none"
    elif case == "sqlite":
        env["STAGE_A_DATABASE_URL"] = str(tmp_path / "farm.db")
    else:
        del env["STAGE_A_DATABASE_URL"]
    proc = cli(["enqueue", "--mission", MISSION, "--input-dir", str(tree), "--checkpoint", str(tiny_checkpoint),
                "--dry-run"], base_env(**env), tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "dry run: nothing written, nothing queued" in proc.stdout and "groups" in proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "the real command would fail" in errors[0] and expected in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "nobody:" not in proc.stderr


def test_run_dry_run_exits_2_when_its_database_is_down(tree: Path, tmp_path: Path) -> None:
    from support.farm import free_port

    db = f"postgresql+psycopg://u:secret@127.0.0.1:{free_port()}/x"
    proc = cli(["run", "--mission", MISSION, "--input-dir", str(tree), "--output-dir", str(tmp_path / "o"),
                "--db", db, "--dry-run"], base_env(), tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "dry run: nothing written" in proc.stdout and "NOT reachable" in proc.stderr
    assert "secret" not in proc.stdout + proc.stderr
