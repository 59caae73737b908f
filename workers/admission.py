"""Admission: which buffered messages become work, and what happens to the others.

Every message gets exactly one outcome, and none can take the buffer down with it:
- work: its images, with the store's path for each key (a message never chooses what file is read);
- already finished (a redelivery): skipped;
- the run was cancelled: dropped;
- the run needs another model than this worker serves: handed back to the queue (no attempt counted);
- it can never succeed (unknown run, malformed, a key the run does not have): a dead letter;
- it names another store (enqueued with another database): a dead letter of no run of this store;
- the database (or broker) fails meanwhile: not the message's fault; admission stops with IntakeOutage
  and the caller delivers the buffer's unsettled messages again;
- its images can never succeed (input root not allowed, a path escaping the root, delivered
  STAGE_A_MAX_ATTEMPTS times without a result): those images are marked failed with the reason,
  so the run still finishes and the failure report names them, and a dead letter says why.
No broker here: tests drive it with plain payloads against a real store.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.images import ImageError, resolve_under_root
from stage_a.messages import ForeignMessage, PoisonMessage, check_store, parse_payload
from stage_a.outage import is_outage
from stage_a.settings import Settings
from stage_a.store import LedgerEntry, ResultStore, RunInfo
from stage_a.store.models import DONE, FAILED
from stage_a.work import ImageKey, ImageResult, WorkItem
from workers.metrics import record_dead_letter

log = logging.getLogger(__name__)


@dataclass
class Fate:
    """What admission decided for one message (Admitted.messages is parallel to the payloads)."""

    kind: str
    """work (its ``keys`` go to the model), cancelled, rejected (dead letter), handed_back, skipped."""
    run_id: int | None = None
    keys: list[ImageKey] = field(default_factory=list)
    """The message's images still to run (kind work)."""
    reason: str | None = None
    """Why it was rejected, or why some of its images failed at admission."""
    failed: list[ImageKey] = field(default_factory=list)
    """Its images failed at admission (recorded as failed with ``reason``)."""


@dataclass
class Admitted:
    """The outcome of one buffer."""

    work: dict[int, list[WorkItem]] = field(default_factory=dict)
    """Images to process, by run, in key order (duplicates collapsed)."""
    failed: list[ImageResult] = field(default_factory=list)
    """Images that can never succeed, already recorded as failed."""
    handed_back: list[Any] = field(default_factory=list)
    """Payloads for another model's workers (re-published by the caller)."""
    dead: int = 0
    cancelled: int = 0
    skipped: int = 0
    messages: list[Fate] = field(default_factory=list)
    """One fate per payload, in payload order."""


class IntakeOutage(Exception):
    """The database or the broker failed while a buffer was admitted: no message is to blame.

    ``fates`` is parallel to the payloads: a message already settled (dead-lettered, or its run
    cancelled) has its Fate, every other one None and is to be delivered again."""

    def __init__(self, cause: BaseException, fates: list[Fate | None]) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.fates = fates


SETTLED = ("rejected", "cancelled")
"""Fates whose outcome is already final (a dead letter written, or nothing to do)."""


@dataclass
class _Message:
    payload: Any
    keys: list[ImageKey]
    paths: list[str] | None
    """What a version-1 message says each key's file is (None: a chunk, which names no files)."""
    run: RunInfo
    fate: Fate = field(default_factory=lambda: Fate("work"))


