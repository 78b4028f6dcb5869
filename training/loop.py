"""The training loop shared by pretraining, SFT and DPO: stages differ only in data and loss.

    train(model, train_data, config=run_config, val_data=..., loss_fn=..., tokenizer=...)

`train_data` is any iterable of batch dicts ({"input_ids", "labels", "position_ids"?} for causal LM
stages) already split by rank; if it has state_dict()/load_state_dict() its position is checkpointed,
which makes a resumed run continue bit for bit. `loss_fn(model, batch)` returns the mean loss of a batch
and `count_fn(batch)` the number of items that mean is over (target tokens for a language model, pairs
for DPO); the loop weights micro-batches and ranks by that count, so the update is the gradient of the
exact mean over the global batch however it is split into processes and accumulation steps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator, DistributedType
from torch import nn

from common.memory import peak_memory_gib
from models.kernels import compile_model
from training.checkpoint import Checkpointer
from training.config import LoggingConfig, OptimConfig, TrainConfig, config_to_dict, save_config
from training.distributed import configure_deepspeed
from training.evaluation import CountFn, LossFn, Sampler, Validator
from training.metrics import MetricsLogger, peak_flops_per_device
from training.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


class RunConfig(Protocol):
    """What the loop reads from a stage's config (which adds its own model and data sections)."""

    optim: OptimConfig
    train: TrainConfig
    logging: LoggingConfig


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's mean next-token cross-entropy (labels shifted inside the model, -100 ignored)."""
    return model(**batch).loss


def count_target_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """How many tokens `causal_lm_loss` averages over: labels after the shift that are not -100."""
    return (batch["labels"][:, 1:] != -100).sum()


