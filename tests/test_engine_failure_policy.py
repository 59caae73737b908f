"""One failure policy for both engines (engine/policy.py), decided by exception type only.

The transformers engine runs the real tiny model; the vLLM engine runs the same preparation and
decoding around a stand-in `vllm.LLM` (no vLLM needed), so a fault injected at the model call is
seen by each engine exactly where a real one would be. Both must handle it the same way.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.transformers_engine import TransformersEngine
from engine.vllm_engine import VllmEngine
from stage_a.checkpoint import Checkpoint
from stage_a.config import GenerationParams, RunSpec
from stage_a.errors import EngineDeadError
from stage_a.work import ImageKey, ImageResult, WorkItem

MISSION = "挡风板安装检查"
SIZES = [(64, 48), (200, 150), (97, 301), (320, 240)]
Fault = Any  # callable(rows in this model call) -> exception to raise, or None


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("policy_images")
    for i, (w, h) in enumerate(SIZES):
        rng = np.random.default_rng(2000 + i)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"img_{i}.png")
    return root


@pytest.fixture(scope="module")
def items() -> list[WorkItem]:
    return [WorkItem(ImageKey(1, 0, i + 1), f"img_{i}.png") for i in range(len(SIZES))]


class FakeLLM:
    """`vllm.LLM.generate`'s contract: one output per request, each a short fixed completion."""

    def __init__(self, processor: Any) -> None:
        self.model_config = SimpleNamespace(max_model_len=8192)
        tok = processor.tokenizer
        self.completion = tok("a cabinet door", add_special_tokens=False)["input_ids"] + \
            [tok.convert_tokens_to_ids("<|im_end|>")]
        self.fault: Fault = lambda rows: None
        self.calls: list[int] = []

    def generate(self, requests: list[Any], params: Any, use_tqdm: bool = False, lora_request: Any = None) -> Any:
        self.calls.append(len(requests))
        exc = self.fault(len(requests))
        if exc is not None:
            raise exc
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=self.completion, finish_reason="stop")],
                                prompt_token_ids=[1, 2, 3]) for _ in requests]


class StandInVllm(VllmEngine):
    def sampling_params(self, ctx: Any) -> Any:  # vllm.SamplingParams without vLLM installed
        return SimpleNamespace(max_tokens=ctx.spec.generation.max_new_tokens)


class Harness:
    """One engine with a fault switch at its model call and a log of each call's row count."""

    def __init__(self, kind: str, loaded: Any, checkpoint: Path) -> None:
        self.kind = kind
        if kind == "vllm":
            self.llm = FakeLLM(loaded.processor)
            self.engine: Any = StandInVllm(self.llm, loaded.processor, Checkpoint.open(checkpoint))
        else:
            self.engine = TransformersEngine(loaded)
            self.calls: list[int] = []
            self._fault: Fault = lambda rows: None
            real = loaded.model.generate

            def generate(**kw: Any) -> Any:
                self.calls.append(int(kw["input_ids"].shape[0]))
                exc = self._fault(int(kw["input_ids"].shape[0]))
                if exc is not None:
                    raise exc
                return real(**kw)

            self.engine.loaded = SimpleNamespace(model=SimpleNamespace(generate=generate), device=loaded.device,
                                                 dtype=loaded.dtype)

    def run(self, root: Path, items: list[WorkItem], fault: Fault) -> tuple[dict[ImageKey, ImageResult], list[int]]:
        if self.kind == "vllm":
            self.llm.fault, self.llm.calls = fault, []
        else:
            self._fault, self.calls = fault, []
        spec = RunSpec(mission=MISSION, dataset="bbu", input_root=str(root), batch_size=8,
                       generation=GenerationParams(max_new_tokens=6))
        ctx = self.engine.context(1, spec)
        results = self.engine.generate(self.engine.prepare(ctx, items))
        assert sorted(r.key for r in results) == sorted(it.key for it in items)  # every row once
        return {r.key: r for r in results}, (self.llm.calls if self.kind == "vllm" else self.calls)


@pytest.fixture(scope="module")
def harnesses(tiny_loaded: Any, tiny_checkpoint: Path) -> dict[str, Harness]:
    return {kind: Harness(kind, tiny_loaded, tiny_checkpoint) for kind in ("transformers", "vllm")}


def oom(message: str = "CUDA out of memory. Tried to allocate 2.00 GiB") -> BaseException:
    return torch.OutOfMemoryError(message)


def test_out_of_memory_splits_the_batch_in_both_engines(harnesses: dict[str, Harness], root: Path,
                                                          items: list[WorkItem]) -> None:
    calls = {}
    for kind, h in harnesses.items():
        clean, _ = h.run(root, items, lambda rows: None)
        split, calls[kind] = h.run(root, items, lambda rows: oom() if rows > 1 else None)
        assert all(r.ok for r in clean.values()), [r.error for r in clean.values()]
        # The same summaries as without the fault: the split changes nothing a row produces.
        assert {k: r.summary for k, r in split.items()} == {k: r.summary for k, r in clean.items()}, kind
    assert calls["transformers"] == calls["vllm"] == [4, 2, 1, 1, 2, 1, 1]


def test_an_image_too_large_alone_fails_alone_in_both_engines(harnesses: dict[str, Harness], root: Path,
                                                                items: list[WorkItem]) -> None:
    for kind, h in harnesses.items():
        results, _ = h.run(root, items, lambda rows: oom())
        assert [r.error for r in results.values()] == ["out of GPU memory on a single image"] * len(items), kind


@pytest.mark.parametrize("text", ["CUDA error: an illegal memory access was encountered",
                                  "cuda kernel failed; out of memory in the allocator"])
def test_a_message_naming_cuda_is_not_a_dead_engine(harnesses: dict[str, Harness], root: Path,
                                                    items: list[WorkItem], text: str) -> None:
    for kind, h in harnesses.items():
        results, calls = h.run(root, items, lambda rows: RuntimeError(text))
        # Every row failing is the batch's failure, reported per row, never a dead engine.
        assert {r.error for r in results.values()} == {f"generation failed: RuntimeError: {text}"}, kind
        assert calls == [4, 1, 1, 1, 1], kind


def test_one_bad_row_fails_alone_in_both_engines(harnesses: dict[str, Harness], root: Path,
                                                 items: list[WorkItem]) -> None:
    """A fault that only a batch holding the second image hits (vLLM refusing one request's input)."""
    def refusing_the_second_image() -> Fault:
        calls = iter(range(1, 100))  # calls: the batch, then rows 1, 2, 3, 4 one at a time
        return lambda rows: ValueError("the image is refused") if next(calls) in (1, 3) else None

    for kind, h in harnesses.items():
        results, _ = h.run(root, items, refusing_the_second_image())
        failed = [k.image_index for k, r in results.items() if not r.ok]
        assert failed == [2], (kind, {k: r.error for k, r in results.items()})


def test_a_device_fault_by_type_is_a_dead_engine_in_both_engines(harnesses: dict[str, Harness], root: Path,
                                                                 items: list[WorkItem]) -> None:
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is None:
        pytest.skip("this torch has no AcceleratorError")
    for h in harnesses.values():
        with pytest.raises(EngineDeadError):
            h.run(root, items, lambda rows: accelerator_error("device lost"))
