"""The `stage-a` command as users run it: a subprocess with a clean environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
_KEEP = ("STAGE_A_TEST_MODEL_CACHE", "STAGE_A_TEST_REDIS_URL", "STAGE_A_TEST_PG_URL")


def base_env(**extra: str) -> dict[str, str]:
    """This environment without STAGE_A_* settings (but the tests' own), CPU, UTF-8, plus ``extra``."""
    # PYTHONPATH: this checkout's code and the tests' support package in every subprocess.
    env = dict(os.environ, PYTHONIOENCODING="utf-8", COLUMNS="120", STAGE_A_DEVICE="cpu",
               PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    for k in [k for k in env if k.startswith("STAGE_A_") and k not in _KEEP and k != "STAGE_A_DEVICE"]:
        del env[k]
    env.update(extra)
    return env


def cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `stage-a ARGS` to completion."""
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def cli_popen(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    f = open(log, "wb")
    try:
        return subprocess.Popen([sys.executable, "-m", "cli.main", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True)
    finally:
        f.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
