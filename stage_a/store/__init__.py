"""The results store (SQLAlchemy 2 + Alembic): the ledger's writes (store.py) and its reads (queries.py)."""

from stage_a.store.models import utcnow
from stage_a.store.queries import ExportGroup, ExportImage, RunCounts
from stage_a.store.runs import GroupInput, RunInfo, check_run_id
from stage_a.store.store import LedgerEntry, ResultStore, Reusable

__all__ = ["ExportGroup", "ExportImage", "GroupInput", "LedgerEntry", "ResultStore", "Reusable", "RunCounts", "RunInfo",
           "check_run_id", "utcnow"]
