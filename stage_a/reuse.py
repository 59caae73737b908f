"""What decides a summary, as one hash: reusing a summary across runs (and within one) is safe only
when everything it depends on is the same.

A summary is a function of the image's bytes, the model's identity (stage_a.checkpoint: weights,
tokenizer and chat template, a LoRA adapter with its base), the rendered prompt (mission, dataset
pack, profile), the generation options and the pixel budget. The *scope* hashes everything but the
bytes, once per run; an image's *reuse key* hashes the scope with its bytes' digest. Under greedy
decoding the summary does not depend on batch, sharding, worker count or engine (the project's
core invariant), so those are left out: a key that matches names the summary a recompute would give.

The *stat key* is the cheap pre-check: the scope, the file's absolute path and its stat signature
(size, mtime, ctime, inode). Any write to a file changes its ctime, even when its mtime is put back
(git's index and the checkpoint digest cache trust the same signal), so a row recorded with the
signature of the bytes it summarized stands for those bytes while the signature is unchanged.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from blake3 import blake3

from stage_a.config import RunSpec
from stage_a.errors import UserError

SUMMARY_VERSION = 1
"""Bump when code changes what a summary is for the same inputs (the decoding loop, stop tokens,
the clean-up of SPEC section 5): every earlier key stops matching."""

REUSE_MODES = ("auto", "on", "off")
"""A run's reuse choice: auto reuses under greedy decoding only, on also when sampling, off never."""

RACY_NS = 100_000_000
"""A file changed this recently may change again within one timestamp tick without its signature
showing it: its stat key is not recorded (its content key still is)."""


def check_mode(mode: str, where: str = "reuse") -> str:
    if mode not in REUSE_MODES:
        raise UserError(f"{where} must be one of {', '.join(REUSE_MODES)}, got {mode!r}")
    return mode


def reuses(spec: RunSpec) -> bool:
    """Whether a run takes summaries already made: auto under greedy decoding, on always, off never.
    (Every run records the keys of what it generates, so later runs can reuse it.)"""
    return spec.reuse == "on" or (spec.reuse == "auto" and spec.generation.greedy)


def scope(model: str, system_prompt: str, user_prompt: str, spec: RunSpec) -> str:
    """Hex hash of everything but the bytes that decides an image's summary in a run of ``spec``.

    ``model`` is the serving model's identity (an adapter's includes its base); the prompt is the
    rendered system and user text (engine.prompts), so an edited data pack is another scope.
    Greedy decoding is one decoding whatever the temperature (<= 1e-4) and top_p say."""
    gen = spec.generation.to_dict()
    if spec.generation.greedy:
        gen.update(temperature=0.0, top_p=1.0)
    doc = {"v": SUMMARY_VERSION, "model": model, "system": system_prompt, "user": user_prompt,
           "max_pixels": spec.max_pixels, "generation": gen}
    return blake3(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def content_key(scope_hash: str, digest: str) -> str:
    """The reuse key of an image whose bytes have BLAKE3 ``digest`` (hex) in a run of ``scope_hash``."""
    return blake3(f"content\0{scope_hash}\0{digest}".encode()).hexdigest()


@dataclass(frozen=True)
class FileSignature:
    """What stat says about a file: any write changes it (ctime at least)."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileSignature:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)

    def racy(self, now_ns: int | None = None) -> bool:
        """Changed too recently to stand for its content (see RACY_NS)."""
        now = time.time_ns() if now_ns is None else now_ns
        return now - max(self.mtime_ns, self.ctime_ns) < RACY_NS


def stat_key(scope_hash: str, path: str, sig: FileSignature) -> str:
    """The pre-check key of the file at absolute ``path`` with signature ``sig`` in a run of ``scope_hash``."""
    return blake3(f"stat\0{scope_hash}\0{path}\0{sig.size}\0{sig.mtime_ns}\0{sig.ctime_ns}\0{sig.inode}"
                  .encode("utf-8", "surrogateescape")).hexdigest()
