"""Error types: user mistakes the CLI turns into one clear line, and a dead engine that stops a process."""

from __future__ import annotations

import sys


class UserError(ValueError):
    """A mistake in the user's input (flags, paths, data): shown as one line, never a traceback."""


class EngineDeadError(RuntimeError):
    """The model engine can no longer serve any request (OOM loop, CUDA error): stop the worker."""


def dead_engine_error(exc: BaseException) -> EngineDeadError | None:
    """``exc`` as an EngineDeadError when it means the device can serve nothing more, else None.

    Decided by type, never by searching the message: torch raises AcceleratorError (CUDA/XPU
    error types: illegal address, ECC, device lost) once the context is unusable. An out-of-memory
    error is not one of them: the engine splits the batch instead.
    """
    if isinstance(exc, EngineDeadError):
        return exc
    torch = sys.modules.get("torch")
    dead_types = tuple(t for t in (getattr(torch, "AcceleratorError", None),) if isinstance(t, type))
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if dead_types and isinstance(exc, dead_types) and not (isinstance(oom, type) and isinstance(exc, oom)):
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return EngineDeadError(f"device failure: {first}")
    return None
