"""One name per worker process everywhere (heartbeat rows, image rows, dead letters, logs): Celery's
node name (-n, e.g. ``w2@vm``, the name Flower shows) and the process id, ``w2@vm:18941``. Outside
a Celery worker (tests, `stage-a run`) the host name stands in for the node."""

from __future__ import annotations

import os
import socket

_node: str | None = None


def set_node(node: str | None) -> None:
    """Record the node name (in the main process at worker_init, so pool processes inherit it)."""
    global _node
    _node = node or None


def process_name(node: str | None = None) -> str:
    """``node:pid`` of this process (``node`` None: the recorded node, else the host name)."""
    return f"{node or _node or socket.gethostname()}:{os.getpid()}"
