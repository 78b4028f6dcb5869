"""The accelerate set-up shared by every stage: one function that returns a ready Accelerator.

The backend (single CPU/GPU, DDP, DeepSpeed ZeRO-1/2/3, FSDP, multi-node) comes from the accelerate
config file given to `accelerate launch --config_file configs/accelerate/<x>.yaml`; this module only
adds what the run config decides (precision, gradient accumulation, clipping, micro-batch size), so the
two never disagree.
"""

from __future__ import annotations

import copy
import logging
import os

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import InitProcessGroupKwargs

from training.config import PRECISIONS, OptimConfig, TrainConfig

log = logging.getLogger(__name__)


def build_accelerator(train: TrainConfig) -> Accelerator:
    """An Accelerator for the launcher's backend with the run's precision and accumulation."""
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


def prepare_frozen(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Place a frozen extra model (e.g. preference tuning's reference) beside the policy, sharded like it.

    It never trains: eval mode, no gradients, no optimizer state, and it is left out of the checkpoints
    (it is rebuilt from its source at every start). Under DeepSpeed ZeRO-3 it is partitioned by its own
    inference engine with the run's DeepSpeed config (ZeRO-1/2 shard only optimizer state and gradients,
    which a frozen model does not have, so there it is a plain replica: stage 0). Under FSDP it is wrapped
    like the policy; otherwise it is moved to the device (DDP would refuse a model with nothing to train).
    """
    model.eval()
    model.requires_grad_(False)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        ds_config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        zero = ds_config.setdefault("zero_optimization", {})
        if zero.get("stage") != 3:
            zero["stage"] = 0
        for key in ("optimizer", "scheduler"):
            ds_config.pop(key, None)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
        return engine
    prepared = accelerator.prepare_model(
        model, evaluation_mode=accelerator.distributed_type != DistributedType.FSDP
    )
    # accelerate registers every prepared model for save_state; a frozen one is not part of the run's state.
    accelerator._models = [m for m in accelerator._models if m is not prepared]
    prepared.eval()
    return prepared


def sum_over_ranks(accelerator: Accelerator, counts: dict[str, int]) -> dict[str, int]:
    """Per-name counts of the whole world (each rank counts only what it did)."""
    names = sorted(counts)
    local = torch.tensor([counts[n] for n in names], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
    return {n: int(v) for n, v in zip(names, total.tolist())}
