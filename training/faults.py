"""Fault injection for tests: environment variables that make a run fail on purpose at a chosen step, so a
test can prove what happens then (a skipped step, a surviving checkpoint). They are deliberately not config
keys, so users never meet them in `--help`; nothing sets them outside the tests."""

from __future__ import annotations

import os
import signal

NAN_LOSS_STEPS_ENV = "OPEN_LLAMA_NAN_LOSS_STEPS"
"""Comma-separated optimizer steps (1-based) whose loss is replaced with NaN."""
KILL_DURING_CHECKPOINT_ENV = "OPEN_LLAMA_KILL_DURING_CHECKPOINT"
"""The step whose checkpoint write is cut by SIGKILL (after the weights, before the folder's rename)."""


def nan_loss_steps() -> set[int]:
    """The steps named by OPEN_LLAMA_NAN_LOSS_STEPS."""
    value = os.environ.get(NAN_LOSS_STEPS_ENV, "")
    return {int(step) for step in value.split(",") if step.strip()}


def kill_if_checkpoint_step(step: int) -> None:
    """SIGKILL this process when OPEN_LLAMA_KILL_DURING_CHECKPOINT names `step`."""
    if os.environ.get(KILL_DURING_CHECKPOINT_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
