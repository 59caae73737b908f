"""A minimal Celery app for tests/test_publish.py: a real worker that records what it receives.

`celery -A _publish_probe_app worker` (run from tests/) consumes PROBE_QUEUE and pushes every
`stage_a.summarize` payload it runs, as JSON, onto the Redis list PROBE_RESULTS.
"""

from __future__ import annotations

import json
import os

import redis
from celery import Celery

BROKER = os.environ["PROBE_BROKER_URL"]
app = Celery("stage_a_publish_probe", broker=BROKER)
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                task_default_queue=os.environ["PROBE_QUEUE"], broker_connection_retry_on_startup=True)


@app.task(name="stage_a.summarize")
def summarize(payload: dict) -> None:  # type: ignore[type-arg]
    task_id = summarize.request.id
    redis.Redis.from_url(BROKER).rpush(os.environ["PROBE_RESULTS"], json.dumps({"id": task_id, "payload": payload}))
