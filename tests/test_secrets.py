"""No password ever reaches the output: every form of URL password is redacted by redact_url, and
`status`, `export`, `run`, `enqueue` and `reclaim` (their output and their logs at DEBUG) never print
one, whether the command succeeds or fails. The interrupt hint of `run` names STAGE_A_DATABASE_URL
instead of a URL that cannot be pasted back."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy.engine import make_url
from support.cli import base_env, cli, cli_popen
from support.farm import JSONL, MISSION, RedisServer, free_port, make_tree, wait_for

from stage_a.secrets import hide_secrets, redact_url, url_passwords

PW = "Xq7@Zk9:Secr3t"  # '@' and ':' inside, as people type them
PIECES = ("Xq7", "Zk9", "Secr3t", quote(PW, safe=""))
QPW = "Qu3ryPassW0rd"  # the ?password= form (SQLAlchemy cannot parse a raw '@' in a query)
SECRETS = (*PIECES, QPW)


def leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


URL_FORMS = [
    f"postgresql+psycopg://stage_a:{PW}@db.example:5432/stage_a",
    f"postgresql+psycopg://stage_a:{quote(PW, safe='')}@db.example:5432/stage_a",
    f"postgresql+psycopg://stage_a@db.example:5432/stage_a?password={QPW}&sslmode=require",
    f"postgresql+psycopg://stage_a@db.example:5432/stage_a?sslmode=require&sslpassword={QPW}",
    f"postgresql+psycopg://stage_a:{PW}@db1.example:5432,db2.example:5433/stage_a",
    f"postgresql://stage_a:{QPW}@/stage_a?host=/var/run/postgresql",
    f"redis://:{PW}@redis.example:6379/0",
    f"redis://default:{PW}@redis.example:6379/0",
    f"rediss://:{quote(PW, safe='')}@redis.example:6380/0?ssl_cert_reqs=required",
    f"sentinel://:{PW}@s1.example:26379;sentinel://:{PW}@s2.example:26379;sentinel://:{QPW}@s3.example:26379",
    f"redis://redis.example:6379/0?password={QPW}",
]


@pytest.mark.parametrize("url", URL_FORMS)
def test_redact_url_hides_every_password_form(url: str) -> None:
    shown = redact_url(url)
    assert not leaks(shown), shown
    assert "***" in shown
    for host in ("example", "/var/run/postgresql"):
        if host in url:
            assert host in shown  # still says where it points
    passwords = url_passwords(url)
    assert passwords
    assert not leaks(hide_secrets(f"boom: {url} and " + " then ".join(passwords), url))


def test_redact_url_leaves_urls_without_passwords_alone() -> None:
    for url in ("redis://127.0.0.1:6379/0", "postgresql+psycopg://u@h:5432/db?sslmode=require",
                "sqlite:////tmp/a@b:c/results.db", "postgresql://u@h/db?application_name=a@b"):
        assert redact_url(url) == url


# ---- the commands ---------------------------------------------------------------------------


def _pg_forms(pg_url: str) -> list[str]:
    """The test database reached with a password in each form (the server trusts local clients)."""
    u = make_url(pg_url)
    host, port, user, db = u.host, u.port or 5432, u.username or "postgres", u.database
    return [
        f"postgresql+psycopg://{user}:{PW}@{host}:{port}/{db}",
        f"postgresql+psycopg://{user}:{quote(PW, safe='')}@{host}:{port}/{db}",
        f"postgresql+psycopg://{user}@{host}:{port}/{db}?password={QPW}",
        f"postgresql+psycopg://{user}:{PW}@{host}:{port},{host}:{port}/{db}",
    ]


def _check(proc, *, ok: bool = True) -> str:  # type: ignore[no-untyped-def]
    out = proc.stdout + proc.stderr
    assert not leaks(out), out
    assert "Traceback" not in out, out
    if ok:
        assert proc.returncode in (0, 3), out
    else:
        assert proc.returncode != 0 and len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1, out
    return out


@pytest.fixture()
def redis_pw(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = RedisServer(tmp_path, password=PW)
    server.start()
    yield server
    server.kill()


@pytest.mark.slow
def test_commands_never_print_a_password(pg_url: str, redis_pw: RedisServer, tmp_path: Path) -> None:
    tree = tmp_path / "in"
    make_tree(tree, groups=2, per_group=1)
    port = redis_pw.port
    brokers = [f"redis://:{PW}@127.0.0.1:{port}/0", f"redis://default:{PW}@127.0.0.1:{port}/0",
               f"redis://:{quote(PW, safe='')}@127.0.0.1:{port}/0", f"redis://:{PW}@127.0.0.1:{port}/0"]
    forms = _pg_forms(pg_url)
    env0 = base_env(STAGE_A_QUEUE="stage_a_secrets", STAGE_A_CACHE_DIR=str(tmp_path / "cache"))
    for db, broker in zip(forms, brokers, strict=True):
        env = dict(env0, STAGE_A_BROKER_URL=broker, STAGE_A_DATABASE_URL=db)
        out = _check(cli(["enqueue", "--mission", MISSION, "--input-dir", str(tree), "--log-level", "DEBUG",
                          "--new-run"], env, tmp_path))  # the same inputs each time: a new run each time
        run_id = out.rsplit("run_id=", 1)[1].split()[0]
        _check(cli(["status", run_id], env, tmp_path))
        _check(cli(["status", run_id, "--db", db], env0, tmp_path))
        _check(cli(["export", run_id, "--db", db, "--output-dir", str(tmp_path / "out")], env0, tmp_path))
        _check(cli(["export", "999", "--output-dir", str(tmp_path / "out")], env, tmp_path), ok=False)
        _check(cli(["status", "999"], env, tmp_path), ok=False)
        _check(cli(["reclaim"], env, tmp_path))
    assert redis_pw.queued_images("stage_a_secrets") == 8
    # Unreachable services: the one-line errors name the URL, redacted.
    dead_db = f"postgresql+psycopg://postgres:{PW}@127.0.0.1:{free_port()}/x"
    dead_sentinel = f"sentinel://:{PW}@127.0.0.1:{free_port()};sentinel://:{QPW}@127.0.0.1:{free_port()}"
    for env in (dict(env0, STAGE_A_DATABASE_URL=dead_db, STAGE_A_BROKER_URL=brokers[0]),
                dict(env0, STAGE_A_DATABASE_URL=forms[0], STAGE_A_BROKER_URL=dead_sentinel),
                dict(env0, STAGE_A_DATABASE_URL=forms[0], STAGE_A_BROKER_URL=f"redis://:{PW}@127.0.0.1:{free_port()}/0")):
        _check(cli(["enqueue", "--mission", MISSION, "--input-dir", str(tree), "--checkpoint", str(tmp_path)],
                   env, tmp_path), ok=False)
        _check(cli(["reclaim"], env, tmp_path), ok=False)
    _check(cli(["status", "1", "--db", dead_db], env0, tmp_path), ok=False)
    _check(cli(["export", "1", "--db", dead_db], env0, tmp_path), ok=False)


@pytest.mark.slow
def test_run_never_prints_a_password(pg_url: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    tree = tmp_path / "in"
    make_tree(tree, groups=2, per_group=1)
    env = base_env(STAGE_A_CACHE_DIR=str(tmp_path / "cache"))
    for db in _pg_forms(pg_url)[::3]:
        out = _check(cli(["run", "--mission", MISSION, "--input-dir", str(tree), "--checkpoint", str(tiny_checkpoint),
                          "--db", db, "--output-dir", str(tmp_path / "out"), "--max-new-tokens", "2", "--device", "cpu",
                          "--log-level", "DEBUG"], env, tmp_path))
        assert "***" in out  # the database is named, redacted
    assert (tmp_path / "out" / JSONL).is_file()


def _done(store) -> int:  # type: ignore[no-untyped-def]
    c = store.queries.counts(1)
    return int(c.done + c.failed)


@pytest.mark.slow
@pytest.mark.parametrize("via", ["--db", "env"])
def test_interrupt_hint_points_to_the_environment_variable(pg_url: str, tiny_checkpoint: Path, tmp_path: Path,
                                                           via: str) -> None:
    from stage_a.store import ResultStore

    tree = tmp_path / "in"
    make_tree(tree, groups=20, per_group=2)
    db = _pg_forms(pg_url)[0]
    env = base_env(STAGE_A_CACHE_DIR=str(tmp_path / "cache"), **({"STAGE_A_DATABASE_URL": db} if via == "env" else {}))
    args = ["run", "--mission", MISSION, "--input-dir", str(tree), "--checkpoint", str(tiny_checkpoint),
            "--output-dir", str(tmp_path / "out"), "--max-new-tokens", "24", "--batch-size", "1", "--device", "cpu",
            *(["--db", db] if via == "--db" else [])]
    log = tmp_path / "run.log"
    proc = cli_popen(args, env, tmp_path, log)
    store = ResultStore(pg_url)
    try:
        wait_for(lambda: proc.poll() is not None or _done(store) >= 1, 180, "the first result", 0.1)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        store.close()
    text = log.read_text(encoding="utf-8", errors="replace")
    assert proc.returncode == 130, text
    assert not leaks(text) and "Traceback" not in text, text
    hint = next(ln for ln in text.splitlines() if "Resume with:" in ln)
    assert '--db "$STAGE_A_DATABASE_URL"' in hint and "***" not in hint, hint
    assert ("first set STAGE_A_DATABASE_URL" in hint) == (via == "--db"), hint
    # The hint works as printed, with the variable set.
    command = hint.split("Resume with: ", 1)[1].split(" (first set", 1)[0]
    resumed = cli(command.replace('"$STAGE_A_DATABASE_URL"', db).split()[1:], dict(env, STAGE_A_DATABASE_URL=db),
                  tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert not leaks(resumed.stdout + resumed.stderr)


def test_an_error_raised_while_handling_ctrl_c_still_counts_as_the_interrupt() -> None:
    """SQLAlchemy's reset of a psycopg connection interrupted mid-ping raises its own error in place of the
    KeyboardInterrupt (seen in CI): the CLI treats the chain as the user's interrupt, not a crash."""
    from cli.main import interrupted

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("can't change 'autocommit' now") from None
    except RuntimeError as exc:
        assert not interrupted(exc)  # `from None` hides the context: not an interrupt
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("can't change 'autocommit' now")  # noqa: B904 - the chain under test
    except RuntimeError as exc:
        assert interrupted(exc)
    assert not interrupted(ValueError("plain"))
