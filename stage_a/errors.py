"""Error types: user mistakes the CLI turns into one clear line, and a dead engine that stops a process."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input (flags, paths, data): shown as one line, never a traceback."""


class EngineDeadError(RuntimeError):
    """The engine can serve nothing more (a device fault, vLLM's engine gone): the process stops."""


def first_line(exc: BaseException | None, typed: bool = False) -> str:
    """The first line of ``exc``'s message (its type's name if it has none), for one-line logs and reasons."""
    if exc is None:
        return "unknown error"
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if typed else text.splitlines()[0]
