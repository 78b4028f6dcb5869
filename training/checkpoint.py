"""Resumable checkpoints: `step-N/` folders written atomically, a `latest` pointer, keep-last-K.

A checkpoint holds everything needed to continue bit for bit: the model, optimizer and scheduler
(through `accelerator.save_state`, which also writes ZeRO/FSDP shards and every rank's python, numpy
and torch RNG states), each rank's data-stream position (`loop_state_rank{R}.pt`), the loop's counters
(`trainer_state.json`) and the resolved run config (`config.yaml`, from which later stages rebuild the
model).

Writing order, so that a kill at any moment leaves the previous checkpoint intact and in use:
all ranks write into `step-N.tmp/` (save_state is collective), a barrier, then the main process writes
`trainer_state.json`, renames the folder to `step-N/`, and only then replaces the `latest` pointer
file (itself temp + rename). Leftover `*.tmp` folders are removed at start-up. Weights are checked to be
finite before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from common.config import save_config
from common.files import write_atomic
from common.run_folder import LATEST, checkpoint_folder
from training import faults
from training.config import TrainConfig

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")


class _TiedWeightsNotice(logging.Filter):
    """Drop accelerate's warning that a tied head was saved once: expected for shared embeddings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNotice())


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed from; the message says why and what to do."""


class Checkpointer:
    """Decides when to save (`maybe_save`) and restores the newest checkpoint (`resume`).

    `stateful` maps names to per-rank objects with state_dict()/load_state_dict() that accelerate does
    not know about (the training data stream).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: str | Path,
        *,
        every: int,
        keep_last: int,
        run_config: Any,
        stateful: dict[str, Any] | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.dir = Path(output_dir)
        self.every = every
        self.keep_last = keep_last
        self.run_config = run_config
        self.stateful = dict(stateful or {})
        self.last_saved_step: int | None = None
        if accelerator.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            for leftover in self.dir.glob("step-*.tmp"):
                log.warning("removing %s: an unfinished checkpoint from an interrupted run", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        accelerator.wait_for_everyone()

    # -- saving -------------------------------------------------------------------------------------

    def maybe_save(
        self, step: int, trainer_state: dict[str, Any], model: torch.nn.Module, *, final: bool = False
    ):
        """Save at every `every` steps and when `final`; returns the folder written or None."""
        due = final or (self.every > 0 and step % self.every == 0)
        if not due or self.last_saved_step == step:
            return None
        return self.save(step, trainer_state, model)

    def save(self, step: int, trainer_state: dict[str, Any], model: torch.nn.Module) -> Path:
        """Write `step-N/` (collective: every rank must call it) and point `latest` at it."""
        acc = self.accelerator
        if not all_ranks_true(acc, weights_are_finite(model)):
            raise CheckpointError(
                f"step {step}: the model has non-finite weights; refusing to write a checkpoint "
                f"(the last good one is {self.latest() or 'none'})"
            )
        final_dir = self.dir / f"step-{step}"
        tmp_dir = self.dir / f"step-{step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp_dir))
        torch.save(
            {name: obj.state_dict() for name, obj in self.stateful.items()},
            tmp_dir / f"loop_state_rank{acc.process_index}.pt",
        )
        acc.wait_for_everyone()
        if acc.is_main_process:
            faults.kill_if_checkpoint_step(step)  # tests: prove the previous checkpoint survives
            save_config(self.run_config, tmp_dir / "config.yaml")
            state = {**trainer_state, "step": step, "world_size": acc.num_processes}
            (tmp_dir / "trainer_state.json").write_text(json.dumps(state, indent=1))
            if final_dir.exists():  # re-saving a step after a resume from an earlier one
                shutil.rmtree(final_dir)
            os.replace(tmp_dir, final_dir)
            write_atomic(self.dir / LATEST, final_dir.name + "\n")
            self._prune()
            log.info("saved checkpoint %s", final_dir)
        acc.wait_for_everyone()
        self.last_saved_step = step
        return final_dir

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.step_dirs()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # -- resuming -----------------------------------------------------------------------------------

    def step_dirs(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        found = [
            (int(m.group(1)), p)
            for p in self.dir.glob("step-*")
            if (m := STEP_DIR.match(p.name)) and (p / "trainer_state.json").is_file()
        ]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The checkpoint the `latest` pointer names, or the newest complete one if the pointer is stale."""
        named = checkpoint_folder(self.dir)
        if named != self.dir:
            return named
        dirs = self.step_dirs()
        return dirs[-1] if dirs else None

    def resume(self, spec: str) -> dict[str, Any] | None:
        """Restore from `spec` ('auto', a step-N path, or '' for a fresh start); returns the trainer state."""
        if not spec:
            if self.latest() is not None:
                raise CheckpointError(
                    f"{self.dir} already holds checkpoints ({self.latest()}); pass --resume auto to continue "
                    "that run, or choose another --train.output_dir"
                )
            return None
        path = self.latest() if spec == "auto" else Path(spec)
        if path is None:
            log.info("no checkpoint in %s: starting from scratch", self.dir)
            return None
        state_file = path / "trainer_state.json"
        if not state_file.is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no trainer_state.json)")
        state = json.loads(state_file.read_text())
        acc = self.accelerator
        if state.get("world_size", 1) != acc.num_processes:
            raise CheckpointError(
                f"{path} was written by {state['world_size']} processes but this run has {acc.num_processes}: "
                "each rank's data position is saved separately, so resume with the same number of processes"
            )
        acc.load_state(str(path))
        loop_state = torch.load(path / f"loop_state_rank{acc.process_index}.pt", weights_only=False)
        for name, obj in self.stateful.items():
            if name not in loop_state:
                raise CheckpointError(f"{path}: no saved state for '{name}'")
            obj.load_state_dict(loop_state[name])
        self.last_saved_step = state["step"]
        log.info("resumed from %s (step %d)", path, state["step"])
        return state


def will_resume(config: TrainConfig) -> bool:
    """Whether a run of `config` will continue a checkpoint (`resume` set, and with `auto` a run folder
    that has one) rather than start from its initial model."""
    return bool(config.resume) and (config.resume != "auto" or (Path(config.output_dir) / LATEST).is_file())


def weights_are_finite(model: torch.nn.Module) -> bool:
    """True when this rank's parameters (its ZeRO-3 shard, if partitioned) hold no NaN or inf."""
    for param in model.parameters():
        local = getattr(param, "ds_tensor", param)  # DeepSpeed ZeRO-3 keeps the real data in ds_tensor
        if hasattr(local, "to_local"):  # an FSDP2 DTensor: check this rank's shard, no communication
            local = local.to_local()
        if local.numel() and not torch.isfinite(local.detach()).all():
            return False
    return True


def all_ranks_true(accelerator: Accelerator, flag: bool) -> bool:
    """Logical AND of `flag` over all processes (every rank must call it)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").item() == 0
