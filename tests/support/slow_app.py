"""`celery -A support.slow_app worker`: the product's worker app whose every batch takes at least
STAGE_A_TEST_SLOW_BATCH_S seconds (support.faults.install_slow)."""

from support.faults import install_slow
from workers.celery import app
from workers.tasks import summarize  # noqa: F401  (registers the task)

install_slow()

__all__ = ["app"]
