"""The results store: one class, composed of parts with one job each.

runs.py (runs, their groups and images), ledger.py (the work ledger: lease, record, attempts,
dead letters), recovery.py (expired leases, lost messages), reports.py (counts, export stream),
views.py (read-only queries of the operator views), bulk.py (driver-level fast paths), base.py (engine, retries). Alembic (migrations/) owns the schema.
"""

from __future__ import annotations

from stage_a.store.ledger import LedgerPart
from stage_a.store.recovery import RecoveryPart
from stage_a.store.reports import ReportsPart
from stage_a.store.runs import RunsPart
from stage_a.store.views import ViewQueries


class ResultStore(RunsPart, LedgerPart, RecoveryPart, ReportsPart, ViewQueries):
    """All database access of stage-a. One instance (one engine) per process."""
