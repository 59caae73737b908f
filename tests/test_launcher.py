"""SPEC section 10: `scripts/stage_a.sh`, the seed's env-var launcher, as a thin wrapper of `stage-a run`.

Two kinds of test: the real launcher on the tiny Qwen3-VL on CPU against the equivalent
`stage-a run` (same JSONL, byte for byte), and quick ones with a stand-in stage-a program
(STAGE_A_BIN) that records its argv, to pin the variable -> option mapping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from producer.sample_data import make_sample_tree

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "stage_a.sh"
MISSION = "挡风板安装检查"
JSONL = f"{MISSION}_stage_a.jsonl"
FAILURES = f"{MISSION}_stage_a_failures.jsonl"
REPORT = f"{MISSION}_stage_a_report.json"
LAUNCHER_VARS = (
    "mission", "gpus", "checkpoint", "input_dir", "output_dir", "dataset", "prompt_profile", "verify_inputs",
    "pass_group_number", "fail_group_number", "sample_seed", "batch_size_per_rank", "max_pixels",
    "max_new_tokens", "sharding_mode", "keep_intermediate_outputs", "postprocess", "add_gt_fail_reason",
    "excel_path", "log_level", "debug", "temperature", "top_p", "repetition_penalty",
)
# Small images and few tokens keep the two real runs to seconds of model time.
GEN = {"max_new_tokens": "4", "max_pixels": "50176", "batch_size_per_rank": "4"}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def base_env(tmp: Path, **launcher_vars: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    for k in ("STAGE_A_BIN", "STAGE_A_DATABASE_URL"):
        env.pop(k, None)
    # The stage-a of the interpreter running the tests comes first on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    tmpdir = tmp / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    env.update(STAGE_A_CACHE_DIR=str(tmp / "cache"), TMPDIR=str(tmpdir), PYTHONIOENCODING="utf-8",
               COLUMNS="120", LC_ALL="C.UTF-8")
    env.update(launcher_vars)
    return env


def launcher_temps(tmp: Path) -> list[Path]:
    return sorted((tmp / "tmpdir").glob("stage_a.*"))


def launch(env: dict[str, str], *args: str, cwd: Path | None = None,
           timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------- the real job on the tiny model


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fail group and its pass resubmission, plus a pass group whose only image is corrupt."""
    root = tmp_path_factory.mktemp("launcher_tree") / "input"
    make_sample_tree(root, MISSION, n_fail=1, n_pass=1, seed=7)
    bad = root / MISSION / "审核通过" / "QC-DEMO-20241206-P999999"
    bad.mkdir(parents=True)
    (bad / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def runs(tree: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The launcher as users call it (input_dir = the mission folder itself) and the equivalent
    `stage-a run`, started side by side to halve the wall time."""
    ref_tmp = tmp_path_factory.mktemp("launcher_ref")
    ref_cmd = [sys.executable, "-m", "cli.main", "run", "--mission", MISSION, "--input-dir", str(tree),
               "--output-dir", str(ref_tmp / "out"), "--checkpoint", str(tiny_checkpoint), "--gpus", "cpu",
               "--device", "cpu", "--max-new-tokens", GEN["max_new_tokens"], "--max-pixels", GEN["max_pixels"],
               "--batch-size", GEN["batch_size_per_rank"], "--postprocess"]
    tmp = tmp_path_factory.mktemp("launcher_run")
    env = base_env(tmp, mission=MISSION, gpus="cpu", checkpoint=str(tiny_checkpoint),
                   input_dir=f"{tree / MISSION}/", output_dir=str(tmp / "out"), postprocess="true", **GEN)
    procs = [subprocess.Popen(cmd, env=e, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, e, cwd in ((["bash", str(SCRIPT)], env, tmp), (ref_cmd, base_env(ref_tmp), ref_tmp))]
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return {"launched": (tmp / "out", tmp, done[0]), "reference": (ref_tmp / "out", done[1])}


@pytest.fixture(scope="module")
def launched(runs):  # type: ignore[no-untyped-def]
    return runs["launched"]


@pytest.fixture(scope="module")
def reference(runs):  # type: ignore[no-untyped-def]
    return runs["reference"]


@pytest.mark.slow
def test_launcher_gives_the_same_jsonl_as_stage_a_run(launched, reference) -> None:  # type: ignore[no-untyped-def]
    out, _, proc = launched
    ref_out, ref = reference
    assert ref.returncode == 3, ref.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # The corrupt image fails its group: the job's status 3 comes back through the launcher.
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "postprocess: 2 records" in proc.stderr  # postprocess=true ran after the export
    jsonl = (out / JSONL).read_bytes()
    assert jsonl == (ref_out / JSONL).read_bytes()
    assert [json.loads(x)["label"] for x in jsonl.decode().splitlines()] == ["fail", "pass"]
    assert (out / FAILURES).read_bytes() == (ref_out / FAILURES).read_bytes()
    assert "QC-DEMO-20241206-P999999" in (out / FAILURES).read_text(encoding="utf-8")


@pytest.mark.slow
def test_resolved_configuration_is_printed_first(launched, tree: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, proc = launched
    lines = proc.stdout.splitlines()
    assert lines[0] == "stage_a.sh: resolved configuration"
    config = {ln.split()[0]: ln.split(None, 1)[1] for ln in lines[1:] if ln.startswith("  ")}
    assert set(LAUNCHER_VARS) <= set(config), config
    assert config["mission"] == MISSION
    assert config["gpus"] == "cpu"
    assert config["postprocess"] == "true"
    assert config["max_new_tokens"] == "4"
    assert config["dataset"] == "(stage-a default)"
    # input_dir pointed at the mission folder: its parent is used, and the printout says so.
    assert config["input_dir"].startswith(f"{tree} (was the mission folder")
    command = config["command"]
    for part in ("run --mission 挡风板安装检查", "--gpus cpu --device cpu", f"--input-dir {tree} ",
                 "--batch-size 4", "--max-pixels 50176", "--postprocess"):
        assert part in command, command
    # The job's own summary follows the configuration.
    assert "groups written" in proc.stdout.split("  command")[1]


def test_temporary_database_is_removed(launched) -> None:  # type: ignore[no-untyped-def]
    out, tmp, proc = launched
    assert sorted(p.name for p in out.iterdir()) == sorted([JSONL, FAILURES, REPORT])
    assert launcher_temps(tmp) == []  # (torch may leave its own caches in TMPDIR)
    # Neither the launcher nor stage-a named the temporary database that is gone now.
    assert "stage_a_results.db" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.slow
def test_generation_variables_reach_the_run(tree: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """temperature, top_p, repetition_penalty, max_pixels, batch size and verify_inputs are recorded
    in the run's parameters; verify_inputs prints its lines at the default log level."""
    from stage_a.store import ResultStore

    out = tmp_path / "out"
    env = base_env(tmp_path, mission=MISSION, gpus="cpu", checkpoint=str(tiny_checkpoint), input_dir=str(tree),
                   output_dir=str(out), keep_intermediate_outputs="true", temperature="0.5", top_p="0.9",
                   repetition_penalty="1.2", verify_inputs="true", sample_seed="3", fail_group_number="1",
                   pass_group_number="0", **GEN)
    proc = launch(env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verify_inputs " in proc.stderr and "file_sha256=" in proc.stderr, proc.stderr[-3000:]
    store = ResultStore(f"sqlite:///{out / 'stage_a_results.db'}")
    try:
        run = store.latest_run(MISSION)
    finally:
        store.close()
    assert run is not None
    gen = run.spec.generation
    assert (gen.temperature, gen.top_p, gen.repetition_penalty, gen.max_new_tokens) == (0.5, 0.9, 1.2, 4)
    assert (run.spec.max_pixels, run.spec.batch_size, run.spec.verify_inputs) == (50176, 4, True)
    assert (run.spec.sample_seed, run.spec.fail_group_number, run.spec.pass_group_number) == (3, 1, 0)


@pytest.mark.slow
def test_gpu_index_without_cuda_is_an_error(tree: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    proc = launch(base_env(tmp_path, mission=MISSION, gpus="0", input_dir=str(tree), output_dir=str(tmp_path / "o")),
                  cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("stage-a: error: GPU 0 requested but this host has no "
                                                           "usable CUDA GPU"), proc.stderr
    assert not (tmp_path / "o").exists()
    direct = subprocess.run([sys.executable, "-m", "cli.main", "run", "--mission", MISSION, "--input-dir", str(tree),
                             "--gpus", "0", "--output-dir", str(tmp_path / "o")], env=base_env(tmp_path),
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert direct.returncode == 2 and "no usable CUDA GPU" in direct.stderr, direct.stderr


def test_unknown_mission_status_comes_from_stage_a(tmp_path: Path) -> None:
    proc = launch(base_env(tmp_path, mission="不存在的任务", gpus="cpu", output_dir=str(tmp_path / "out")),
                  cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("stage-a: error: unknown mission") and MISSION in last, proc.stderr
    assert "Traceback" not in proc.stderr
    assert launcher_temps(tmp_path) == []


# ------------------------------------------------------ the mapping, with a stand-in stage-a program

FAKE = """#!/usr/bin/env bash
# Records its argv (one per line) and whether the --db folder existed while it ran.
printf '%s\\n' "$@" > "$FAKE_ARGS"
prev=""
for a in "$@"; do
    if [[ $prev == --db ]]; then
        [[ -d $(dirname "$a") ]] && echo yes > "$FAKE_ARGS.dbdir"
        [[ -n ${FAKE_TOUCH_DB:-} ]] && : > "$a"
    fi
    prev=$a
done
exit "${FAKE_RC:-0}"
"""


@pytest.fixture()
def fake(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Run the launcher against the stand-in; returns (proc, argv or None)."""
    bin_path = tmp_path / "fake-stage-a"
    bin_path.write_text(FAKE)
    bin_path.chmod(0o755)
    args_file = tmp_path / "argv.txt"

    def call(*args: str, **launcher_vars: str) -> tuple[subprocess.CompletedProcess[str], list[str] | None]:
        args_file.unlink(missing_ok=True)
        env = base_env(tmp_path, STAGE_A_BIN=str(bin_path), FAKE_ARGS=str(args_file))
        env.update(launcher_vars)
        proc = launch(env, *args, cwd=tmp_path, timeout=30)
        argv = args_file.read_text().splitlines() if args_file.exists() else None
        return proc, argv

    return call


def without_db(argv: list[str]) -> list[str]:
    i = argv.index("--db")
    return [a for a in argv[:i] + argv[i + 2:] if a != "--temporary-db"]


def test_every_variable_maps_to_its_option(fake) -> None:  # type: ignore[no-untyped-def]
    proc, argv = fake(
        mission=MISSION, gpus="0,1,2,3", checkpoint="/models/ck", input_dir="/data/in", output_dir="/data/my out",
        dataset="bbu", prompt_profile="summary_runtime", verify_inputs="yes", pass_group_number="5",
        fail_group_number="0", sample_seed="7", batch_size_per_rank="16", max_pixels="65536", max_new_tokens="64",
        sharding_mode="per_image", keep_intermediate_outputs="true", postprocess="1", add_gt_fail_reason="TRUE",
        temperature="0.3", top_p="0.8", repetition_penalty="1.1",
        excel_path="/x/BBU_scene_latest.xlsx", log_level="INFO", debug="false",
    )
    assert proc.returncode == 0, proc.stderr
    assert argv == [
        "run", "--mission", MISSION, "--gpus", "0,1,2,3", "--checkpoint", "/models/ck", "--input-dir", "/data/in",
        "--output-dir", "/data/my out", "--dataset", "bbu", "--prompt-profile", "summary_runtime",
        "--pass-group-number", "5", "--fail-group-number", "0", "--sample-seed", "7", "--batch-size", "16",
        "--max-pixels", "65536", "--max-new-tokens", "64", "--temperature", "0.3", "--top-p", "0.8",
        "--repetition-penalty", "1.1", "--sharding-mode", "per_image", "--log-level", "INFO",
        "--verify-inputs", "--postprocess", "--add-gt-fail-reason", "--excel-path", "/x/BBU_scene_latest.xlsx",
    ]
    assert "'/data/my out'" in proc.stdout  # the printed command line can be pasted into a shell


def test_unset_variables_leave_cli_defaults(fake) -> None:  # type: ignore[no-untyped-def]
    proc, argv = fake(mission=MISSION, gpus="cpu", checkpoint="", dataset="")
    assert proc.returncode == 0, proc.stderr
    assert without_db(argv) == ["run", "--mission", MISSION, "--gpus", "cpu", "--device", "cpu"]


@pytest.mark.parametrize(("gpus", "expected"), [
    ("cpu", ["--gpus", "cpu", "--device", "cpu"]),
    ("cpu,cpu", ["--gpus", "cpu,cpu", "--device", "cpu"]),
    ("0", ["--gpus", "0"]),
    ("0,1,2,3", ["--gpus", "0,1,2,3"]),
])
def test_gpus_mapping(fake, gpus: str, expected: list[str]) -> None:  # type: ignore[no-untyped-def]
    proc, argv = fake(mission=MISSION, gpus=gpus)
    assert proc.returncode == 0, proc.stderr
    assert without_db(argv)[3:] == expected


def test_gpus_default_follows_nvidia_smi(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not (Path(d) / "nvidia-smi").exists())
    proc, argv = fake(mission=MISSION, PATH=path)
    assert proc.returncode == 0, proc.stderr
    assert without_db(argv)[3:] == ["--gpus", "cpu", "--device", "cpu"]
    assert "no nvidia-smi" in proc.stdout
    smi = tmp_path / "smi"
    smi.mkdir()
    (smi / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (smi / "nvidia-smi").chmod(0o755)
    proc, argv = fake(mission=MISSION, PATH=f"{smi}{os.pathsep}{path}")
    assert proc.returncode == 0, proc.stderr
    assert without_db(argv)[3:] == ["--gpus", "0"]


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes", "Yes"])
def test_boolean_true_spellings(fake, value: str) -> None:  # type: ignore[no-untyped-def]
    proc, argv = fake(mission=MISSION, gpus="cpu", verify_inputs=value, postprocess=value)
    assert proc.returncode == 0, proc.stderr
    assert "--verify-inputs" in argv and "--postprocess" in argv


@pytest.mark.parametrize("value", ["false", "FALSE", "0", "no", ""])
def test_boolean_false_spellings(fake, value: str) -> None:  # type: ignore[no-untyped-def]
    proc, argv = fake(mission=MISSION, gpus="cpu", verify_inputs=value, add_gt_fail_reason=value)
    assert proc.returncode == 0, proc.stderr
    assert "--verify-inputs" not in argv and "--add-gt-fail-reason" not in argv


def assert_refused(proc: subprocess.CompletedProcess[str], argv: list[str] | None, tmp_path: Path, *words: str) -> None:
    assert proc.returncode == 2
    assert proc.stdout == ""  # nothing printed, not even the configuration
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("stage_a.sh: error: ")
    for w in words:
        assert w in lines[0]
    assert argv is None  # stage-a never ran
    assert launcher_temps(tmp_path) == []


def test_missing_mission(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proc, argv = fake(gpus="cpu", output_dir=str(tmp_path / "out"))
    assert_refused(proc, argv, tmp_path, "mission is required")
    assert not (tmp_path / "out").exists()
    proc, argv = fake(mission="", gpus="cpu")
    assert_refused(proc, argv, tmp_path, "mission is required")


@pytest.mark.parametrize("gpus", ["a,b", "0,,1", "0,", ",0", "0, 1", "cuda:0", "cpu,0", "gpu0", "cpu,", "0,cpu"])
def test_bad_gpus_list(fake, tmp_path: Path, gpus: str) -> None:  # type: ignore[no-untyped-def]
    proc, argv = fake(mission=MISSION, gpus=gpus)
    assert_refused(proc, argv, tmp_path, "gpus", repr(gpus))


@pytest.mark.parametrize("var", ["verify_inputs", "postprocess", "keep_intermediate_outputs", "debug"])
def test_bad_boolean(fake, tmp_path: Path, var: str) -> None:  # type: ignore[no-untyped-def]
    proc, argv = fake(mission=MISSION, gpus="cpu", **{var: "maybe"})
    assert_refused(proc, argv, tmp_path, var, "maybe")


@pytest.mark.parametrize("given", ["{root}/挡风板安装检查", "{root}/挡风板安装检查/", "{root}"])
def test_input_dir_mission_folder_normalized(fake, tmp_path: Path, given: str) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "photos"
    (root / MISSION).mkdir(parents=True)
    proc, argv = fake(mission=MISSION, gpus="cpu", input_dir=given.format(root=root))
    assert proc.returncode == 0, proc.stderr
    assert argv[argv.index("--input-dir") + 1] == str(root)


def test_relative_mission_folder(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / MISSION).mkdir()
    proc, argv = fake(mission=MISSION, gpus="cpu", input_dir=MISSION)
    assert proc.returncode == 0, proc.stderr
    assert argv[argv.index("--input-dir") + 1] == "."


def test_debug_traces_and_logs_debug(fake) -> None:  # type: ignore[no-untyped-def]
    proc, argv = fake(mission=MISSION, gpus="cpu", debug="true", log_level="WARNING")
    assert proc.returncode == 0, proc.stderr
    assert argv[argv.index("--log-level") + 1] == "DEBUG"
    assert any(ln.startswith("+") for ln in proc.stderr.splitlines())  # set -x


def test_extra_arguments_are_passed_on(fake) -> None:  # type: ignore[no-untyped-def]
    proc, argv = fake("--temperature", "0.7", mission=MISSION, gpus="cpu")
    assert proc.returncode == 0, proc.stderr
    assert argv[-2:] == ["--temperature", "0.7"]


@pytest.mark.parametrize("keep", ["false", "true"])
@pytest.mark.parametrize("rc", ["0", "3", "5"])
def test_exit_status_of_the_job(fake, tmp_path: Path, keep: str, rc: str) -> None:  # type: ignore[no-untyped-def]
    proc, _ = fake(mission=MISSION, gpus="cpu", keep_intermediate_outputs=keep, FAKE_RC=rc)
    assert proc.returncode == int(rc), proc.stderr


def test_database_placement(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Default: a temporary folder that exists while the job runs and is gone afterwards.
    proc, argv = fake(mission=MISSION, gpus="cpu", FAKE_TOUCH_DB="1")
    db = Path(argv[argv.index("--db") + 1])
    assert db.parent.parent == tmp_path / "tmpdir" and db.name == "stage_a_results.db"
    assert (tmp_path / "argv.txt.dbdir").read_text().strip() == "yes"
    assert not db.parent.exists()
    assert str(db) not in proc.stdout + proc.stderr and str(db.parent) not in proc.stdout + proc.stderr
    assert "temporary, removed at the end" in proc.stdout and "--temporary-db" in argv
    # keep_intermediate_outputs: the CLI default, next to the output.
    proc, argv = fake(mission=MISSION, gpus="cpu", keep_intermediate_outputs="yes", output_dir="out")
    assert "--db" not in argv
    assert "out/stage_a_results.db (kept)" in proc.stdout
    # STAGE_A_DATABASE_URL is honoured (and its password not printed).
    proc, argv = fake(mission=MISSION, gpus="cpu", STAGE_A_DATABASE_URL="postgresql+psycopg://u:secret@h/db")
    assert "--db" not in argv
    assert "secret" not in proc.stdout and "postgresql+psycopg://u:***@h/db" in proc.stdout


def test_interrupted_job_keeps_the_temporary_database(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proc, argv = fake(mission=MISSION, gpus="cpu", FAKE_RC="130", FAKE_TOUCH_DB="1")
    assert proc.returncode == 130
    db = Path(argv[argv.index("--db") + 1])
    assert db.is_file()
    assert f"kept for --resume: {db}" in proc.stderr


def test_stage_a_bin_must_exist(tmp_path: Path) -> None:
    proc = launch(base_env(tmp_path, mission=MISSION, gpus="cpu", STAGE_A_BIN=str(tmp_path / "nope")), timeout=30)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "STAGE_A_BIN" in proc.stderr


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").exists(), reason="no .venv in the repository")
def test_falls_back_to_the_repository_venv(tmp_path: Path) -> None:
    env = base_env(tmp_path, mission=MISSION, gpus="cpu", PATH="/usr/bin:/bin")
    if shutil.which("stage-a", path=env["PATH"]):
        pytest.skip("stage-a is installed in /usr/bin or /bin")
    proc = launch(env, "--help", cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"{REPO}/.venv/bin/python -m cli.main run" in proc.stdout
    assert "--max-new-tokens" in proc.stdout  # `stage-a run --help` really ran
