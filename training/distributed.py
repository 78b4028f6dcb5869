"""The accelerate set-up shared by every stage: one function that returns a ready Accelerator.

The backend (single CPU/GPU, DDP, DeepSpeed ZeRO-1/2/3, FSDP, multi-node) comes from the accelerate
config file given to `accelerate launch --config_file configs/accelerate/<x>.yaml`; this module only
adds what the run config decides (precision, gradient accumulation, clipping, micro-batch size), so the
two never disagree.
"""

from __future__ import annotations

import logging
import os

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import InitProcessGroupKwargs

from training.config import OptimConfig, TrainConfig

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def build_accelerator(train: TrainConfig) -> Accelerator:
    """An Accelerator for the launcher's backend with the run's precision and accumulation."""
    if train.precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {sorted(PRECISIONS)}, got {train.precision!r}")
    handlers = []
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if cpu_processes:
        # Several processes without a GPU (torchrun, or accelerate launch's torchrun launcher).
        # accelerate's default lets DeepSpeed build a process group in which every process believes
        # it is rank 0 of 1 (so all read the same data); gloo gives real ranks.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
        if use_deepspeed:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not torch.cuda.is_available():
        _warn_if_cpu_threads_idle()
    return Accelerator(
        # cpu=True makes accelerate treat the processes as CPU data parallel (DDP over gloo).
        cpu=cpu_processes and not use_deepspeed,
        mixed_precision=PRECISIONS[train.precision],
        gradient_accumulation_steps=train.grad_accum_steps,
        # One scheduler step per optimizer step, whatever the number of processes (accelerate's
        # default steps it num_processes times, which would make the schedule depend on world size).
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )


def _warn_if_cpu_threads_idle() -> None:
    """Say when CPU training leaves cores idle: `accelerate launch` sets OMP_NUM_THREADS=1 for a torchrun
    launch unless it is given --num_cpu_threads_per_process, which halves a 2-core machine's speed."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    fair_share = max(1, cores // local_processes)
    if torch.get_num_threads() < fair_share and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        log.warning(
            "torch uses %d thread(s) per process on %d cores for %d process(es) (OMP_NUM_THREADS=%s); "
            "for full speed pass --num_cpu_threads_per_process %d to accelerate launch",
            torch.get_num_threads(),
            cores,
            local_processes,
            os.environ.get("OMP_NUM_THREADS", "unset"),
            fair_share,
        )


def configure_deepspeed(
    accelerator: Accelerator, train: TrainConfig, optim: OptimConfig, micro_batch_size: int
) -> None:
    """Write the run's batch, accumulation and clipping into the DeepSpeed config before `prepare`.

    We hand accelerate no DataLoader (the data stream splits work by rank itself), so DeepSpeed's
    'auto' micro-batch size has nothing to be filled from; the run config is the one source.
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds["gradient_accumulation_steps"] = train.grad_accum_steps
    ds["train_batch_size"] = micro_batch_size * train.grad_accum_steps * accelerator.num_processes
    ds["gradient_clipping"] = optim.grad_clip
    # Our AdamW is a plain torch optimizer; DeepSpeed runs it under ZeRO once told it may.
    ds["zero_allow_untested_optimizer"] = True
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # The final Hugging Face export needs the full weights gathered on the main process.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
