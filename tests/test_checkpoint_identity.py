"""A checkpoint's identity is its content (issue 18, items 1-3): every byte of every weight, config
and tokenizer file counts, the folder's path and name do not; per-file digests are cached by stat so a
restart reads nothing again, yet any write (even with the mtime put back) is seen; a relative
``--checkpoint`` is recorded absolute."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REDIS_URL
from support.cli import base_env, cli
from support.farm import MISSION, make_tree

from stage_a.checkpoint import _RACY_NS, Checkpoint, hashed

MIB = 1 << 20


def _settle(folder: Path) -> None:
    """Wait until every file of ``folder`` is old enough for its digest to be cached (a file written
    within the same timestamp tick as its hashing is hashed again next time, never trusted)."""
    newest = max(max(f.stat().st_mtime_ns, f.stat().st_ctime_ns) for f in folder.iterdir())
    while time.time_ns() <= newest + _RACY_NS:
        time.sleep(0.01)


def _model(folder: Path, weight: bytes, *, config: dict[str, object] | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "qwen3_vl", "hidden_size": 16}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"padding_side": "right"}))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}))
    (folder / "merges.txt").write_text("a b\n")
    (folder / "model.safetensors").write_bytes(weight)
    return folder


def _adapter(folder: Path, base: Path, weight: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(weight)
    return folder


@pytest.fixture(scope="module")
def weight() -> bytes:
    return os.urandom(3 * MIB + 123)


def _patched(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def test_a_copy_that_differs_after_the_first_mib_is_another_model(tmp_path: Path, weight: bytes) -> None:
    a = _model(tmp_path / "a", weight)
    b = _model(tmp_path / "b", _patched(weight, 2 * MIB + 5))  # same size, same first MiB
    assert a.joinpath("model.safetensors").stat().st_size == b.joinpath("model.safetensors").stat().st_size
    ida, idb = Checkpoint.open(a).identity, Checkpoint.open(b).identity
    assert ida != idb
    for ident in (ida, idb):
        assert ident.startswith("m-") and len(ident) == 26 and all(c in "0123456789abcdef" for c in ident[2:])


def test_the_same_bytes_anywhere_are_one_model(tmp_path: Path, weight: bytes) -> None:
    a = _model(tmp_path / "mnt1" / "stage-a-v1", weight)
    b = tmp_path / "elsewhere" / "deeper" / "renamed-copy"
    shutil.copytree(a, b)
    ca, cb = Checkpoint.open(a), Checkpoint.open(b)
    assert ca.identity == cb.identity == ca.base_identity
    assert (ca.name, cb.name) == ("stage-a-v1", "renamed-copy")
    assert "stage-a" not in ca.identity and "renamed" not in cb.identity


@pytest.mark.parametrize("edit", ["config.json", "tokenizer.json", "merges.txt", "chat_template.jinja",
                                  "generation_config.json"])
def test_a_changed_config_or_tokenizer_file_changes_the_identity(tmp_path: Path, weight: bytes, edit: str) -> None:
    folder = _model(tmp_path / "m", weight)
    before = Checkpoint.open(folder).identity
    f = folder / edit
    f.write_text((f.read_text() if f.exists() else "") + " ")
    assert Checkpoint.open(folder).identity != before


def test_documentation_and_hidden_files_do_not_count(tmp_path: Path, weight: bytes) -> None:
    folder = _model(tmp_path / "m", weight)
    before = Checkpoint.open(folder).identity
    (folder / "README.md").write_text("# A model card\n")
    (folder / "LICENSE").write_text("Apache-2.0\n")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.json").write_text("{}")
    assert Checkpoint.open(folder).identity == before


def test_a_lora_adapter_covers_its_files_and_its_base(tmp_path: Path, weight: bytes) -> None:
    base = _model(tmp_path / "base", weight)
    adapter_bytes = os.urandom(2 * MIB)
    ckpt = Checkpoint.open(_adapter(tmp_path / "lora", base, adapter_bytes))
    base_id = Checkpoint.open(base).identity
    assert ckpt.adapter and ckpt.base == base and ckpt.base_identity == base_id != ckpt.identity

    other_adapter = Checkpoint.open(_adapter(tmp_path / "lora2", base, _patched(adapter_bytes, MIB + 7)))
    assert other_adapter.identity != ckpt.identity and other_adapter.base_identity == base_id

    drifted_base = _model(tmp_path / "base2", _patched(weight, 3 * MIB))
    on_drifted = Checkpoint.open(_adapter(tmp_path / "lora3", drifted_base, adapter_bytes))
    assert on_drifted.base_identity != base_id and on_drifted.identity != ckpt.identity


def test_a_second_open_reads_no_file_again(tmp_path: Path, weight: bytes) -> None:
    folder = _model(tmp_path / "m", weight)
    cache = tmp_path / "cache" / "identity"
    _settle(folder)
    first = Checkpoint.open(folder, cache)
    assert len(list(cache.glob("*.json"))) == 1
    files, read = hashed.files, hashed.bytes
    again = Checkpoint.open(folder, cache)  # another process would find the same JSON file
    assert again.identity == first.identity and again.reread() == first.identity
    assert (hashed.files, hashed.bytes) == (files, read)
    assert Checkpoint.open(folder).identity == first.identity  # the cache gives what hashing gives


def test_a_rewrite_with_the_mtime_put_back_is_hashed_again(tmp_path: Path, weight: bytes) -> None:
    folder = _model(tmp_path / "m", weight)
    cache = tmp_path / "cache"
    _settle(folder)
    first = Checkpoint.open(folder, cache).identity
    shard = folder / "model.safetensors"
    st = shard.stat()
    with shard.open("r+b") as fh:  # in place: same inode, same size
        fh.seek(2 * MIB)
        fh.write(b"retrained")
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = shard.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    read = hashed.bytes
    assert Checkpoint.open(folder, cache).identity != first
    assert hashed.bytes - read == st.st_size  # that shard only


def test_a_corrupt_or_unwritable_cache_is_not_a_failure(tmp_path: Path, weight: bytes,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    folder = _model(tmp_path / "m", weight)
    cache = tmp_path / "cache"
    _settle(folder)
    want = Checkpoint.open(folder, cache).identity
    (entry,) = cache.glob("*.json")
    data = json.loads(entry.read_text())
    for v in data["files"].values():
        v["blake3"] = "not hex"
    for junk in ("{not json", "[]", json.dumps({"version": 1, "files": {"config.json": "x"}}), json.dumps(data)):
        entry.write_text(junk)
        assert Checkpoint.open(folder, cache).identity == want
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with caplog.at_level("WARNING", logger="stage_a.checkpoint"):
        assert Checkpoint.open(folder, blocker / "identity").identity == want
    assert "identity cache not written" in caplog.text


# ---- a relative --checkpoint is recorded absolute (item 3) ------------------------------------


@pytest.fixture()
def queue() -> Iterator[str]:
    import redis

    name = f"stage_a_test_{uuid.uuid4().hex[:8]}"
    yield name
    redis.Redis.from_url(REDIS_URL).delete(name)


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_relative_checkpoint_is_recorded_absolute(pg_url: str, queue: str, tmp_path: Path, weight: bytes,
                                                   how: str) -> None:
    from stage_a.store import ResultStore

    model = _model(tmp_path / "models" / "ckpt1", weight)
    make_tree(tmp_path / "in", groups=2)
    cwd = tmp_path / "ops"
    cwd.mkdir()
    env = base_env(STAGE_A_DATABASE_URL=pg_url, STAGE_A_BROKER_URL=REDIS_URL, STAGE_A_QUEUE=queue,
                   STAGE_A_CACHE_DIR=str(tmp_path / "cache"))
    args = ["enqueue", "--mission", MISSION, "--input-dir", "../in", "--max-new-tokens", "4"]
    if how == "option":
        args += ["--checkpoint", "../models/ckpt1"]
    else:
        env["STAGE_A_CHECKPOINT"] = "../models/ckpt1"
    dry = cli([*args, "--dry-run"], env, cwd)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"checkpoint:  {model.resolve()}: model {Checkpoint.open(model).identity}" in dry.stdout, dry.stdout
    proc = cli(args, env, cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    store = ResultStore(pg_url)
    try:
        run = store.latest_run()
        assert run is not None
        assert run.spec.checkpoint == str(model.resolve())
        assert run.spec.input_root == str((tmp_path / "in").resolve())
        assert run.model == Checkpoint.open(model).identity
    finally:
        store.close()
    assert list((tmp_path / "cache" / "identity").glob("*.json"))  # enqueue used the settings' cache


def test_the_identity_is_shown_beside_the_checkpoint_folder_name() -> None:
    """The identity names no folder any more: status, the runs table and the pages add the folder's name."""
    from monitor.text import model_label

    ident = "m-0123456789abcdef01234567"
    assert model_label(ident, "/models/ck-a/", short=True) == "ck-a m-0123456789"
    assert model_label(ident, "/models/ck-a") == f"ck-a {ident}"
    assert model_label(ident, "") == ident
    assert model_label(None, "/models/ck-a") == "ck-a"
    assert model_label("demo", "") == "demo"
    assert model_label("ck-a:1111222233334444", "/m/ck-a") == "ck-a:1111222233334444"  # recorded before


def test_a_file_written_while_it_is_hashed_is_a_clear_error(tmp_path: Path, weight: bytes,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint being copied over is no model yet: one line naming the file, never a mixed identity."""
    import stage_a.checkpoint as checkpoint
    from stage_a.errors import UserError

    folder = _model(tmp_path / "m", weight)
    real = checkpoint._hash_file

    def copied_over_meanwhile(f: Path, size: int) -> bytes:
        digest = real(f, size)
        if f.name == "model.safetensors":
            with f.open("ab") as fh:
                fh.write(b"more of the new epoch")
        return digest

    monkeypatch.setattr(checkpoint, "_hash_file", copied_over_meanwhile)
    with pytest.raises(UserError, match="model.safetensors changed while it was read") as err:
        Checkpoint.open(folder, tmp_path / "cache")
    assert "\n" not in str(err.value)
