"""What a stage trains for: the objective the shared loop is handed. The loop knows no stage and no batch
key; an objective knows both.

An objective gives, for one micro-batch:
- `count(batch)`: how many items its loss is a mean over (target tokens for a language model, pairs for
  preference tuning), known before the forward pass: the loop weights micro-batches and ranks by it, so
  an update is the gradient of the exact mean over the global batch however it is split;
- `__call__(model, batch, frozen)`: the mean loss, plus other means over the same items (its metrics);
  `frozen` holds the run's frozen extra models (e.g. a reference model), prepared beside the policy;
- `shape(batch)`: (sequences, tokens per sequence) the model runs on, for throughput and MFU;
- `report(means)`: figures derived from the global means (e.g. perplexity from the loss).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping

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


class CausalLMObjective(Objective):
    """Next-token cross-entropy, the mean over target tokens: labels that are not IGNORE_INDEX after the
    shift. Pretraining uses it as is; a stage that masks its prompts does so through the labels.

    With `token_accuracy`, also the fraction of target tokens that are the model's argmax (the metric
    `token_accuracy`), over the same tokens as the loss; the model computes it beside the loss without
    materialising the logits."""

    def __init__(self, *, token_accuracy: bool = False) -> None:
        self.token_accuracy = token_accuracy

    def count(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def __call__(self, model: nn.Module, batch: Batch, frozen: Mapping[str, nn.Module]) -> ObjectiveOutput:
        if not self.token_accuracy:
            return ObjectiveOutput(model(**batch).loss)
        out = model(**batch, return_token_accuracy=True)
        return ObjectiveOutput(out.loss, {"token_accuracy": out.token_accuracy})

    def shape(self, batch: Batch) -> tuple[int, int]:
        rows, length = batch["input_ids"].shape
        return rows, length

    def report(self, means: Mapping[str, float]) -> dict[str, float]:
        return {"ppl": math.exp(min(means["loss"], 50.0))}  # capped: an untrained huge loss stays printable
