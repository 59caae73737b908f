"""The step loop's reuse step: before anything is planned or decoded, images whose summary is already
in the store (stage_a.reuse keys) are recorded as reused, and duplicates of an image about to be
generated wait for it instead of being generated again.

Per image, cheapest first: stat the file and look its stat key up (no read at all); else read and hash
its bytes without decoding them and look the content key up; else it is generated (and the first of
several images with the same bytes is generated alone). Nothing here needs the model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.images import FileFacts, ImageError, read_facts, resolve_under_root
from engine.prompts import build_prompt
from stage_a import reuse
from stage_a.config import RunSpec
from stage_a.missions import get_mission
from stage_a.store import ResultStore, Reusable
from stage_a.work import ImageKey, ImageResult, WorkItem

log = logging.getLogger(__name__)


def run_scope(spec: RunSpec, model: str, data_dir: str = "") -> str:
    """stage_a.reuse.scope for a run of ``spec`` served by ``model``, its prompt rendered as the engine does."""
    prompt = build_prompt(get_mission(spec.mission, data_dir=data_dir), spec.dataset, spec.prompt_profile,
                          data_dir=data_dir)
    return reuse.scope(model, prompt.system, prompt.user, spec)


@dataclass
class Split:
    """A run's items after the reuse step."""

    scope: str
    reused: list[ImageResult] = field(default_factory=list)
    """Taken from the store: record them as they are."""
    todo: list[WorkItem] = field(default_factory=list)
    """To generate (one per distinct content, plus those whose file could not be read here)."""
    copies: dict[ImageKey, list[tuple[WorkItem, str | None]]] = field(default_factory=dict)
    """Image being generated -> the images with the same bytes waiting for it (with their stat keys)."""
    expect: dict[ImageKey, str] = field(default_factory=dict)
    """Image being generated with copies waiting -> the content key they were matched on."""

    def copies_of(self, result: ImageResult, run_id: int) -> list[ImageResult]:
        """The waiting copies of ``result``'s image, now that it is recorded (its failure is theirs)."""
        waiting = self.copies.pop(result.key, [])
        if not waiting:
            return []
        if result.ok and result.reuse_key != self.expect.get(result.key):
            error = "the file with the same bytes changed while it was summarized; a resume summarizes this one"
            return [ImageResult(key=it.key, error=error) for it, _ in waiting]
        if not result.ok:
            return [ImageResult(key=it.key, error=result.error or "empty summary") for it, _ in waiting]
        return [ImageResult(key=it.key, summary=result.summary, raw_text=result.raw_text, stat_key=skey,
                            reused_from=run_id) for it, skey in waiting]


class ReuseStep:
    """One per step loop; ``precheck`` (STAGE_A_REUSE_PRECHECK) trusts unchanged stat signatures."""

    def __init__(self, store: ResultStore, precheck: bool = True) -> None:
        self.store = store
        self.precheck = precheck

    def split(self, spec: RunSpec, scope: str, items: Sequence[WorkItem], lookup: bool = True) -> Split:
        """Reused results, the items to generate and the duplicates waiting on them. ``lookup`` False:
        duplicates only (the ranks of a multi-GPU run, whose parent looked up once for all of them)."""
        out = Split(scope)
        root = spec.input_root
        paths: dict[ImageKey, str] = {}
        stat_keys: dict[ImageKey, str] = {}
        for it in items:
            try:
                path = resolve_under_root(it.rel_path, root)
                sig = reuse.FileSignature.of(os.stat(path))
            except (ImageError, OSError):
                continue  # prepare fails it with its reason
            paths[it.key] = str(path)
            if not sig.racy():
                stat_keys[it.key] = reuse.stat_key(scope, str(path), sig)
        found = self._found("stat_key", stat_keys.values()) if lookup and self.precheck else {}
        rest: list[WorkItem] = []
        for it in items:
            hit = found.get(stat_keys.get(it.key, ""))
            if hit is not None:
                out.reused.append(_reused(it, hit))
            else:
                rest.append(it)
        facts: dict[ImageKey, FileFacts] = {}
        for it in rest:
            if it.key in paths:
                try:
                    facts[it.key] = read_facts(resolve_under_root(it.rel_path, root))
                except ImageError:
                    pass
        content = {k: reuse.content_key(scope, f.digest) for k, f in facts.items()}
        found = self._found("reuse_key", content.values()) if lookup else {}
        first: dict[str, ImageKey] = {}
        for it in rest:
            ckey = content.get(it.key)
            f = facts.get(it.key)
            # The signature the bytes were read with: a later night finds this row without reading.
            skey = (reuse.stat_key(scope, paths[it.key], f.signature)
                    if f is not None and f.signature is not None and self.precheck else None)
            if ckey is None:
                out.todo.append(it)
            elif ckey in found:
                out.reused.append(_reused(it, found[ckey], skey))
            elif ckey in first:
                out.copies.setdefault(first[ckey], []).append((it, skey))
                out.expect[first[ckey]] = ckey
            else:
                first[ckey] = it.key
                out.todo.append(it)
        if out.reused or out.copies:
            log.info("reuse: %d of %d images taken from earlier results, %d wait for an identical image",
                     len(out.reused), len(items), sum(len(c) for c in out.copies.values()))
        return out

    def _found(self, column: str, keys: object) -> dict[str, Reusable]:
        wanted = list(keys)  # type: ignore[call-overload]
        return self.store.reusable(column, wanted) if wanted else {}


def _reused(item: WorkItem, hit: Reusable, stat_key: str | None = None) -> ImageResult:
    return ImageResult(key=item.key, summary=hit.summary, raw_text=hit.raw_text, stat_key=stat_key,
                       reused_from=hit.run_id, model=hit.model, engine=hit.engine)