class Admission:
    def __init__(self, store: ResultStore, settings: Settings, worker: str,
                 serves: Callable[[RunInfo], bool] = lambda run: True) -> None:
        self.store = store
        self.settings = settings
        self.worker = worker
        self.serves = serves
        self.store_id = store.store_id  # read once here, not per message
        self._runs: dict[int, RunInfo | None] = {}

    def admit(self, payloads: Sequence[Any]) -> Admitted:
        """One fate per payload; IntakeOutage when the database or broker fails meanwhile."""
        self._runs = {}  # runs are read once per buffer: a cancellation is seen by the next flush
        out = Admitted()
        try:
            self._admit(payloads, out)
        except Exception as exc:
            if not is_outage(exc):
                raise
            fates: list[Fate | None] = [f if f.kind in SETTLED else None for f in out.messages]
            raise IntakeOutage(exc, fates + [None] * (len(payloads) - len(fates))) from exc
        return out

    def _admit(self, payloads: Sequence[Any], out: Admitted) -> None:
        messages: list[_Message] = []
        for payload in payloads:
            try:
                msg = self._validate(payload)
            except PoisonMessage as exc:
                # Another store's run id means nothing here: its dead letter names no run of this store.
                run_id = None if isinstance(exc, ForeignMessage) else _run_id_of(payload)
                self._dead_letter(str(exc), payload, run_id)
                out.dead += 1
                out.messages.append(Fate("rejected", run_id, reason=str(exc)))
                continue
            except Exception as exc:  # anything else about one message is that message's poison
                if is_outage(exc):  # ... but a database or broker failure is nobody's message's fault
                    raise
                reason = f"unreadable message ({type(exc).__name__}: {exc})"
                self.dead_letter(reason, payload)
                out.dead += 1
                out.messages.append(Fate("rejected", _run_id_of(payload), reason=reason))
                continue
            if msg is None:
                out.cancelled += 1
                out.messages.append(Fate("cancelled", _run_id_of(payload), reason="run cancelled"))
            elif not self.serves(msg.run):
                out.handed_back.append(payload)
                out.messages.append(Fate("handed_back", msg.run.id, reason="needs another model"))
            else:
                msg.fate.run_id = msg.run.id
                out.messages.append(msg.fate)
                messages.append(msg)
        if messages:
            self._against_ledger(messages, out)

    # ---- one message, without the ledger ----------------------------------------------------

    def _validate(self, payload: Any) -> _Message | None:
        message = parse_payload(payload)
        check_store(message, self.store_id)
        run_id = message.keys[0].run_id
        run = self.run(run_id)
        if run is None:
            raise PoisonMessage(f"unknown run {run_id}")
        if run.cancelled:
            return None
        return _Message(payload, message.keys, message.paths, run)

    def known_run(self, run_id: int) -> RunInfo | None:
        """The run as this buffer's admission read it (None: not read); never reads the database."""
        return self._runs.get(run_id)

    def run(self, run_id: int) -> RunInfo | None:
        if run_id not in self._runs:
            self._runs[run_id] = self.store.find_run(run_id)
        return self._runs[run_id]

    def _root_refusal(self, run: RunInfo) -> str | None:
        roots = self.settings.input_roots
        if not roots:
            return None
        real = os.path.realpath(run.spec.input_root)
        for r in roots:
            rr = os.path.realpath(r)
            if os.path.commonpath([rr, real]) == rr:
                return None
        return f"run {run.id} input root {run.spec.input_root} is outside STAGE_A_INPUT_ROOTS"

    # ---- against the ledger (one query for the whole buffer) --------------------------------

    def _against_ledger(self, messages: list[_Message], out: Admitted) -> None:
        entries = self.store.entries([k for m in messages for k in m.keys])
        by_run: dict[int, dict[ImageKey, WorkItem]] = {}
        for m in messages:
            # One dead letter per message whatever is wrong with it (a message listing thousands of
            # images its run does not have is one rejection, not thousands), and nothing of a refused
            # message is worked on.
            missing = [k for k in m.keys if k not in entries]
            if missing:
                more = f" (nor {len(missing) - 1} more of its {len(m.keys)})" if len(missing) > 1 else ""
                reason = f"image {missing[0]} is not in run {m.run.id}{more}"
                self.dead_letter(reason, m.payload, m.run.id)
                out.dead += 1
                m.fate.kind, m.fate.reason = "rejected", reason
                continue
            moved = [WorkItem(k, p) for k, p in zip(m.keys, m.paths or (), strict=False)
                     if p != entries[k].rel_path]
            if moved:
                # The store decides which file a key is; a message naming another is refused.
                why = self._path_refusal(moved[0], m.run) or (
                    f"path {moved[0].rel_path!r:.200} does not match the stored path of {moved[0].key}")
                self.dead_letter(why, m.payload, m.run.id)
                out.dead += 1
                m.fate.kind, m.fate.reason = "rejected", why
                continue
            present = [WorkItem(k, entries[k].rel_path) for k in m.keys]
            refusal = self._root_refusal(m.run)
            todo = [it for it in present if entries[it.key].status not in (DONE, FAILED)]
            out.skipped += len(present) - len(todo)
            gave_up = []
            for it in todo:
                refused = refusal or self._path_refusal(it, m.run) or self._attempts_refusal(entries[it.key])
                if refused:
                    gave_up.append(ImageResult(key=it.key, error=refused))
                else:
                    by_run.setdefault(m.run.id, {})[it.key] = WorkItem(it.key, entries[it.key].rel_path)
                    m.fate.keys.append(it.key)
            if gave_up:
                self.store.record_results(gave_up, self.worker)
                more = f" (and {len(gave_up) - 1} more images of the message)" if len(gave_up) > 1 else ""
                reason = f"image {gave_up[0].key}: {gave_up[0].error}{more}"
                self.dead_letter(reason, m.payload, m.run.id)
                out.failed += gave_up
                m.fate.failed = [r.key for r in gave_up]
                m.fate.reason = reason
            if m.fate.kind == "work" and not m.fate.keys and not gave_up:
                m.fate.kind = "skipped"
        out.work = {run_id: [d[k] for k in sorted(d)] for run_id, d in by_run.items()}

    @staticmethod
    def _path_refusal(item: WorkItem, run: RunInfo) -> str | None:
        try:
            resolve_under_root(item.rel_path, run.spec.input_root)
        except ImageError as exc:
            return str(exc)
        return None

    def _attempts_refusal(self, entry: LedgerEntry) -> str | None:
        if entry.attempts >= self.settings.max_delivery_attempts:
            return f"gave up after {entry.attempts} deliveries without a result"
        return None

    def dead_letter(self, reason: str, payload: Any, run_id: int | None = None) -> None:
        """Record a rejected message under ``run_id``, by default the run it names."""
        self._dead_letter(reason, payload, _run_id_of(payload) if run_id is None else run_id)

    def _dead_letter(self, reason: str, payload: Any, run_id: int | None) -> None:
        log.error("rejected message: %s", reason)
        try:
            text = json.dumps(payload, ensure_ascii=False, default=repr)
        except Exception:
            text = repr(payload)
        self.store.dead_letter(reason, text, self.worker, run_id)
        record_dead_letter()


def _run_id_of(payload: Any) -> int | None:
    """The run a payload names, when it can be read at all."""
    if isinstance(payload, dict) and type(payload.get("run_id")) is int:
        return int(payload["run_id"])
    return None
