"""The results store (SQLAlchemy 2 + Alembic)."""

from stage_a.store.store import ExportGroup, ExportImage, GroupInput, ResultStore, RunCounts, RunInfo

__all__ = ["ExportGroup", "ExportImage", "GroupInput", "ResultStore", "RunCounts", "RunInfo"]
