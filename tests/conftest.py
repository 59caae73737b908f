"""Shared fixtures: the tiny Qwen3-VL checkpoint (built once per session) and service URLs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_URL = os.environ.get("STAGE_A_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_ADMIN_URL = os.environ.get("STAGE_A_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Qwen3-VL with random weights, saved with save_pretrained (tokenizer says padding right)."""
    from workers.tiny_model import cached_tiny_checkpoint

    cache = os.environ.get("STAGE_A_TEST_MODEL_CACHE")
    base = Path(cache) if cache else tmp_path_factory.mktemp("models")
    return cached_tiny_checkpoint(base)


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny Qwen3-VL (another seed): other weights, other summaries, another fingerprint."""
    from workers.tiny_model import cached_tiny_checkpoint

    cache = os.environ.get("STAGE_A_TEST_MODEL_CACHE")
    base = Path(cache) if cache else tmp_path_factory.mktemp("models-other")
    return cached_tiny_checkpoint(base, seed=1)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    """The tiny model loaded through the product's own loader, once per session."""
    from workers.loader import load_model

    return load_model(tiny_checkpoint, "cpu")


@pytest.fixture()
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the real server, dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"stage_a_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - CI starts PostgreSQL; say why if it is not there
        pytest.fail(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
