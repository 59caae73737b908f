"""`celery -A support.faulty_app worker`: the product's worker app with support.faults installed."""

from support.faults import install
from workers.celery import app
from workers.tasks import summarize  # noqa: F401  (registers the task)

install()

__all__ = ["app"]
