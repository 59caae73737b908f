"""Shared fixtures: the tiny Qwen3-VL checkpoint (built once per session) and service URLs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.db import PG_ADMIN_URL, pg_database  # noqa: F401  (PG_ADMIN_URL: re-exported)

REDIS_URL = os.environ.get("STAGE_A_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Qwen3-VL with random weights, saved with save_pretrained (tokenizer says padding right)."""
    from engine.tiny_model import cached_tiny_checkpoint

    cache = os.environ.get("STAGE_A_TEST_MODEL_CACHE")
    base = Path(cache) if cache else tmp_path_factory.mktemp("models")
    return cached_tiny_checkpoint(base)


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny Qwen3-VL (another seed): other weights, other summaries, another fingerprint."""
    from engine.tiny_model import cached_tiny_checkpoint

    cache = os.environ.get("STAGE_A_TEST_MODEL_CACHE")
    base = Path(cache) if cache else tmp_path_factory.mktemp("models-other")
    return cached_tiny_checkpoint(base, seed=1)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    """The tiny model loaded through the product's own loader, once per session."""
    from engine.loader import load_model
    from stage_a.checkpoint import Checkpoint

    return load_model(Checkpoint.open(tiny_checkpoint), "cpu")


@pytest.fixture()
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the real server, dropped afterwards."""
    with pg_database() as url:
        yield url


@pytest.fixture()
def redis(tmp_path: Path) -> Iterator[Any]:
    """A Redis of the test's own, on its own port, without persistence (support.farm.RedisServer)."""
    from support.farm import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A fresh results store on SQLite and on the real PostgreSQL (each test runs on both)."""
    from stage_a.store import ResultStore

    url = f"sqlite:///{tmp_path / 'r.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    s = ResultStore(url)
    yield s
    s.close()
