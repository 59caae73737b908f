"""Celery's consumer with every rejected message dead-lettered, and none able to stop it.

Celery logs and drops a message whose body does not decode, whose content type it refuses (pickle),
that names an unknown task or that is not a task message at all; an exception of any other kind
while it receives a message (a header it expects is missing, say) escapes into the event loop and
the worker exits with "Unrecoverable error". Here each of those ends as one dead letter with the
reason (workers/poison.py) and an acknowledged message, and the worker goes on.
The worker's app selects it with ``worker_consumer`` (workers/celery.py).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from stage_a.errors import first_line
from workers.poison import message_text, sink

log = logging.getLogger(__name__)


def _drop(message: Any, errors: Any) -> None:
    """Acknowledge (reject without requeue) so the entry is neither redelivered nor left unacked."""
    try:
        message.reject_log_error(log, errors)
    except Exception as exc:
        log.error("could not drop a rejected message: %s", exc)


class Consumer(CeleryConsumer):  # type: ignore[misc]
    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        sink.record(f"message body does not decode ({first_line(exc, typed=True)[:300]})", message_text(message))
        super().on_decode_error(message, exc)  # logs it and acknowledges

    def on_unknown_message(self, body: Any, message: Any) -> None:
        sink.record("not a Celery task message (no task header)", message_text(message))
        super().on_unknown_message(body, message)  # warns and rejects

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        # Celery's own version reads more headers (raising on a message without them) and marks
        # the task failed in a result backend this app does not have: dead-letter and drop instead.
        headers = message.headers if isinstance(message.headers, dict) else {}
        sink.record(f"unknown task {str(headers.get('task'))[:200]!r}", message_text(message))
        _drop(message, self.connection_errors)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        sink.record(f"invalid task message ({first_line(exc, typed=True)[:300]})", message_text(message))
        super().on_invalid_task(body, message, exc)  # logs it and rejects

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handler = super().create_task_handler(*args, **kwargs)
        errors = self.connection_errors
        # kombu's Redis transport counts KeyError as a connection error; a message missing a
        # header raises it too, and must not make the worker reconnect (and redeliver it) forever.
        broker_errors = tuple(e for e in errors if not issubclass(e, LookupError))

        def on_task_received(message: Any) -> Any:
            try:
                return handler(message)
            except broker_errors:
                raise  # the broker connection itself: Celery reconnects
            except Exception as exc:
                sink.record(f"message could not be received ({first_line(exc, typed=True)[:300]})", message_text(message))
                _drop(message, errors)
                return None

        return on_task_received
