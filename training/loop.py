"""The training loop shared by every stage: stages differ only in their data and their objective.

    train(model, train_data, objective, config=run_config, accelerator=acc, val_data=..., frozen=...)

`train_data` is a TrainingData stream already split by rank: batches (dicts of tensors), its position as
state (checkpointed, so a resumed run continues bit for bit) and its own counters (e.g. tokens per
source, summed over ranks and logged). The `objective` (training/objectives.py) turns a batch into a loss
and says what that loss is a mean over; the loop weights micro-batches and ranks by that count, so the
update is the gradient of the exact mean over the global batch however it is split into processes and
accumulation steps. `frozen` models (a preference-tuning reference) are prepared by accelerate beside the
policy (sharded like it under ZeRO-3/FSDP), never trained, and handed to the objective.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator, DistributedType
from torch import nn

from common.config import config_to_dict, save_config
from models.kernels import compile_model
from training import faults
from training.checkpoint import Checkpointer
from training.config import LoggingConfig, OptimConfig, TrainConfig
from training.distributed import configure_deepspeed, prepare_frozen, sum_over_ranks
from training.evaluation import DownstreamEvaluator, Sampler, Validator
from training.metrics import MetricsLogger, peak_flops_per_device, peak_memory_gib
from training.objectives import Objective
from training.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


class RunConfig(Protocol):
    """What the loop reads from a stage's config (which adds its own model and data sections)."""

    optim: OptimConfig
    train: TrainConfig
    logging: LoggingConfig


class TrainingData(Protocol):
    """A rank's endless training stream, as the loop uses it."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]:
        """The stream's position, saved in every checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken."""
        ...

    def counters(self) -> dict[str, dict[str, int]]:
        """This rank's running counts to log, e.g. {"tokens_per_source": {"pile": 123}} ({} for none)."""
        ...


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


@dataclasses.dataclass
class TrainResult:
    """What a finished run leaves behind."""

    step: int
    final_checkpoint: Path | None
    hf_dir: Path | None
    nonfinite_steps: int
    losses: list[float]


