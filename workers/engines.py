"""Choosing the engine a process serves: transformers (the default) or vLLM."""

from __future__ import annotations

from workers.engine import BatchEngine


def load_engine(name: str, checkpoint: str, device: str = "auto") -> BatchEngine:
    """Load ``checkpoint`` once into the named engine; vLLM is imported only when asked for."""
    if name == "vllm":
        from workers.vllm_engine import load_vllm_engine

        return load_vllm_engine(checkpoint, device)
    if name != "transformers":
        raise ValueError(f"unknown engine {name!r}; use transformers or vllm")
    from workers.loader import load_model

    return BatchEngine(load_model(checkpoint, device))
