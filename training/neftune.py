"""NEFTune: noisy embeddings during instruction tuning (Jain et al. 2023, "NEFTune: Noisy Embeddings
Improve Instruction Finetuning").

In training mode, uniform noise in [-1, 1] scaled by alpha / sqrt(L * d) is added to the input embeddings,
L being the length of the sequence and d the model width; evaluation and generation see no noise. The
paper's alpha is 5 (5 to 15 work). In a packed row L is the length of each conversation (read from
position_ids, which restart at each one), so a conversation gets the same noise scale packed or padded;
without position_ids it is the row's length, as in transformers' implementation.

The noise is added where transformers' hook adds it, to the embedding the decoder blocks see: after the
stable-embedding LayerNorm for models that have one (that LayerNorm is folded into the exported
embedding). It draws from torch's global generator, which checkpoints save, so a resumed run draws the
same noise.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from models.llama import Llama


def segment_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> the length of the segment (run of positions from a 0) each token belongs to."""
    starts = position_ids == 0
    starts[:, 0] = True
    segment = starts.long().cumsum(dim=1) - 1
    counts = torch.zeros_like(segment).scatter_add_(1, segment, torch.ones_like(segment))
    return counts.gather(1, segment)


def add_neftune(model: Llama, alpha: float) -> list[RemovableHandle]:
    """Add NEFTune noise to `model`'s input embeddings in training mode; returns the hooks' handles."""
    if alpha <= 0:
        return []
    last_embedding_module = model.model.embed_layernorm or model.model.embed_tokens
    seen: dict[str, Any] = {}

    def remember_positions(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["position_ids"] = kwargs.get("position_ids", args[2] if len(args) > 2 else None)

    def add_noise(module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        position_ids = seen.get("position_ids")
        if position_ids is None:
            scale = alpha / math.sqrt(output.shape[1] * output.shape[2])
        else:
            lengths = segment_lengths(position_ids.to(output.device)).to(output.dtype)
            scale = (alpha / torch.sqrt(lengths * output.shape[2]))[..., None]
        noise = torch.rand(output.shape, device=output.device, dtype=output.dtype) * 2 - 1
        return output + noise * scale

    return [
        model.register_forward_pre_hook(remember_positions, with_kwargs=True),
        last_embedding_module.register_forward_hook(add_noise),
    ]
