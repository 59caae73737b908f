"""Bad input: non-zero exit, exactly one clear line on stderr, no traceback, no output file.

Run as real subprocesses (what a user sees), not through CliRunner.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
import support.cli as support_cli
from PIL import Image
from support.cli import base_env

MISSION = "挡风板安装检查"
SUPPORTED = ["BBU安装方式检查（正装）", "BBU接地线检查", "BBU线缆布放要求", "挡风板安装检查", "RRU安装检查", "RRU位置检查", "RRU线缆"]


def cli(args: list[str], cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return support_cli.cli(args, base_env(STAGE_A_CACHE_DIR=str(cwd / "cache"), **(env_extra or {})), cwd, 120)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid input tree and a checkpoint-shaped folder (validation must fail before any loading)."""
    root = tmp_path_factory.mktemp("cli_errors")
    group = root / "input" / MISSION / "审核通过" / "QC-X-20240101-0000001"
    group.mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, format="JPEG")
    (group / "a.jpg").write_bytes(buf.getvalue())
    ckpt = root / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    return root


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def base_args(inputs: Path, out: Path, **over: str) -> list[str]:
    opts = {"--mission": MISSION, "--input-dir": str(inputs / "input"), "--output-dir": str(out),
            "--checkpoint": str(inputs / "ckpt")}
    opts.update(over)
    args = ["run"]
    for k, v in opts.items():
        args += [k, v]
    return args


