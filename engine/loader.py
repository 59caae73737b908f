"""Loading a checkpoint (merged model folder or LoRA adapter) for batched left-padded generation."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stage_a.checkpoint import Checkpoint
from stage_a.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any  # Qwen3VLForConditionalGeneration (possibly LoRA-merged)
    processor: Any  # Qwen3VLProcessor with a left-padding tokenizer
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    checkpoint: str
    adapter: bool
    attn_implementation: str
    fingerprint: str
    """The checkpoint's identity (stage_a.checkpoint): recorded with every result."""
    processor_source: str = ""
    """The folder the processor was loaded from."""

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; validates explicit choices."""
    import torch

    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} requested but no CUDA GPU is visible")
        return device if ":" in device else "cuda:0"
    raise UserError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def share_cpus(processes: int, threads: int = 0) -> int:
    """Set torch's CPU threads for one of ``processes`` model processes on this host: ``threads`` if given,
    else OMP_NUM_THREADS's if the operator set it, else the CPUs this process may use divided evenly (at
    least 1). Returns the number in use."""
    import torch

    if not threads and os.environ.get("OMP_NUM_THREADS"):
        return int(torch.get_num_threads())
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = threads or max(1, cpus // max(1, processes))
    torch.set_num_threads(n)
    return n


def _best_attention(device: str) -> str:
    if device.startswith("cuda"):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def force_left_padding(processor: Any) -> None:
    """Decoder-only batches must be left padded whatever the shipped tokenizer config says."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    tok.truncation_side = "left"
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>"
    if hasattr(processor, "padding_side"):
        processor.padding_side = "left"


def load_processor(source: str | Path) -> Any:
    """The processor of a model or adapter folder, left-padding."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(source))
    force_left_padding(processor)
    return processor


def load_model(checkpoint: Checkpoint, device: str = "auto") -> LoadedModel:
    """Load a full model + processor once; bf16 and the best attention on CUDA, float32 on CPU.

    LoRA adapters are not loaded here: the engine puts them beside the base (TransformersEngine.use_adapter).
    """
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one users watch
    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    attn = _best_attention(dev)
    path = checkpoint.path
    if checkpoint.adapter:
        raise ValueError(f"load_model loads full models; {path} is a LoRA adapter (load its base)")
    log.info("loading %s on %s (%s, %s)", path, dev, dtype, attn)
    try:
        model = AutoModelForImageTextToText.from_pretrained(checkpoint.base, dtype=dtype, attn_implementation=attn)
        processor = load_processor(checkpoint.processor)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load checkpoint {path}: {str(exc).splitlines()[0]}") from None
    # Decoding is the run's own (GenerationParams): the checkpoint's generation_config.json (Qwen
    # ships sampling defaults and a repetition penalty) must not fill what the engine leaves unset.
    model.generation_config = GenerationConfig()
    model.to(dev).eval()  # type: ignore[arg-type]
    return LoadedModel(model=model, processor=processor, device=torch.device(dev), dtype=dtype,
                       checkpoint=str(path), adapter=checkpoint.adapter, attn_implementation=attn,
                       fingerprint=checkpoint.identity, processor_source=str(checkpoint.processor))


def check_gpus(gpus: list[str]) -> None:
    """GPU indices asked for must exist here: a host without CUDA is an error, never a silent CPU run."""
    indices = [int(g) for g in gpus if g != "cpu"]
    if not indices:
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"GPU {','.join(map(str, indices))} requested but this host has no usable CUDA GPU "
                        "(torch.cuda.is_available() is False); use cpu to run on the CPU")
    count = torch.cuda.device_count()
    missing = [i for i in indices if i >= count]
    if missing:
        raise UserError(f"GPU {','.join(map(str, missing))} requested but this host has {count} visible GPU(s)")


def pin_process_to_gpu(gpu: str | None) -> None:
    """Restrict this process to one GPU before torch initializes CUDA (so it sees it as cuda:0)."""
    if gpu is None or gpu == "" or gpu == "cpu":
        if gpu == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
