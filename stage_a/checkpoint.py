"""Which model is this? One `Checkpoint` value per folder: where it is, what it is, its identity.

A farm must never summarize a run with another model than the one it names: runs record the
identity of their checkpoint at registration, workers compare it with the one they load, and every
result row records the identity that produced it. The identity is the resolved path plus a hash of
what defines the weights: config files, the weight index, and for each weight file its name, size
and first megabyte (the safetensors header and leading tensors: two fine-tunes of one architecture
differ there). Reading one megabyte per shard keeps it cheap on a checkpoint of many multi-GB shards.
A LoRA adapter's identity includes its base model's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from stage_a.errors import UserError

DEMO_MODEL = "demo"
"""The identity recorded for runs with no checkpoint: the tiny random-weight demo model."""

_CONFIG_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "adapter_config.json",
                 "model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_HEAD_BYTES = 1 << 20


@dataclass(frozen=True)
class Checkpoint:
    """A model folder or a LoRA adapter folder, read once and passed down."""

    path: Path
    """The folder, absolute and resolved."""
    base: Path
    """The folder the base weights load from (``path`` itself unless this is an adapter)."""
    adapter: bool
    lora_rank: int
    """The adapter's largest rank over all modules (peft's rank_pattern may raise some above r); 0 if none."""
    processor: Path
    """Where the tokenizer and processor configs are: the adapter folder if it ships them, else the base."""
    identity: str
    """``<folder name>:<16 hex>``: what runs and result rows record."""
    base_identity: str = ""
    """The base model's identity (``identity`` itself for a full model): runs are routed by it."""

    def __post_init__(self) -> None:
        if not self.base_identity:
            object.__setattr__(self, "base_identity", self.identity)

    @classmethod
    def open(cls, folder: str | Path) -> Checkpoint:
        """The checkpoint in ``folder``, or a UserError saying why it is not one (one line)."""
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise UserError(f"checkpoint folder not found: {path}")
        path = path.resolve()
        adapter_cfg = path / "adapter_config.json"
        if not (path / "config.json").is_file():
            if not adapter_cfg.is_file():
                raise UserError(f"not a model or LoRA adapter folder (no config.json / adapter_config.json): {path}")
            try:
                cfg = json.loads(adapter_cfg.read_text())
                name = str(cfg.get("base_model_name_or_path") or "")
                rank = max([int(cfg.get("r") or 8), *(int(r) for r in (cfg.get("rank_pattern") or {}).values())])
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                raise UserError(f"unreadable LoRA adapter config {adapter_cfg}: {str(exc).splitlines()[0]}") from None
            folder = Path(name).expanduser()
            if not folder.is_absolute() and not folder.is_dir():
                folder = path / folder
            if not name or not folder.is_dir():
                raise UserError(f"LoRA base model folder not found: {name} (from {adapter_cfg})")
            base = cls.open(folder)
            processor = path if (path / "tokenizer_config.json").is_file() else base.path
            return cls(path, base.path, True, rank, processor, _identity(path, base.identity), base.identity)
        return cls(path, path, False, 0, path, _identity(path))

    def reread(self) -> str:
        """The identity of what is in the folder now (a folder replaced while it loaded differs)."""
        return Checkpoint.open(self.path).identity


def _identity(path: Path, base_identity: str = "") -> str:
    digest = hashlib.sha256(str(path).encode())
    for name in _CONFIG_FILES:
        f = path / name
        if f.is_file():
            digest.update(name.encode())
            digest.update(f.read_bytes())
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in _WEIGHT_SUFFIXES:
            digest.update(f"{f.name}:{f.stat().st_size}".encode())
            with f.open("rb") as fh:
                digest.update(fh.read(_HEAD_BYTES))
    digest.update(base_identity.encode())
    return f"{path.name[:100]}:{digest.hexdigest()[:16]}"