@dataclasses.dataclass
class StepResult:
    """One optimizer step: the global means of loss and metrics (NaN loss: skipped) and the grad norm."""

    means: dict[str, float]
    grad_norm: float | None

    @property
    def loss(self) -> float:
        return self.means["loss"]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    model: nn.Module,
    train_data: TrainingData,
    objective: Objective,
    *,
    config: RunConfig,
    accelerator: Accelerator,
    val_data: Iterable[Batch] | None = None,
    frozen: Mapping[str, nn.Module] | None = None,
    sampler: Sampler | None = None,
    downstream: DownstreamEvaluator | None = None,
    export: Callable[[dict[str, torch.Tensor], Path], None] | None = None,
) -> TrainResult:
    """Train `model` for config.train.max_steps optimizer steps; checkpoint, validate, evaluate downstream,
    sample, log, export.

    `export(state_dict, out_dir)` writes the final model in Hugging Face format (main process only).
    """
    tc, oc = config.train, config.optim
    out_dir = Path(tc.output_dir)
    acc = accelerator
    seed_everything(tc.seed + acc.process_index)

    train_iter: Iterator[Batch] = iter(train_data)
    first_batch: Batch | None = next(train_iter)
    # DeepSpeed needs the micro-batch size before prepare().
    configure_deepspeed(acc, tc, oc, micro_batch_size=objective.shape(first_batch)[0])

    if tc.compile:
        compile_model(model)  # per decoder block, in place: parameter names (and checkpoints) stay unprefixed
    optimizer = build_optimizer(model, oc, device=acc.device)
    scheduler = build_scheduler(optimizer, oc, tc.max_steps)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    frozen = {name: prepare_frozen(acc, m) for name, m in (frozen or {}).items()}

    checkpointer = Checkpointer(
        acc,
        out_dir,
        every=tc.checkpoint_every,
        keep_last=tc.keep_last,
        run_config=config,
        stateful={"train_data": train_data},
    )
    resumed = checkpointer.resume(tc.resume)
    state = resumed or {"step": 0, "tokens_seen": 0, "nonfinite_steps": 0, "nonfinite_in_a_row": 0}
    # Training time over every process that worked on the run (a resumed one adds to its checkpoint's).
    clock = _Clock(state.get("elapsed_s", 0.0))
    if resumed is not None:
        # The stream restored its position as of the checkpoint; the batch taken above is discarded.
        train_iter = iter(train_data)
        first_batch = None
    if acc.is_main_process:
        save_config(config, out_dir / "config.yaml")

    validator = Validator(val_data, every=tc.eval_every, num_batches=tc.eval_batches)
    metrics = MetricsLogger(
        config.logging,
        out_dir,
        is_main=acc.is_main_process,
        total_steps=tc.max_steps,
        start_step=state["step"],
        run_config=config_to_dict(config),
    )
    throughput = Throughput(acc, tc.peak_flops, getattr(acc.unwrap_model(model), "flops_per_token", None))
    nan_steps = faults.nan_loss_steps()

    def next_batch() -> Batch:
        nonlocal first_batch
        if first_batch is not None:
            batch, first_batch = first_batch, None
        else:
            try:
                batch = next(train_iter)
            except StopIteration:
                raise RuntimeError(f"the training data ran out at step {state['step']}") from None
        return {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}

    losses: list[float] = []
    model.train()
    while state["step"] < tc.max_steps:
        step = state["step"] + 1
        micro_batches = [next_batch() for _ in range(tc.grad_accum_steps)]
        result = train_step(
            model, optimizer, micro_batches, objective, frozen, acc, oc, nan=step in nan_steps
        )
        scheduler.step()
        shapes = [objective.shape(b) for b in micro_batches]
        tokens = sum(rows * length for rows, length in shapes) * acc.num_processes
        state["step"] = step
        state["tokens_seen"] += tokens
        state["elapsed_s"] = clock.elapsed()
        throughput.add(tokens, seq_len=shapes[0][1])
        metrics.advance()

        if math.isfinite(result.loss):
            state["nonfinite_in_a_row"] = 0
            losses.append(result.loss)
        else:
            state["nonfinite_steps"] += 1
            state["nonfinite_in_a_row"] += 1
            metrics.message(f"step {step}: non-finite loss or gradient; step skipped (no update)")
            if state["nonfinite_in_a_row"] >= tc.max_nonfinite_steps:
                metrics.close()
                raise NonFiniteLossError(
                    f"stopping: {state['nonfinite_in_a_row']} consecutive steps with a non-finite loss or gradient "
                    f"(steps {step - state['nonfinite_in_a_row'] + 1}-{step}); the last good checkpoint is "
                    f"{checkpointer.latest() or 'none'}. Lower optim.lr, check the data, or use bf16 instead of fp16."
                )

        record: dict[str, Any] = {}
        final = step == tc.max_steps
        if step % config.logging.log_every == 0 or final or not math.isfinite(result.loss):
            record = step_record(result, objective, scheduler.get_last_lr()[0], state)
            record.update(throughput.take())
            record["memory_gib"] = peak_memory_gib(acc.device)
            for name, counts in train_data.counters().items():
                record[name] = sum_over_ranks(acc, counts)
        if validator.should_run(step, final=final):
            record.update(validator.run(model, objective, frozen, acc))
        if downstream is not None and downstream.should_run(step, final=final):
            record.update(downstream.run(model, acc))
        if sampler is not None and sampler.should_run(step, final=final):
            samples = sampler.run(model, acc)
            record["samples"] = samples
            for prompt, text in samples.items():
                metrics.message(f"[step {step}] {prompt!r} -> {text!r}")
        if record:
            metrics.log({"step": step, **record}, bar=_bar_figures(record))
        checkpointer.maybe_save(step, state, model, final=final)

    metrics.close()
    final_dir = checkpointer.latest()
    hf_dir = None
    if tc.export_hf and export is not None:
        hf_dir = out_dir / "hf"
        full_state = acc.get_state_dict(model)  # collective under ZeRO-3 / FSDP
        if acc.is_main_process:
            export(full_state, hf_dir)
        acc.wait_for_everyone()
    return TrainResult(state["step"], final_dir, hf_dir, state["nonfinite_steps"], losses)


def finish_run(accelerator: Accelerator, result: TrainResult) -> None:
    """Every stage's last words: a summary line (main process), then accelerate's end of training."""
    if accelerator.is_main_process:
        print(
            f"done: {result.step} steps, last checkpoint {result.final_checkpoint}, "
            f"{result.nonfinite_steps} step(s) skipped for a non-finite loss",
            flush=True,
        )
    accelerator.end_training()


def step_record(result: StepResult, objective: Objective, lr: float, state: dict[str, Any]) -> dict[str, Any]:
    """The metrics line of a step: the objective's means (None when skipped) and what they derive to."""
    finite = math.isfinite(result.loss)
    record: dict[str, Any] = {name: value if finite else None for name, value in result.means.items()}
    if finite:
        record.update(objective.report(result.means))
    record.update(
        lr=lr,
        grad_norm=result.grad_norm,
        tokens_seen=state["tokens_seen"],
        nonfinite_steps=state["nonfinite_steps"],
        elapsed_s=state["elapsed_s"],
    )
    return record


class _Clock:
    """Seconds of training: those a checkpoint carried, plus this process's since it started training."""

    def __init__(self, carried: float) -> None:
        self.carried, self.start = carried, time.perf_counter()

    def elapsed(self) -> float:
        return self.carried + time.perf_counter() - self.start


