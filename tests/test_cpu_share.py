"""Model processes on one host share its CPUs: torch's default gives each process every CPU, and two pool
processes of a worker then run twice as many threads as there are cores (bench/farm_balance.py)."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


def test_the_cpus_are_divided_among_the_model_processes() -> None:
    from engine.loader import share_cpus

    cpus = len(os.sched_getaffinity(0))
    assert share_cpus(1) == cpus == torch.get_num_threads()
    assert share_cpus(cpus) == 1 == torch.get_num_threads()
    assert share_cpus(4 * cpus) == 1  # never zero
    assert share_cpus(cpus, threads=3) == 3 == torch.get_num_threads()  # STAGE_A_TORCH_THREADS decides


def test_an_operators_omp_num_threads_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.loader import share_cpus

    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert share_cpus(1) == 1 == torch.get_num_threads()


def test_the_setting_is_read_and_checked() -> None:
    from stage_a.errors import UserError
    from stage_a.settings import Settings

    assert Settings.from_env({"STAGE_A_TORCH_THREADS": "6"}).torch_threads == 6
    with pytest.raises(UserError, match="STAGE_A_TORCH_THREADS"):
        Settings.from_env({"STAGE_A_TORCH_THREADS": "-1"})
