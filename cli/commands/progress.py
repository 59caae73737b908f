"""Progress display for long runs: images and groups, rate and ETA (rich)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from stage_a.store import ResultStore, RunCounts

if TYPE_CHECKING:
    from engine.steploop import BatchDone

GROUP_REFRESH_S = 3.0


class RunProgress:
    """Images advance per batch; group counts are re-read from the store every few seconds."""

    def __init__(self, store: ResultStore, run_id: int, start: RunCounts) -> None:
        self.store = store
        self.run_id = run_id
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        finished = start.done + start.failed
        self.images = self.progress.add_task("images", total=start.images_total, completed=finished, rate="")
        self.groups = self.progress.add_task("groups", total=start.groups_total, completed=start.groups_done, rate="")
        self._t0 = time.perf_counter()
        self._start_finished = finished
        self._finished = finished
        self._last_groups = 0.0
        self._failed = start.failed

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.refresh_groups()
        self.stop()

    def stop(self) -> None:
        self.progress.stop()

    def _rate(self) -> str:
        dt = time.perf_counter() - self._t0
        n = self._finished - self._start_finished
        return f"{n / dt:.2f} img/s" if dt > 0 and n else ""

    def loading(self) -> None:
        """Shown while the model loads (seconds to minutes): the run is not hanging."""
        self.progress.update(self.images, description="loading model")

    def advance(self, batch: BatchDone) -> None:
        self.progress.update(self.images, description="images")
        self._finished += len(batch.results)
        self.progress.update(self.images, completed=self._finished, rate=self._rate())
        if time.perf_counter() - self._last_groups > GROUP_REFRESH_S:
            self.refresh_groups()

    def refresh_groups(self) -> None:
        counts = self.store.queries.counts(self.run_id)
        self._last_groups = time.perf_counter()
        self.progress.update(self.groups, completed=counts.groups_done + counts.groups_failed)

    def refresh_from_store(self) -> None:
        """For multi-process runs the parent only sees the store."""
        counts = self.store.queries.counts(self.run_id)
        if counts.done + counts.failed > self._finished:
            self.progress.update(self.images, description="images")
        self._finished = counts.done + counts.failed
        self.progress.update(self.images, completed=self._finished, rate=self._rate())
        self.progress.update(self.groups, completed=counts.groups_done + counts.groups_failed)