class Throughput:
    """Tokens per second and model FLOPs utilisation over the steps since the last logged record."""

    def __init__(self, acc: Accelerator, peak_override: float | None, flops_per_token: Callable | None):
        self.acc = acc
        self.peak = peak_flops_per_device(acc.device, peak_override)
        self.flops_per_token = flops_per_token
        self.start, self.tokens, self.seq_len = time.perf_counter(), 0, 0

    def add(self, tokens: int, *, seq_len: int) -> None:
        self.tokens += tokens
        self.seq_len = seq_len

    def take(self) -> dict[str, float | None]:
        """{'tokens_per_s', 'mfu'} of the window, and start a new one."""
        tokens_per_s = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        mfu = None
        if self.peak and self.flops_per_token is not None:
            per_device = tokens_per_s / self.acc.num_processes
            mfu = per_device * self.flops_per_token(self.seq_len) / self.peak
        self.start, self.tokens = time.perf_counter(), 0
        return {"tokens_per_s": tokens_per_s, "mfu": mfu}


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[Batch],
    objective: Objective,
    frozen: Mapping[str, nn.Module],
    acc: Accelerator,
    oc: OptimConfig,
    *,
    nan: bool = False,
) -> StepResult:
    """One optimizer step over the micro-batches: the global means of loss and metrics, and the grad norm.

    A non-finite loss on any rank skips the whole step on every rank (checked before each backward,
    so DeepSpeed, which steps inside backward, never applies it): grads are zeroed, weights untouched.
    So does a non-finite gradient norm behind a finite loss (returned as a NaN loss).
    """
    counts = torch.stack([torch.as_tensor(objective.count(b)) for b in micro_batches])
    counts = counts.to(acc.device, torch.float64)
    global_count = acc.reduce(counts.sum(), reduction="sum") if acc.num_processes > 1 else counts.sum()
    # accelerate/DeepSpeed divide by the accumulation steps and DDP/ZeRO average over ranks; this
    # scale undoes both, so the update is the gradient of the exact mean over the global batch.
    scale = len(micro_batches) * acc.num_processes / global_count.clamp(min=1)
    sums: dict[str, torch.Tensor] = {}
    acc.step = 0  # accumulate() below closes the window on exactly the last micro-batch
    for batch, count in zip(micro_batches, counts):
        with acc.accumulate(model), acc.autocast():
            out = objective(model, batch, frozen)
            loss = out.loss * float("nan") if nan else out.loss
            if not _finite_everywhere(loss, acc):
                _discard_gradients(model, optimizer, acc)
                return StepResult({"loss": float("nan")}, None)
            acc.backward(loss * (count * scale).to(loss.dtype))
        for name, value in {"loss": loss, **out.metrics}.items():
            sums[name] = sums.get(name, 0) + value.detach().double() * count
    grad_norm = _clip(model, acc, oc.grad_clip)
    overflow = grad_norm is not None and not math.isfinite(grad_norm)
    if overflow and acc.scaler is None and acc.distributed_type != DistributedType.DEEPSPEED:
        # A finite loss can still overflow in the backward pass; applying those gradients would put
        # NaN in every weight. (fp16's GradScaler skips such steps itself while it lowers its scale;
        # DeepSpeed has already stepped inside backward.) The norm is global, so all ranks agree.
        _discard_gradients(model, optimizer, acc)
        return StepResult({"loss": float("nan")}, grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(global_means(acc, sums, global_count), grad_norm)


def global_means(acc: Accelerator, sums: dict[str, torch.Tensor], count: torch.Tensor) -> dict[str, float]:
    """Count-weighted sums of this rank -> means over every rank's items."""
    names = list(sums)
    stacked = torch.stack([sums[n] for n in names])
    if acc.num_processes > 1:
        stacked = acc.reduce(stacked, reduction="sum")
    return dict(zip(names, (stacked / count.clamp(min=1)).tolist()))


def _finite_everywhere(loss: torch.Tensor, acc: Accelerator) -> bool:
    flag = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
    if acc.num_processes > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _discard_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, acc: Accelerator) -> None:
    if acc.distributed_type == DistributedType.DEEPSPEED:
        # accelerate's wrapper makes zero_grad a no-op under DeepSpeed; reach the ZeRO optimizer itself
        # to drop what earlier micro-batches of this step accumulated.
        model.optimizer.zero_grad(set_to_none=True)
        model.zero_grad()
    else:
        optimizer.zero_grad(set_to_none=True)
    acc.step = 0


def _clip(model: nn.Module, acc: Accelerator, max_norm: float) -> float | None:
    if acc.distributed_type == DistributedType.DEEPSPEED:
        norm = acc.clip_grad_norm_(model.parameters(), max_norm)  # DeepSpeed clipped inside its step
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            norm = acc.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    if norm is None:
        return None
    return float(norm)


def _bar_figures(record: dict[str, Any]) -> dict[str, str]:
    bar = {}
    if record.get("loss") is not None:
        bar["loss"] = f"{record['loss']:.4f}"
    if "lr" in record:
        bar["lr"] = f"{record['lr']:.2e}"
    if "tokens_per_s" in record:
        bar["tok/s"] = f"{record['tokens_per_s']:,.0f}"
        bar["mfu"] = "n/a" if record.get("mfu") is None else f"{record['mfu']:.1%}"
        bar["mem"] = f"{record['memory_gib']:.1f}G"
    if "val_loss" in record:
        bar["val"] = f"{record['val_loss']:.3f}"
    if "eval/core" in record:
        bar["core"] = f"{record['eval/core']:.3f}"
    return bar
