"""Fault injection for tests: make one batch's generation raise, in-process or in a worker process.

The product has no switch for this; tests install it by patching the transformers engine in the
process that runs the step loop (`python -m support.faults run ...`, or the Celery app in
support/faulty_app.py). A batch whose images include a path containing MARKER raises.
"""

from __future__ import annotations

import sys
from typing import Any

MARKER = "EXPLODE"
MESSAGE = "injected generation fault"


def install() -> None:
    from engine.transformers_engine import TransformersEngine

    original = TransformersEngine.generate

    def generate(self: TransformersEngine, batch: Any) -> Any:
        if any(MARKER in it.rel_path for it in batch.items):
            raise RuntimeError(f"{MESSAGE} ({len(batch.items)} rows)")
        return original(self, batch)

    TransformersEngine.generate = generate  # type: ignore[method-assign]


SLOW_ENV = "STAGE_A_TEST_SLOW_BATCH_S"
"""Seconds every generation of a worker started with support.slow_app takes at least."""


def install_slow() -> None:
    """Every batch's generation sleeps STAGE_A_TEST_SLOW_BATCH_S seconds first: a slow worker (or a
    kill that lands mid-batch) without a slow model."""
    import os
    import time

    from engine.transformers_engine import TransformersEngine

    original = TransformersEngine.generate
    delay = float(os.environ.get(SLOW_ENV, "0"))

    def generate(self: TransformersEngine, batch: Any) -> Any:
        time.sleep(delay)
        return original(self, batch)

    TransformersEngine.generate = generate  # type: ignore[method-assign]


if __name__ == "__main__":  # python -m support.faults ARGS...: `stage-a ARGS` with the fault installed
    install()
    from cli.main import main

    main(sys.argv[1:])
