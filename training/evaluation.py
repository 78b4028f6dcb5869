"""Periodic validation (loss and perplexity on held-out batches) and sample generations."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
CountFn = Callable[[dict[str, torch.Tensor]], torch.Tensor | int]


class Validator:
    """Mean loss and perplexity over the same `num_batches` held-out batches at every evaluation.

    The batches are taken once from the validation stream and kept, so successive validation losses
    are comparable. Each rank evaluates its own batches; the result is the token-weighted mean over all.
    """

    def __init__(
        self, val_data: Iterable[dict[str, torch.Tensor]] | None, *, every: int, num_batches: int
    ) -> None:
        self.every = every
        # Decided by the config alone, never by this rank's batches: validation is collective, and a rank
        # whose share of the held-out data is empty must still join the others' reduction.
        self.enabled = val_data is not None and every > 0
        self.batches = list(itertools.islice(val_data, num_batches)) if self.enabled else []

    def should_run(self, step: int, *, final: bool = False) -> bool:
        """Due every `every` steps and at the end (when there is validation data)."""
        return self.enabled and (final or step % self.every == 0)

    @torch.no_grad()
    def run(
        self, model: nn.Module, loss_fn: LossFn, count_fn: CountFn, accelerator: Accelerator
    ) -> dict[str, float]:
        """{'val_loss', 'val_ppl'} over all ranks' held-out batches ({} when some rank has none).

        Each rank evaluates as many batches as the rank with the fewest has.
        """
        batches = self.batches
        if accelerator.num_processes > 1:
            # Every rank must run the same number of forward passes (DDP, ZeRO-3 and FSDP forwards are
            # collective, and a rank left waiting hangs the run), and held-out shares can differ by rank.
            n = torch.tensor([len(batches)], device=accelerator.device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
            batches = batches[: int(n.item())]
        was_training = model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        for batch in batches:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                loss = loss_fn(model, batch)
            count = torch.as_tensor(count_fn(batch), dtype=torch.float64, device=total.device)
            total += torch.stack([loss.double() * count, count])
        if accelerator.num_processes > 1:
            total = accelerator.reduce(total, reduction="sum")
        model.train(was_training)
        if total[1] == 0:  # a rank without held-out data: nothing comparable to report
            return {}
        val_loss = (total[0] / total[1]).item()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


class Sampler:
    """Greedy continuations of fixed prompts every `every` steps, so a run's progress can be read."""

    def __init__(self, tokenizer: Any, prompts: list[str], *, every: int, max_new_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.every = every if tokenizer is not None and prompts else 0
        self.max_new_tokens = max_new_tokens

    def should_run(self, step: int, *, final: bool = False) -> bool:
        """Due every `every` steps and at the end (when sampling is on)."""
        return self.every > 0 and (final or step % self.every == 0)

    @torch.no_grad()
    def run(self, model: nn.Module, accelerator: Accelerator) -> dict[str, str]:
        """{prompt: continuation}. All ranks call it (ZeRO-3 gathers weights collectively)."""
        from models.generate import generate

        was_training = model.training
        model.eval()
        module = accelerator.unwrap_model(model)
        out: dict[str, str] = {}
        # Sampling must not consume the training RNG streams, or a resumed run would diverge.
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), accelerator.autocast():
            for prompt in self.prompts:
                ids = self.tokenizer.encode(prompt, bos=True)
                new_ids = generate(
                    module,
                    torch.tensor(ids, device=accelerator.device),
                    max_new_tokens=self.max_new_tokens,
                    temperature=0.0,
                    top_k=None,
                    top_p=None,
                    repetition_penalty=1.0,
                    stop_token_ids=[self.tokenizer.eos_id],
                    seed=0,
                )
                out[prompt] = self.tokenizer.decode(new_ids)
        model.train(was_training)
        return out