@dataclasses.dataclass
class TrainResult:
    """What a finished run leaves behind."""

    step: int
    final_checkpoint: Path | None
    hf_dir: Path | None
    nonfinite_steps: int
    losses: list[float]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    model: nn.Module,
    train_data: Iterable[dict[str, torch.Tensor]],
    *,
    config: RunConfig,
    accelerator: Accelerator,
    val_data: Iterable[dict[str, torch.Tensor]] | None = None,
    loss_fn: LossFn = causal_lm_loss,
    count_fn: CountFn = count_target_tokens,
    tokenizer: Any = None,
    export: Callable[[dict[str, torch.Tensor], Path], None] | None = None,
) -> TrainResult:
    """Train `model` for config.train.max_steps optimizer steps; checkpoint, validate, log, export.

    `export(state_dict, out_dir)` writes the final model in Hugging Face format (main process only).
    """
    tc, oc = config.train, config.optim
    out_dir = Path(tc.output_dir)
    acc = accelerator
    seed_everything(tc.seed + acc.process_index)

    train_iter: Iterator[dict[str, torch.Tensor]] = iter(train_data)
    first_batch = next(train_iter)  # DeepSpeed needs the micro-batch size before prepare()
    configure_deepspeed(acc, tc, oc, micro_batch_size=first_batch["input_ids"].shape[0])

    if tc.compile:
        compile_model(model)  # per decoder block, in place: parameter names (and checkpoints) stay unprefixed
    optimizer = build_optimizer(model, oc, device=acc.device)
    scheduler = build_scheduler(optimizer, oc, tc.max_steps)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)

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
    if resumed is not None:
        # The stream restored its position as of the checkpoint; the batch taken above is discarded.
        train_iter = iter(train_data)
        first_batch = None
    if acc.is_main_process:
        save_config(config, out_dir / "config.yaml")

    validator = Validator(val_data, every=tc.eval_every, num_batches=tc.eval_batches)
    sampler = Sampler(
        tokenizer,
        config.logging.sample_prompts,
        every=config.logging.sample_every,
        max_new_tokens=config.logging.sample_max_new_tokens,
    )
    metrics = MetricsLogger(
        config.logging,
        out_dir,
        is_main=acc.is_main_process,
        total_steps=tc.max_steps,
        start_step=state["step"],
        run_config=config_to_dict(config),
    )
    peak = peak_flops_per_device(acc.device, tc.peak_flops)
    flops_per_token = getattr(acc.unwrap_model(model), "flops_per_token", None)

    def next_batch() -> dict[str, torch.Tensor]:
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
    window_start, window_tokens = time.perf_counter(), 0
    while state["step"] < tc.max_steps:
        step = state["step"] + 1
        micro_batches = [next_batch() for _ in range(tc.grad_accum_steps)]
        loss, grad_norm = train_step(
            model, optimizer, micro_batches, loss_fn, count_fn, acc, oc, nan=step in tc.debug_nan_steps
        )
        scheduler.step()
        tokens = sum(b["input_ids"].numel() for b in micro_batches) * acc.num_processes
        state["step"] = step
        state["tokens_seen"] += tokens
        window_tokens += tokens
        metrics.advance()

        if math.isfinite(loss):
            state["nonfinite_in_a_row"] = 0
            losses.append(loss)
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
        if step % config.logging.log_every == 0 or final or not math.isfinite(loss):
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            tokens_per_s = window_tokens / elapsed
            seq_len = micro_batches[0]["input_ids"].shape[1]
            mfu = (
                tokens_per_s / acc.num_processes * flops_per_token(seq_len) / peak
                if peak and flops_per_token is not None
                else None
            )
            record = {
                "loss": loss if math.isfinite(loss) else None,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s,
                "mfu": mfu,
                "memory_gib": peak_memory_gib(acc.device),
                "tokens_seen": state["tokens_seen"],
                "nonfinite_steps": state["nonfinite_steps"],
            }
            if hasattr(train_data, "tokens_per_source"):  # Open-Llama's training data category distribution
                record["tokens_per_source"] = _sum_over_ranks(acc, train_data.tokens_per_source)
            window_start, window_tokens = time.perf_counter(), 0
        if validator.should_run(step, final=final):
            record.update(validator.run(model, loss_fn, count_fn, acc))
        if sampler.should_run(step, final=final):
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


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    loss_fn: LossFn,
    count_fn: CountFn,
    acc: Accelerator,
    oc: OptimConfig,
    *,
    nan: bool = False,
) -> tuple[float, float | None]:
    """One optimizer step over the micro-batches; returns (global mean loss, grad norm).

    A non-finite loss on any rank skips the whole step on every rank (checked before each backward,
    so DeepSpeed, which steps inside backward, never applies it): grads are zeroed, weights untouched.
    So does a non-finite gradient norm behind a finite loss (returned as a NaN loss).
    """
    counts = torch.stack([torch.as_tensor(count_fn(b)) for b in micro_batches]).to(acc.device, torch.float64)
    global_count = acc.reduce(counts.sum(), reduction="sum") if acc.num_processes > 1 else counts.sum()
    # accelerate/DeepSpeed divide by the accumulation steps and DDP/ZeRO average over ranks; this
    # scale undoes both, so the update is the gradient of the token mean over the global batch.
    scale = len(micro_batches) * acc.num_processes / global_count.clamp(min=1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
    acc.step = 0  # accumulate() below closes the window on exactly the last micro-batch
    for batch, count in zip(micro_batches, counts):
        with acc.accumulate(model), acc.autocast():
            loss = loss_fn(model, batch)
            if nan:
                loss = loss * float("nan")
            if not _finite_everywhere(loss, acc):
                _discard_gradients(model, optimizer, acc)
                return float("nan"), None
            acc.backward(loss * (count * scale).to(loss.dtype))
            loss_sum += loss.detach().double() * count
    grad_norm = _clip(model, acc, oc.grad_clip)
    overflow = grad_norm is not None and not math.isfinite(grad_norm)
    if overflow and acc.scaler is None and acc.distributed_type != DistributedType.DEEPSPEED:
        # A finite loss can still overflow in the backward pass; applying those gradients would put
        # NaN in every weight. (fp16's GradScaler skips such steps itself while it lowers its scale;
        # DeepSpeed has already stepped inside backward.) The norm is global, so all ranks agree.
        _discard_gradients(model, optimizer, acc)
        return float("nan"), grad_norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    total = acc.reduce(loss_sum, reduction="sum") if acc.num_processes > 1 else loss_sum
    return (total / global_count.clamp(min=1)).item(), grad_norm


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


def _sum_over_ranks(acc: Accelerator, counts: dict[str, int]) -> dict[str, int]:
    """Per-source token counts of the whole world (each rank counts only the rows it read)."""
    names = sorted(counts)
    local = torch.tensor([counts[n] for n in names], dtype=torch.float64, device=acc.device)
    total = acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local
    return {n: int(v) for n, v in zip(names, total.tolist())}


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
    return bar
