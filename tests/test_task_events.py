"""Flower's view of each message: what workers/tasks.py sends for each kind of outcome."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass
class _Request:
    id: str
    name: str = "stage_a.summarize"
    args: tuple[Any, ...] = ({},)
    hostname: str = "w2@vm"


class _Dispatcher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send(self, kind: str, **fields: Any) -> None:
        self.sent.append((kind, fields))


@pytest.mark.parametrize(("kind", "event"), [("handed_back", "task-retried"), ("redelivered", "task-retried"),
                                              ("cancelled", "task-revoked"), ("done", "task-succeeded"),
                                              ("failed", "task-failed")])
def test_a_hand_back_or_a_cancelled_drop_is_never_success(monkeypatch: pytest.MonkeyPatch, kind: str,
                                                          event: str) -> None:
    import workers.tasks as tasks
    from workers.runtime import Outcome

    dispatcher = _Dispatcher()

    @contextmanager
    def default_dispatcher(hostname: str) -> Any:
        yield dispatcher

    monkeypatch.setattr(tasks, "settings", dataclasses.replace(tasks.settings, task_events=True))
    monkeypatch.setattr(tasks.app.events, "default_dispatcher", default_dispatcher)
    tasks._send_task_events([_Request("t1")], [Outcome(kind, 7, reason="model m2's queue")])  # type: ignore[list-item]
    kinds = [k for k, _ in dispatcher.sent]
    assert kinds == ["task-received", "task-started", event], kinds
    if kind == "handed_back":
        assert "run 7: handed back: model m2's queue" in dispatcher.sent[-1][1]["exception"]
