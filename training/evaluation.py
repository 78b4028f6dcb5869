"""Periodic validation (the objective's loss and metrics on held-out batches) and sample generations."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn

from models.generate import generate
from training.objectives import Objective


class Validator:
    """The objective's means over the same `num_batches` held-out batches at every evaluation.

    The batches are taken once from the validation stream and kept, so successive validation losses
    are comparable. Each rank evaluates its own batches; the result is the count-weighted mean over all.
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
        self,
        model: nn.Module,
        objective: Objective,
        frozen: Mapping[str, nn.Module],
        accelerator: Accelerator,
    ) -> dict[str, float]:
        """{'val_loss', 'val_<metric>'..., 'val_<derived>'...} over all ranks' held-out batches ({} when
        every rank's batches are empty). Each rank evaluates as many batches as the rank with the fewest."""
        batches = self.batches
        if accelerator.num_processes > 1:
            # Every rank must run the same number of forward passes (DDP, ZeRO-3 and FSDP forwards are
            # collective, and a rank left waiting hangs the run), and held-out shares can differ by rank.
            n = torch.tensor([len(batches)], device=accelerator.device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
            batches = batches[: int(n.item())]
        was_training = model.training
        model.eval()
        names: list[str] = []
        totals: list[torch.Tensor] = []
        count_total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for batch in batches:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                out = objective(model, batch, frozen)
            count = torch.as_tensor(objective.count(batch), dtype=torch.float64, device=count_total.device)
            values = {"loss": out.loss, **out.metrics}
            if not names:
                names, totals = list(values), [torch.zeros_like(count_total) for _ in values]
            for i, name in enumerate(names):
                totals[i] += values[name].double() * count
            count_total += count
        model.train(was_training)
        stacked = torch.stack([*totals, count_total]) if names else count_total.reshape(1)
        if accelerator.num_processes > 1:
            stacked = accelerator.reduce(stacked, reduction="sum")
        if stacked[-1] == 0:  # no held-out items anywhere: nothing comparable to report
            return {}
        means = dict(zip(names, (stacked[:-1] / stacked[-1]).tolist()))
        return {f"val_{name}": value for name, value in {**means, **objective.report(means)}.items()}


class Sampler:
    """Greedy continuations of fixed prompts every `every` steps, so a run's progress can be read.

    `encode` turns a prompt into the ids the model continues (raw text for a pretrained model, a chat
    turn for a chat model); generation stops at `stop_token_ids` or after `max_new_tokens`.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        *,
        encode: Callable[[str], list[int]],
        decode: Callable[[list[int]], str],
        stop_token_ids: Sequence[int],
        every: int,
        max_new_tokens: int,
    ) -> None:
        self.prompts = list(prompts)
        self.encode, self.decode = encode, decode
        self.stop_token_ids = list(stop_token_ids)
        self.every = every if self.prompts else 0
        self.max_new_tokens = max_new_tokens

    def should_run(self, step: int, *, final: bool = False) -> bool:
        """Due every `every` steps and at the end (when sampling is on)."""
        return self.every > 0 and (final or step % self.every == 0)

    @torch.no_grad()
    def run(self, model: nn.Module, accelerator: Accelerator) -> dict[str, str]:
        """{prompt: continuation}. All ranks call it (ZeRO-3 gathers weights collectively)."""
        was_training = model.training
        model.eval()
        module = accelerator.unwrap_model(model)
        out: dict[str, str] = {}
        # Sampling must not consume the training RNG streams, or a resumed run would diverge.
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), accelerator.autocast():
            for prompt in self.prompts:
                new_ids = generate(
                    module,
                    torch.tensor(self.encode(prompt), device=accelerator.device),
                    max_new_tokens=self.max_new_tokens,
                    temperature=0.0,
                    top_k=None,
                    top_p=None,
                    repetition_penalty=1.0,
                    stop_token_ids=self.stop_token_ids,
                    seed=0,
                )
                out[prompt] = self.decode(new_ids)
        model.train(was_training)
        return out
