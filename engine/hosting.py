"""Which model this process serves, and building the engine for it (the one place engines are made).

A run names its model (the fingerprint recorded at registration); a worker serves exactly that
model or none of the run's images. A worker pinned with STAGE_A_CHECKPOINT serves only runs of
that model; an unpinned one loads the checkpoint each run names (one model at a time).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from engine.transformers_engine import Engine
from stage_a.errors import UserError
from stage_a.fingerprint import DEMO_MODEL, model_fingerprint
from stage_a.settings import Settings, default_cache_dir
from stage_a.store import RunInfo

log = logging.getLogger(__name__)


def demo_checkpoint() -> str:
    from engine.tiny_model import cached_tiny_checkpoint

    return str(cached_tiny_checkpoint(default_cache_dir() / "models"))


def check_engine(kind: str) -> None:
    """The engine can be built in this Python at all (before a run is registered or a message taken)."""
    import importlib.util

    if kind == "vllm" and importlib.util.find_spec("vllm") is None:
        raise UserError("the vllm engine needs the vllm package, which this Python lacks: pip install -e '.[vllm]' "
                        "(GPU host) or build a CPU venv with scripts/vllm-cpu-venv.sh DIR (see README)")


def build_engine(checkpoint: str, device: str, kind: str = "transformers") -> Engine:
    """Load ``checkpoint`` on ``device`` behind the engine interface; logs the time it took."""
    check_engine(kind)
    t0 = time.perf_counter()
    engine: Engine
    if kind == "vllm":
        from engine.vllm_engine import load_vllm_engine

        engine = load_vllm_engine(checkpoint, device)  # sized by the STAGE_A_VLLM_* settings
    elif kind == "transformers":
        from engine.loader import load_model
        from engine.transformers_engine import BatchEngine

        engine = BatchEngine(load_model(checkpoint, device))
    else:
        raise UserError(f"unknown engine {kind!r}; use transformers or vllm")
    log.info("model %s (%s) loaded on %s by the %s engine in %.1f s", checkpoint, engine.fingerprint, device,
             kind, time.perf_counter() - t0)
    return engine


def run_checkpoint(run: RunInfo) -> str:
    """The checkpoint folder a run is served with (the demo model for runs enqueued without one)."""
    return run.spec.checkpoint or demo_checkpoint()


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
    """Model fingerprint (or DEMO_MODEL) of the loaded engine."""

    def __post_init__(self) -> None:
        self.pinned: str | None = model_fingerprint(self.settings.checkpoint) if self.settings.checkpoint else None

    def serves(self, run: RunInfo) -> bool:
        """Whether this process may serve the run at all (a pinned worker: only its own model)."""
        if self.pinned is None:
            return True
        want = run_model(run)
        if want is None:  # a run recorded before fingerprints: the same folder at least
            return bool(run.spec.checkpoint) and os.path.realpath(run.spec.checkpoint) == \
                os.path.realpath(self.settings.checkpoint)
        return want == self.pinned

    def check_device(self) -> None:
        """The device must be usable here before any model is asked for: an unpinned worker loads
        its first model on its first batch, and a host without CUDA for STAGE_A_GPUS (or
        STAGE_A_DEVICE=cuda), or without the vllm package for STAGE_A_ENGINE=vllm, would otherwise take
        message after message it can only fail."""
        from engine.loader import resolve_device

        resolve_device(self.device)
        check_engine(self.settings.engine)

    def preload(self) -> Engine:
        """Load the pinned checkpoint now (at process start), so the first batch does not wait for it."""
        if not self.settings.checkpoint:
            raise UserError("preload needs STAGE_A_CHECKPOINT (an unpinned worker loads each run's model)")
        if self.engine is None:
            engine = build_engine(self.settings.checkpoint, self.device, self.settings.engine)
            if engine.fingerprint != self.pinned:
                raise UserError(f"checkpoint {self.settings.checkpoint} changed while it was loading "
                                f"({self.pinned} before, {engine.fingerprint} after); start the worker again "
                                "once the folder is no longer being written")
            self.engine = engine
            self.serving = self.pinned
        return self.engine

    def engine_for(self, run: RunInfo) -> Engine:
        """The engine for the run's model, loading (or switching to) it first.

        Raises WrongModel when the checkpoint at the run's path on this host is not the model the
        run was registered with (another file at the same path): serving it would be a silent
        wrong answer.
        """
        want = run_model(run)
        checkpoint = self.settings.checkpoint or run_checkpoint(run)
        if self.engine is not None and want is not None and want == self.serving:
            return self.engine
        have = DEMO_MODEL if not run.spec.checkpoint and not self.settings.checkpoint else model_fingerprint(checkpoint)
        if self.engine is not None and want is None and have == self.serving:
            return self.engine  # a run recorded before fingerprints: the model at its path
        if want is not None and have != want:
            raise WrongModel(f"run {run.id} needs model {want}, but {checkpoint} here is {have}")
        if self.engine is not None:
            log.info("switching model %s -> %s for run %d", self.serving, have, run.id)
            self.engine, self.serving = None, None
        engine = build_engine(checkpoint, self.device, self.settings.engine)
        if have != DEMO_MODEL and engine.fingerprint != have:
            # The folder was replaced while it loaded: what was read may be either model, or both.
            raise WrongModel(f"run {run.id}: checkpoint {checkpoint} changed while it was loading "
                             f"({have} before, {engine.fingerprint} after)")
        self.engine = engine
        self.serving = have
        return self.engine


class WrongModel(Exception):
    """This host cannot serve the run's model; its work goes back to the queue for others."""
