"""Error types: user mistakes the CLI turns into one clear line, and a dead engine that stops a process."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input (flags, paths, data): shown as one line, never a traceback."""


class EngineDeadError(RuntimeError):
    """The engine can serve nothing more (a device fault, vLLM's engine gone): the process stops."""
