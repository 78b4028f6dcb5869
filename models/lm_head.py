"""The LM head and its losses: the output projection, the next-token targets, the reference cross-entropy
(the full logits) and each target's log-probability.

The chunked and Liger losses that never build the full logits are in models/kernels.py; `LMHead` runs
whichever was chosen, inside its own module call (see its docstring).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from common import IGNORE_INDEX
from models.kernels import chunked_linear_cross_entropy

T = TypeVar("T")


class LMHead(nn.Linear):
    """The output projection, and the losses computed from it through the chosen kernel (models/kernels.py).

    Callers use the named methods, one return type each. Every one runs through `self(...)`, inside this
    module's call: the loss kernels read the weight themselves (the chunked ones never build the full
    logits), and engines that shard parameters gather them only around a module's call (DeepSpeed ZeRO-3
    gathers the weight in a forward pre-hook and re-gathers it for backward through hooks on forward's
    outputs). A method reading `self.weight` outside the call would see ZeRO-3's empty placeholder.
    """

    def __init__(
        self, dim: int, vocab_size: int, loss_kernel: Callable[..., Any], *, chunked_in_training: bool
    ) -> None:
        super().__init__(dim, vocab_size, bias=False)
        self.loss_kernel = loss_kernel
        self.chunked_in_training = chunked_in_training
        """fused_cross_entropy auto: the chunked loss in training mode, `loss_kernel` in eval mode."""

    def forward(
        self, hidden: torch.Tensor, compute: Callable[..., T] = F.linear, *args: Any, **kwargs: Any
    ) -> T:
        """`compute(hidden, weight, *args, **kwargs)` with the gathered weight; the logits by default.

        `compute` is a plain function and `args` tensors: ZeRO-3's hooks walk the positional inputs for
        tensors and let a function pass (a functools.partial would make them warn that tensors may hide in
        it); they do not see keyword arguments."""
        return compute(hidden, self.weight, *args, **kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self(hidden)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mean cross-entropy against (shifted) targets, and the logits when the kernel built them."""
        return self(hidden, self._loss_kernel(), targets)

    def loss_and_accuracy(
        self, hidden: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """`loss`, and the fraction of targets that are the argmax (from the logits the kernel has anyway)."""
        return self(hidden, self._loss_kernel(), targets, with_accuracy=True)

    def target_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each target's log-probability (0 where ignored), float32, the same shape as `targets`."""
        return self(hidden, target_logprobs, targets)

    def _loss_kernel(self) -> Callable[..., Any]:
        return (
            chunked_linear_cross_entropy if self.chunked_in_training and self.training else self.loss_kernel
        )


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets from unshifted (HF convention) labels; the last position has none (IGNORE_INDEX).

    Shifting the labels rather than the logits avoids a copy of the (B, T, V) logits.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (in float32) of logits (..., V) against targets (...); IGNORE_INDEX is skipped."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, with_accuracy: bool = False
) -> tuple[torch.Tensor, ...]:
    """The reference LM head + loss: the full logits, then the mean cross-entropy against shifted targets
    (and, `with_accuracy`, the fraction of targets that are the argmax)."""
    logits = F.linear(hidden, weight)
    loss = token_cross_entropy(logits, targets)
    if not with_accuracy:
        return loss, logits
    valid = targets != IGNORE_INDEX
    hits = (logits.detach().argmax(dim=-1) == targets) & valid
    return loss, logits, hits.sum() / valid.sum()


def target_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at every position of `hidden @ weight.T` (..., V), in float32; 0 where the target is
    IGNORE_INDEX. The logits are built in full (a preference batch is a few rows)."""
    logits = F.linear(hidden, weight).float()
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -nll.reshape(targets.shape)
