"""Which model is this? A short, stable identity of a checkpoint folder.

A farm must never summarize a run with another model than the one it names, so runs record the
fingerprint of their checkpoint at registration and workers compare it with the one they load;
every result row records the fingerprint that produced it. The identity is the resolved path
plus a hash of what defines the weights: config files, the weight index, and for each weight file
its name, size and first megabyte (the safetensors header and leading tensors: two fine-tunes of
one architecture differ there). Reading a megabyte per shard keeps it cheap on a 30 GB model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from stage_a.errors import UserError

DEMO_MODEL = "demo"
"""The fingerprint recorded for runs with no checkpoint: the tiny random-weight demo model."""

_CONFIG_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "adapter_config.json",
                 "model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_HEAD_BYTES = 1 << 20


def check_checkpoint(checkpoint: str | Path) -> Path:
    """The checkpoint folder, or a UserError saying why it is not a model or LoRA adapter folder."""
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise UserError(f"checkpoint folder not found: {path}")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise UserError(f"not a model or LoRA adapter folder (no config.json / adapter_config.json): {path}")
    return path


def model_fingerprint(checkpoint: str | Path) -> str:
    """``<folder name>:<16 hex>`` of a model or LoRA adapter folder (an adapter includes its base)."""
    path = Path(checkpoint).expanduser().resolve()
    digest = hashlib.sha256(str(path).encode())
    _hash_folder(path, digest)
    adapter = path / "adapter_config.json"
    if adapter.is_file() and not (path / "config.json").is_file():
        try:
            base = json.loads(adapter.read_text()).get("base_model_name_or_path") or ""
        except (OSError, ValueError):
            base = ""
        base_path = Path(base).expanduser()
        if not base_path.is_absolute():
            base_path = path / base
        if base_path.is_dir():
            digest.update(model_fingerprint(base_path).encode())
    return f"{path.name[:100]}:{digest.hexdigest()[:16]}"


def _hash_folder(path: Path, digest: hashlib._Hash) -> None:
    for name in _CONFIG_FILES:
        f = path / name
        if f.is_file():
            digest.update(name.encode())
            digest.update(f.read_bytes())
    for f in sorted(path.iterdir()) if path.is_dir() else ():
        if f.is_file() and f.suffix in _WEIGHT_SUFFIXES:
            digest.update(f"{f.name}:{f.stat().st_size}".encode())
            with f.open("rb") as fh:
                digest.update(fh.read(_HEAD_BYTES))
