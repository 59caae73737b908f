"""Typed configuration shared by `stage-a run`, `stage-a enqueue` and the workers."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from stage_a.errors import UserError

GREEDY_TEMPERATURE = 1e-4
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_PIXELS = {"bbu": 1_048_576, "rru": 2_097_152}
SHARDING_MODES = ("per_group", "per_image")
DEFAULT_PROFILE = "summary_runtime"
ENGINES = ("transformers", "vllm")


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings; validated on construction so a bad value never reaches the model."""

    max_new_tokens: int = 1024
    """Upper bound on generated tokens per image."""
    temperature: float = 0.0
    """0 (or anything <= 1e-4) means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass; only used when sampling."""
    repetition_penalty: float = 1.05
    """>1 discourages repeated tokens (prompt tokens included, padding excluded)."""
    min_new_tokens: int = 0
    """Benchmarks set it equal to max_new_tokens to fix output lengths."""

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise UserError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:  # written so that NaN fails too
            raise UserError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise UserError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise UserError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run; stored with the run so workers and exports agree on it."""

    mission: str
    """Mission name exactly as in the mission data (e.g. 挡风板安装检查); picks prompt and domain."""
    dataset: str
    """Domain pack of the prompt: bbu or rru."""
    input_root: str
    """Absolute folder that contains the mission folder; workers read only below it."""
    checkpoint: str = ""
    """Merged Qwen3-VL folder or LoRA adapter folder; empty: the tiny random-weight demo model."""
    prompt_profile: str = DEFAULT_PROFILE
    """Prompt profile (stage_a/data/profiles) rendered into the system and user turns."""
    sharding_mode: str = "per_group"
    """per_group: a model batch never mixes groups; per_image: batches span groups, packed by length."""
    batch_size: int = DEFAULT_BATCH_SIZE
    """Images per model batch on one device (not the farm's flush size, STAGE_A_FLUSH_SIZE)."""
    max_pixels: int = 0
    """Pixel budget per image after resize; 0 = the dataset default (bbu 1048576, rru 2097152)."""
    generation: GenerationParams = field(default_factory=GenerationParams)
    """Decoding settings (greedy by default)."""
    pass_group_number: int | None = None
    """Keep at most this many pass groups (None: all)."""
    fail_group_number: int | None = None
    """Keep at most this many fail groups (None: all)."""
    sample_seed: int = 42
    """Seed of the per-label group sampling."""
    verify_inputs: bool = False
    """Log hashes, sizes, image_grid_thw and token counts of the first batch (each worker process)."""
    reuse: str = "auto"
    """Take summaries already made for the same bytes, model, prompt and options (stage_a.reuse): auto
    under greedy decoding only, on also when sampling, off never."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise UserError(f"batch_size must be > 0, got {self.batch_size}")
        if self.max_pixels < 0:
            raise UserError(f"max_pixels must be > 0, got {self.max_pixels}")
        if self.sharding_mode not in SHARDING_MODES:
            raise UserError(f"sharding_mode must be one of {', '.join(SHARDING_MODES)}, got {self.sharding_mode!r}")
        if self.max_pixels == 0:
            object.__setattr__(self, "max_pixels", DEFAULT_MAX_PIXELS.get(self.dataset, DEFAULT_MAX_PIXELS["bbu"]))
        if self.reuse not in ("auto", "on", "off"):
            raise UserError(f"reuse must be one of auto, on, off, got {self.reuse!r}")
        for name in ("pass_group_number", "fail_group_number"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UserError(f"{name} must be >= 0, got {value}")

    def params_dict(self) -> dict[str, Any]:
        """What the store keeps as the run's generation parameters."""
        return {"batch_size": self.batch_size, "max_pixels": self.max_pixels, "verify_inputs": self.verify_inputs,
                "reuse": self.reuse, **self.generation.to_dict()}

    def sampling_dict(self) -> dict[str, Any]:
        return {
            "pass_group_number": self.pass_group_number,
            "fail_group_number": self.fail_group_number,
            "sample_seed": self.sample_seed,
        }
