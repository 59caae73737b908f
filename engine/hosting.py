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

    A LoRA adapter loads its base and serves the adapter on it (Engine.use_adapter). Raises WrongModel
    when the folder changed while it loaded: what was read may be either model, or both.
    """
    kind = kind or settings.engine
    check_engine(kind)
    t0 = time.perf_counter()
    base = Checkpoint.open(checkpoint.base, settings.cache_path / "identity") if checkpoint.adapter else checkpoint
    engine: Engine
    if kind == "vllm":
        from engine.vllm_engine import load_vllm_engine

        engine = load_vllm_engine(base, device, settings, adapter=checkpoint if checkpoint.adapter else None)
    elif kind == "transformers":
        from engine.loader import load_model
        from engine.transformers_engine import TransformersEngine

        engine = TransformersEngine(load_model(base, device), settings.data_dir)
    else:
        raise UserError(f"unknown engine {kind!r}; use transformers or vllm")
    if checkpoint.adapter:
        engine.use_adapter(checkpoint)
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
    """The one engine of a worker process: one base model, and the LoRA adapters of its runs beside it.

    Routing (stage_a.queue.model_queue) sends a worker only runs of the models it holds; the checks
    here are what make a wrong model impossible even so: a run is served only when the model at its
    path here has the identity the run was registered with.
    """

    settings: Settings
    device: str
    engine: Engine | None = None
    serving: str | None = None
    """Identity of the loaded base model (DEMO_MODEL for the demo model): the route it serves."""
    loads: int = 0
    """Models loaded by this process so far (a switch costs a reload: routing keeps this low)."""
    load_seconds: float = 0.0
    """How long the last model load took (metrics read it when ``loads`` grows)."""

    @property
    def identity_cache(self) -> Path:
        return self.settings.cache_path / "identity"

    def __post_init__(self) -> None:
        self.pinned: Checkpoint | None = (Checkpoint.open(self.settings.checkpoint, self.identity_cache)
                                          if self.settings.checkpoint else None)

    @property
    def route(self) -> str | None:
        """The base model identity a pinned worker serves (its queue); None for an unpinned worker."""
        return self.pinned.base_identity if self.pinned is not None else None

    def serves(self, run: RunInfo) -> bool:
        """Whether this process may serve the run at all (a pinned worker: only runs on its base model)."""
        if self.pinned is None:
            return True
        if run.route is None:  # a run recorded before identities: the same folder at least
            return bool(run.spec.checkpoint) and os.path.realpath(run.spec.checkpoint) == str(self.pinned.path)
        return run.route == self.pinned.base_identity

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
                self._load(self.pinned, self.pinned.base_identity)
            except WrongModel as exc:
                raise UserError(f"{exc}; start the worker again") from None
        assert self.engine is not None
        return self.engine

    def engine_for(self, run: RunInfo) -> Engine:
        """The engine for the run's model, loading (or switching to) its base first and serving its adapter.
        Raises WrongModel when the model at the run's path here is not the one the run was registered with."""
        checkpoint = self._checkpoint_for(run)
        want = run.route if run.route is not None else (checkpoint.base_identity if checkpoint else None)
        adapter = checkpoint if checkpoint is not None and checkpoint.adapter else None
        if self.engine is not None and want == self.serving:
            self.engine.use_adapter(adapter)
            return self.engine
        if self.pinned is not None and want != self.pinned.base_identity:
            raise WrongModel(f"run {run.id} needs base model {want}; this worker is pinned to {self.pinned.base_identity}")
        if self.engine is not None:
            log.info("switching model %s -> %s for run %d", self.serving, want, run.id)
            self.engine, self.serving = None, None
        if checkpoint is None:  # the demo model
            self._load(Checkpoint.open(demo_checkpoint(self.settings), self.identity_cache), DEMO_MODEL)
        else:
            self._load(checkpoint, checkpoint.base_identity)
        assert self.engine is not None
        self.engine.use_adapter(adapter)
        return self.engine

    def _checkpoint_for(self, run: RunInfo) -> Checkpoint | None:
        """The run's checkpoint as it is on this host (None: the demo model), checked against the identity the
        run was registered with."""
        if not run.spec.checkpoint:
            if self.pinned is not None:
                raise WrongModel(f"run {run.id} needs the demo model; this worker is pinned to {self.pinned.path}")
            return None
        pinned = self.pinned
        if pinned is not None and run.model in (pinned.identity, None) and run.route in (pinned.base_identity, None):
            return pinned
        try:
            here = Checkpoint.open(run.spec.checkpoint, self.identity_cache)
        except UserError as exc:
            raise ModelMismatch(f"run {run.id} needs model {run.model}: {exc}") from None
        # A run recorded before identities were by content (route None) is served by the model at its path.
        if run.route is not None and here.identity != run.model:
            raise ModelMismatch(f"run {run.id} needs model {run.model}, but {here.path} here is {here.identity}")
        return here

    def _load(self, checkpoint: Checkpoint, route: str) -> None:
        base = Checkpoint.open(checkpoint.base, self.identity_cache) if checkpoint.adapter else checkpoint
        t0 = time.perf_counter()
        try:
            self.engine = build_engine(base, self.device, self.settings)
        except WrongModel as exc:
            raise WrongModel(f"{exc}") from None
        self.serving = route
        self.load_seconds = time.perf_counter() - t0
        self.loads += 1


class WrongModel(Exception):
    """This process does not hold the run's model; its work goes back to the queue of that model."""


class ModelMismatch(WrongModel):
    """The checkpoint at the run's path on this host is missing or is another model than the run's (a drifted
    copy, an adapter rewritten after enqueue). Its messages are not handed back to the queue they came from
    (that would loop): the worker records the problem, and the orphan reclaimer re-sends the images later."""
