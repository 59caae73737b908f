"""The results store (SQLAlchemy 2 + Alembic)."""

from stage_a.store.reports import ExportGroup, ExportImage, RunCounts
from stage_a.store.runs import GroupInput, RunInfo
from stage_a.store.store import ResultStore

__all__ = ["ExportGroup", "ExportImage", "GroupInput", "ResultStore", "RunCounts", "RunInfo"]
