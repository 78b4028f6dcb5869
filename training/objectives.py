"""What a stage trains for: the objective the shared loop is handed. The loop knows no stage and no batch
key; an objective knows both.

An objective gives, for one micro-batch:
- `count(batch)`: how many items its loss is a mean over (target tokens for a language model, pairs for
  preference tuning), known before the forward pass: the loop weights micro-batches and ranks by it, so
  an update is the gradient of the exact mean over the global batch however it is split;
- `__call__(model, batch, frozen)`: the mean loss, plus other means over the same items (its metrics);
  `frozen` holds the run's frozen extra models (e.g. a reference model), prepared beside the policy;
- `shape(batch)`: (sequences, tokens per sequence) the model runs on, for throughput and MFU;
- `report(means)`: figures derived from the global means (e.g. perplexity from the loss, bits per byte).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from common import IGNORE_INDEX

Batch = Mapping[str, torch.Tensor]


@dataclasses.dataclass
class ObjectiveOutput:
    """A micro-batch's mean loss and other means over the same items (logged beside the loss)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


class Objective(ABC):
    """The loss a stage minimises, and the bookkeeping the loop needs around it (module docstring)."""

    @abstractmethod
    def count(self, batch: Batch) -> torch.Tensor | int:
        """How many items the loss of `batch` is a mean over."""

    @abstractmethod
    def __call__(self, model: nn.Module, batch: Batch, frozen: Mapping[str, nn.Module]) -> ObjectiveOutput:
        """The mean loss (and metrics) of `batch`."""

    @abstractmethod
    def shape(self, batch: Batch) -> tuple[int, int]:
        """(sequences, tokens per sequence) the model processes for `batch`."""

    def report(self, means: Mapping[str, float]) -> dict[str, float]:
        """Figures derived from the means of loss and metrics over a whole step or validation."""
        return {}


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    """Bits per UTF-8 byte of text, from a mean loss in nats per target token and the mean UTF-8 bytes of
    those targets. Unlike the loss it does not depend on the tokenizer, so runs with different vocabularies
    compare. NaN when the targets hold no bytes (only control tokens)."""
    if bytes_per_token <= 0:
        return math.nan
    return loss_nats / (math.log(2) * bytes_per_token)


class CausalLMObjective(Objective):
    """Next-token cross-entropy, the mean over target tokens: labels that are not IGNORE_INDEX after the
    shift. Pretraining uses it as is; a stage that masks its prompts does so through the labels.

    With `token_accuracy`, also the fraction of target tokens that are the model's argmax (the metric
    `token_accuracy`), over the same tokens as the loss; the model computes it beside the loss without
    materialising the logits.

    With `token_bytes` (the UTF-8 length of each token id's text, `dataset.tokenizer.token_byte_lengths`),
    also the mean bytes per target token (the metric `bytes_per_token`) and the bits per byte it derives to
    (`bpb`). Both means are over the same target tokens, so `bpb` is exactly the total bits over the total
    bytes of the targets, however the tokens were split into micro-batches and ranks."""

    def __init__(
        self, *, token_accuracy: bool = False, token_bytes: torch.Tensor | Sequence[int] | None = None
    ) -> None:
        self.token_accuracy = token_accuracy
        self.token_bytes = None if token_bytes is None else torch.as_tensor(token_bytes, dtype=torch.float32)

    def count(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def __call__(self, model: nn.Module, batch: Batch, frozen: Mapping[str, nn.Module]) -> ObjectiveOutput:
        metrics: dict[str, torch.Tensor] = {}
        if self.token_accuracy:
            out = model(**batch, return_token_accuracy=True)
            metrics["token_accuracy"] = out.token_accuracy
        else:
            out = model(**batch)
        if self.token_bytes is not None:
            metrics["bytes_per_token"] = self._bytes_per_token(batch["labels"])
        return ObjectiveOutput(out.loss, metrics)

    def _bytes_per_token(self, labels: torch.Tensor) -> torch.Tensor:
        assert self.token_bytes is not None
        if self.token_bytes.device != labels.device:  # once: the table then stays on the batches' device
            self.token_bytes = self.token_bytes.to(labels.device)
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        # Ignored positions index 0 here and are masked out; an empty batch gives 0 (its count is 0 too).
        lengths = self.token_bytes[torch.where(mask, targets, 0)]
        return (lengths * mask).sum() / mask.sum().clamp(min=1)

    def shape(self, batch: Batch) -> tuple[int, int]:
        rows, length = batch["input_ids"].shape
        return rows, length

    def report(self, means: Mapping[str, float]) -> dict[str, float]:
        figures = {
            "ppl": math.exp(min(means["loss"], 50.0))
        }  # capped: an untrained huge loss stays printable
        if means.get("bytes_per_token", 0.0) > 0:  # only control tokens as targets: no text to count bits of
            figures["bpb"] = bits_per_byte(means["loss"], means["bytes_per_token"])
        return figures
