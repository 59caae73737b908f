"""Which model this process serves, and building the engine for it (the one place engines are made).

A worker serves exactly the model a run was registered with, or none of its images: a pinned one
(STAGE_A_CHECKPOINT) only runs of its model, an unpinned one each run's checkpoint in turn.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from engine.interface import Engine
from stage_a.checkpoint import DEMO_MODEL, Checkpoint
from stage_a.errors import UserError
from stage_a.settings import Settings
from stage_a.store import RunInfo

log = logging.getLogger(__name__)


def demo_checkpoint(settings: Settings) -> str:
    from engine.tiny_model import cached_tiny_checkpoint

    return str(cached_tiny_checkpoint(settings.cache_path / "models"))


def check_engine(kind: str) -> None:
    """The engine can be built in this Python at all (before a run is registered or a message taken)."""
    import importlib.util

    if kind == "vllm" and importlib.util.find_spec("vllm") is None:
        raise UserError("the vllm engine needs the vllm package, which this Python lacks: pip install -e '.[vllm]' "
                        "(GPU host) or build a CPU venv with scripts/vllm-cpu-venv.sh DIR (see README)")


def build_engine(checkpoint: Checkpoint, device: str, settings: Settings, kind: str | None = None) -> Engine:
    """Load ``checkpoint`` on ``device`` behind the engine interface (``kind``: settings.engine by default).

    Raises WrongModel when the folder changed while it loaded: what was read may be either model, or both.
    """
    kind = kind or settings.engine
    check_engine(kind)
    t0 = time.perf_counter()
    engine: Engine
    if kind == "vllm":
        from engine.vllm_engine import load_vllm_engine

        engine = load_vllm_engine(checkpoint, device, settings)
    elif kind == "transformers":
        from engine.loader import load_model
        from engine.transformers_engine import TransformersEngine

        engine = TransformersEngine(load_model(checkpoint, device), settings.data_dir)
    else:
        raise UserError(f"unknown engine {kind!r}; use transformers or vllm")
    after = checkpoint.reread()
    if after != checkpoint.identity:
        raise WrongModel(f"checkpoint {checkpoint.path} changed while it was loading "
                         f"({checkpoint.identity} before, {after} after); serve it once it is no longer being written")
    log.info("model %s (%s) loaded on %s by the %s engine in %.1f s", checkpoint.path, engine.fingerprint, device,
             kind, time.perf_counter() - t0)
    return engine




def run_model(run: RunInfo) -> str | None:
    """The fingerprint a run must be served with; None for runs recorded before fingerprints."""
    if run.model:
        return run.model
    return DEMO_MODEL if not run.spec.checkpoint else None


@dataclass
class ModelHost:
    """The one engine of a worker process, loaded for the runs it is asked to serve."""

    settings: Settings
    device: str
    engine: Engine | None = None
    serving: str | None = None
    """Identity (or DEMO_MODEL) of the loaded engine."""

    @property
    def identity_cache(self) -> Path:
        return self.settings.cache_path / "identity"

    def __post_init__(self) -> None:
        self.pinned: Checkpoint | None = (Checkpoint.open(self.settings.checkpoint, self.identity_cache)
                                          if self.settings.checkpoint else None)

    def serves(self, run: RunInfo) -> bool:
        """Whether this process may serve the run at all (a pinned worker: only its own model)."""
        if self.pinned is None:
            return True
        want = run_model(run)
        if want is None:  # a run recorded before identities: the same folder at least
            return bool(run.spec.checkpoint) and os.path.realpath(run.spec.checkpoint) == str(self.pinned.path)
        return want == self.pinned.identity

    def check_device(self) -> None:
        """The device and engine must be usable here before any model is asked for: otherwise an unpinned
        worker on a host without CUDA (or vLLM) would take message after message it can only fail."""
        from engine.loader import resolve_device

        resolve_device(self.device)
        check_engine(self.settings.engine)

    def preload(self) -> Engine:
        """Load the pinned checkpoint now (at process start), so the first batch does not wait for it."""
        if self.pinned is None:
            raise UserError("preload needs STAGE_A_CHECKPOINT (an unpinned worker loads each run's model)")
        if self.engine is None:
            try:
                self.engine = build_engine(self.pinned, self.device, self.settings)
            except WrongModel as exc:
                raise UserError(f"{exc}; start the worker again") from None
            self.serving = self.pinned.identity
        return self.engine

    def engine_for(self, run: RunInfo) -> Engine:
        """The engine for the run's model, loading (or switching to) it first. Raises WrongModel when the
        checkpoint at the run's path here is not the model the run was registered with."""
        want = run_model(run)
        if self.engine is not None and want is not None and want == self.serving:
            return self.engine
        if self.pinned is not None:
            checkpoint = self.pinned
        else:
            checkpoint = Checkpoint.open(run.spec.checkpoint or demo_checkpoint(self.settings), self.identity_cache)
        demo = not run.spec.checkpoint and self.pinned is None
        have = DEMO_MODEL if demo else checkpoint.identity
        if self.engine is not None and want is None and have == self.serving:
            return self.engine  # a run recorded before identities: the model at its path
        if want is not None and have != want:
            raise WrongModel(f"run {run.id} needs model {want}, but {checkpoint.path} here is {have}")
        if self.engine is not None:
            log.info("switching model %s -> %s for run %d", self.serving, have, run.id)
            self.engine, self.serving = None, None
        try:
            self.engine = build_engine(checkpoint, self.device, self.settings)
        except WrongModel as exc:
            raise WrongModel(f"run {run.id}: {exc}") from None
        self.serving = have
        return self.engine


class WrongModel(Exception):
    """This host cannot serve the run's model; its work goes back to the queue for others."""