def test_unknown_mission_lists_supported(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    line = assert_one_line_error(cli(base_args(inputs, out, **{"--mission": "挡风板检查"}), tmp_path), "挡风板检查")
    for m in SUPPORTED:
        assert m in line
    assert not out.exists()


def test_missing_input_dir(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_one_line_error(cli(base_args(inputs, out, **{"--input-dir": str(tmp_path / "nope")}), tmp_path),
                          str(tmp_path / "nope"))
    assert not out.exists()


def test_control_characters_in_an_error_reach_no_terminal(inputs: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no\x1b[31mpe\x9b"
    line = assert_one_line_error(cli(base_args(inputs, tmp_path / "out", **{"--input-dir": str(missing)}), tmp_path),
                                 "no\\x1b[31mpe\\x9b")
    assert "\x1b" not in line and "\x9b" not in line


def test_input_dir_without_the_mission(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / "elsewhere" / "RRU线缆").mkdir(parents=True)
    assert_one_line_error(cli(base_args(inputs, out, **{"--input-dir": str(tmp_path / "elsewhere")}), tmp_path),
                          MISSION, "RRU线缆")
    assert not out.exists()


def test_mission_without_groups(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / "empty" / MISSION / "审核通过" / "QC-EMPTY").mkdir(parents=True)
    (tmp_path / "empty" / MISSION / "审核通过" / "QC-EMPTY" / "notes.txt").write_text("x")
    proc = cli(base_args(inputs, out, **{"--input-dir": str(tmp_path / "empty")}), tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "no image groups" in errors[0], proc.stderr
    assert not out.exists()


def test_resume_with_nothing_to_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_one_line_error(cli(["run", "--resume", "--output-dir", str(out)], tmp_path), "nothing to resume")
    assert not out.exists()


@pytest.mark.parametrize("which", ["missing", "not-a-model"])
def test_missing_checkpoint(inputs: Path, tmp_path: Path, which: str) -> None:
    out = tmp_path / "out"
    ckpt = tmp_path / "ckpt"
    if which == "not-a-model":
        ckpt.mkdir()
    assert_one_line_error(cli(base_args(inputs, out, **{"--checkpoint": str(ckpt)}), tmp_path), str(ckpt))
    assert not out.exists()


def test_vllm_engine_without_vllm_installed(inputs: Path, tmp_path: Path) -> None:
    """`--engine vllm` in a venv without vllm: one line saying how to install it, before any run is made."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed in this venv")
    out = tmp_path / "out"
    proc = cli(base_args(inputs, out, **{"--engine": "vllm"}), tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc, "vllm", "pip install")
    assert not out.exists()


@pytest.mark.parametrize(("option", "value", "needle"), [
    ("--batch-size", "0", "batch_size"),
    ("--batch-size", "-3", "batch_size"),
    ("--max-new-tokens", "0", "max_new_tokens"),
    ("--temperature", "-1", "temperature"),
    ("--top-p", "0", "top_p"),
    ("--top-p", "1.5", "top_p"),
    ("--repetition-penalty", "0", "repetition_penalty"),
    ("--pass-group-number", "-1", "pass_group_number"),
    ("--fail-group-number", "-1", "fail_group_number"),
    ("--max-pixels", "-1", "max_pixels"),
    ("--gpus", "0,x", "--gpus"),
    ("--gpus", "gpu0", "--gpus"),
    ("--gpus", "1,1", "--gpus"),
    ("--prompt-profile", "nope", "nope"),
])
def test_invalid_values(inputs: Path, tmp_path: Path, option: str, value: str, needle: str) -> None:
    out = tmp_path / "out"
    args = base_args(inputs, out) + [f"{option}={value}"]
    line = assert_one_line_error(cli(args, tmp_path), needle)
    assert line.startswith("stage-a: error:")
    assert not out.exists()
    assert not (tmp_path / "stage_a_results.db").exists()


@pytest.mark.parametrize(("option", "value"), [("--sharding-mode", "bogus"), ("--batch-size", "abc"),
                                               ("--dataset", "xyz")])
def test_unparseable_options_are_usage_errors(inputs: Path, tmp_path: Path, option: str, value: str) -> None:
    out = tmp_path / "out"
    proc = cli(base_args(inputs, out) + [option, value], tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert option in proc.stderr and value in proc.stderr
    assert not out.exists()


def test_export_unknown_run(tmp_path: Path) -> None:
    from stage_a.settings import Settings
    from stage_a.store import ResultStore

    out = tmp_path / "out"
    out.mkdir()
    ResultStore(Settings.from_env().results_database(None, out)).close()  # an existing, empty results database
    before = sorted(p.name for p in out.iterdir())
    assert_one_line_error(cli(["export", "--run", "99", "--output-dir", str(out)], tmp_path), "99")
    assert sorted(p.name for p in out.iterdir()) == before
    assert_one_line_error(cli(["export", "--mission", MISSION, "--output-dir", str(out)], tmp_path), MISSION)
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("where", ["missing-folder", "empty-folder"])
def test_export_without_a_database_creates_nothing(tmp_path: Path, where: str) -> None:
    out = tmp_path / "out"
    if where == "empty-folder":
        out.mkdir()
    assert_one_line_error(cli(["export", "--run", "1", "--output-dir", str(out)], tmp_path), str(out))
    assert not out.exists() or not any(out.iterdir())


def test_export_needs_a_run_or_mission(tmp_path: Path) -> None:
    assert_one_line_error(cli(["export", "--output-dir", str(tmp_path / "out")], tmp_path), "--mission")
    assert not (tmp_path / "out").exists()


def test_top_level_help(tmp_path: Path) -> None:
    proc = cli(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    from cli.main import _COMMANDS

    for name in _COMMANDS:
        assert name in proc.stdout


def _subcommands() -> list[str]:
    from cli.main import _COMMANDS

    return list(_COMMANDS)


@pytest.mark.parametrize("command", _subcommands())
def test_subcommand_help(tmp_path: Path, command: str) -> None:
    proc = cli([command, "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"Usage: stage-a {command}" in proc.stdout
    assert "--help" in proc.stdout
    assert not (tmp_path / "stage_a_output").exists()


def test_run_help_explains_every_option(tmp_path: Path) -> None:
    out = cli(["run", "--help"], tmp_path).stdout
    for opt, words in [
        ("--mission", "Mission"), ("--input-dir", "审核通过"), ("--checkpoint", "LoRA"), ("--dataset", "Domain"),
        ("--prompt-profile", "profile"), ("--device", "cuda"), ("--batch-size", "per"),
        ("--max-pixels", "1048576"), ("--max-new-tokens", "limit"), ("--temperature", "greedy"),
        ("--top-p", "Nucleus"), ("--repetition-penalty", "Penalty"), ("--verify-inputs", "image_grid_thw"),
        ("--pass-group-number", "pass groups"), ("--fail-group-number", "fail groups"), ("--sample-seed", "Seed"),
        ("--sharding-mode", "per_image"), ("--db", "SQLAlchemy"), ("--log-level", "verbosity"),
        ("--output-dir", "JSONL"), ("--resume", "unfinished"),
    ]:
        assert opt in out, opt
        assert words in out, (opt, words)


@pytest.mark.parametrize("url", ["postgersql://stage_a:hunter2@127.0.0.1/stage_a",  # a typo in the scheme
                                 "postgresql+psycopg2://stage_a:hunter2@127.0.0.1/stage_a",  # driver not installed
                                 "mysql://stage_a:hunter2@127.0.0.1/stage_a"])
@pytest.mark.parametrize("via", ["--db", "env"])
def test_unusable_database_url_is_one_line(tmp_path: Path, url: str, via: str) -> None:
    args, env = (["runs", "--db", url], {}) if via == "--db" else (["runs"], {"STAGE_A_DATABASE_URL": url})
    line = assert_one_line_error(cli(args, tmp_path, env), url.split("://")[0], "127.0.0.1/stage_a")
    assert "hunter2" not in line


@pytest.mark.parametrize("args", [["runs"], ["status", "1"], ["dead-letters"], ["cancel", "1"], ["diff", "1", "2"]])
@pytest.mark.parametrize("via", ["--db", "env"])
def test_reading_commands_never_create_a_database(tmp_path: Path, args: list[str], via: str) -> None:
    """A mistyped SQLite path is an error naming it, not an empty new database reporting 'no runs'."""
    db = tmp_path / "typo.db"
    env = {"STAGE_A_DATABASE_URL": str(db)} if via == "env" else {}
    proc = cli([*args, *(["--db", str(db)] if via == "--db" else [])], tmp_path, env)
    assert_one_line_error(proc, str(db))
    assert not db.exists()
