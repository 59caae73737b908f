"""Validation of run parameters (SPEC section 4) and URL redaction."""

from __future__ import annotations

import pytest

from stage_a.config import GenerationParams, RunSpec
from stage_a.errors import UserError
from stage_a.secrets import redact_url
from stage_a.settings import Settings


def database_url(db, output_dir=None):  # type: ignore[no-untyped-def]
    return Settings.from_env().results_database(db, output_dir)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    # NaN compares false with everything: it must not slip through a "< 0" / "<= 0" check.
    ({"temperature": float("nan")}, "temperature"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"top_p": float("nan")}, "top_p"),
    ({"temperature": float("inf")}, "temperature"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
])
def test_generation_params_rejects(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(UserError, match=field):
        GenerationParams(**kwargs)  # type: ignore[arg-type]


def test_greedy_threshold() -> None:
    assert GenerationParams(temperature=0).greedy
    assert GenerationParams(temperature=1e-4).greedy
    assert not GenerationParams(temperature=2e-4).greedy


def test_run_spec_defaults_and_checks() -> None:
    assert RunSpec(mission="m", dataset="bbu", input_root="/x").max_pixels == 1_048_576
    assert RunSpec(mission="m", dataset="rru", input_root="/x").max_pixels == 2_097_152
    assert RunSpec(mission="m", dataset="rru", input_root="/x", max_pixels=1000).max_pixels == 1000
    with pytest.raises(UserError, match="batch_size"):
        RunSpec(mission="m", dataset="bbu", input_root="/x", batch_size=0)
    with pytest.raises(UserError, match="sharding_mode"):
        RunSpec(mission="m", dataset="bbu", input_root="/x", sharding_mode="per_pixel")
    with pytest.raises(UserError, match="pass_group_number"):
        RunSpec(mission="m", dataset="bbu", input_root="/x", pass_group_number=-1)


def test_database_url_forms(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("STAGE_A_DATABASE_URL", raising=False)
    assert database_url(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/stage_a_results.db"
    assert database_url(str(tmp_path / "x.db")) == f"sqlite:///{tmp_path.resolve()}/x.db"
    assert database_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    monkeypatch.setenv("STAGE_A_DATABASE_URL", "postgresql+psycopg://u@h/env")
    assert database_url(None, tmp_path) == "postgresql+psycopg://u@h/env"


def test_redact_url_hides_passwords() -> None:
    assert "s3cret" not in redact_url("postgresql+psycopg://user:s3cret@db:5432/x")
    assert "s3cret" not in redact_url("redis://:s3cret@127.0.0.1:6379/0")


@pytest.mark.parametrize("name, value, needle", [
    ("STAGE_A_FLUSH_INTERVAL", "nan", "STAGE_A_FLUSH_INTERVAL"),
    ("STAGE_A_LEASE_SECONDS", "inf", "STAGE_A_LEASE_SECONDS"),
    ("STAGE_A_STALL_SECONDS", "-inf", "STAGE_A_STALL_SECONDS"),
    ("STAGE_A_RECLAIM_INTERVAL", "0", "STAGE_A_RECLAIM_INTERVAL"),
    ("STAGE_A_HEARTBEAT_INTERVAL", "-1", "STAGE_A_HEARTBEAT_INTERVAL"),
    ("STAGE_A_ORPHAN_GRACE", "-5", "STAGE_A_ORPHAN_GRACE"),
    ("STAGE_A_SQLITE_BUSY_TIMEOUT", "-1", "STAGE_A_SQLITE_BUSY_TIMEOUT"),
    ("STAGE_A_VLLM_MAX_MODEL_LEN", "0", "STAGE_A_VLLM_MAX_MODEL_LEN"),
    ("STAGE_A_VLLM_MAX_NUM_SEQS", "-1", "STAGE_A_VLLM_MAX_NUM_SEQS"),
    ("STAGE_A_VLLM_MAX_LORA_RANK", "0", "STAGE_A_VLLM_MAX_LORA_RANK"),
    ("STAGE_A_VLLM_CPU_KV_CACHE_GIB", "0", "STAGE_A_VLLM_CPU_KV_CACHE_GIB"),
    ("STAGE_A_VLLM_GPU_MEMORY_UTILIZATION", "90", "STAGE_A_VLLM_GPU_MEMORY_UTILIZATION"),
    ("STAGE_A_VLLM_GPU_MEMORY_UTILIZATION", "0", "STAGE_A_VLLM_GPU_MEMORY_UTILIZATION"),
    ("STAGE_A_GPUS", "a", "STAGE_A_GPUS"),
    ("STAGE_A_GPUS", "0,cuda:1", "STAGE_A_GPUS"),
    ("STAGE_A_GPUS", "-1", "STAGE_A_GPUS"),
    ("STAGE_A_DEVICE", "gpu", "STAGE_A_DEVICE"),
])
def test_settings_reject_unusable_values(name: str, value: str, needle: str) -> None:
    """A value no process could work with is refused when the settings are read, naming the variable."""
    from stage_a.settings import Settings

    with pytest.raises(UserError, match=needle) as info:
        Settings.from_env({name: value})
    assert value in str(info.value)


@pytest.mark.parametrize("name, value", [
    ("STAGE_A_HEARTBEAT_INTERVAL", "0"), ("STAGE_A_ORPHAN_GRACE", "0"), ("STAGE_A_SQLITE_BUSY_TIMEOUT", "0"),
    ("STAGE_A_VLLM_GPU_MEMORY_UTILIZATION", "1"), ("STAGE_A_GPUS", "0,1,2,3"), ("STAGE_A_GPUS", " 3 "),
    ("STAGE_A_DEVICE", "cuda:1"), ("STAGE_A_DEVICE", "CPU"), ("STAGE_A_DEVICE", "auto"),
])
def test_settings_accept_documented_values(name: str, value: str) -> None:
    from stage_a.settings import Settings

    Settings.from_env({name: value})
