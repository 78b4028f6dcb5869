"""Fused-kernel switches: the model's fusable operations, chosen once when the model is built.

The model (models/llama.py) calls four functions through one `Kernels` object; `select_kernels` fills
it from the config's switches, starting from the model's own PyTorch reference implementations and
replacing each switched-on one with its fast version. A fast version that cannot run here (no CUDA
device, Liger Kernel not installed or broken) falls back to the reference with ONE log line per switch
and process, never an error, so a config written for a GPU cluster still loads on a laptop.

| switch (RunOptions)   | reference (any device)                | fast path                                        |
|-----------------------|---------------------------------------|--------------------------------------------------|
| fused_norm            | F.rms_norm                            | Liger's Triton RMSNorm (CUDA)                    |
| fused_rope            | rotate-half RoPE in PyTorch           | Liger's Triton RoPE: q and k in one kernel (CUDA)|
| fused_swiglu          | F.silu(gate) * up                     | Liger's SiLU-mul kernel (CUDA)                   |
| fused_cross_entropy   | "none": full logits, F.cross_entropy  | "chunked": PyTorch, any device, no full logits;  |
|                       |                                       | "liger": Liger's fused linear + cross-entropy;   |
|                       |                                       | "auto" (default): "chunked" in training mode,    |
|                       |                                       | "none" in eval mode (the model decides per call) |

Both fused cross-entropies compute the LM head and the loss over chunks of tokens, so the
(tokens x vocab) float32 logits (2 GiB for 8 x 2048 tokens and a 32k vocabulary, plus their gradient)
never exist at once; the model then returns no logits when it is given labels. "liger" falls back to
"chunked" when Liger cannot run. Every path can also give the token accuracy (how many targets are the
argmax) with `with_accuracy=True`, from the chunk logits it already has, so a metric needs no logits.

`compile_model` applies torch.compile per decoder block (torchtitan's recipe), outside the model; the
training loop calls it for `train.compile: true`. Fused AdamW is chosen in training/optim.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

from common import IGNORE_INDEX

log = logging.getLogger(__name__)

GPU_EXTRAS_HINT = "pip install -r requirements-gpu.txt"
CrossEntropyMode = Literal["auto", "none", "chunked", "liger"]


class KernelSwitches(Protocol):
    """The switches `select_kernels` reads (models.llama.RunOptions has them)."""

    fused_norm: bool
    fused_rope: bool
    fused_swiglu: bool
    fused_cross_entropy: CrossEntropyMode


@dataclass(frozen=True)
class Kernels:
    """The functions the model calls for its fusable operations."""

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    """(x, weight, eps) -> normalised x."""
    rotary: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
    ]
    """(q (B, Hq, T, D), k (B, Hkv, T, D), cos (B, T, D), sin (B, T, D)) -> rotated (q, k)."""
    swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """(gate, up) -> silu(gate) * up."""
    linear_cross_entropy: Callable[..., tuple[torch.Tensor, ...]]
    """(hidden (B, T, D), head weight (V, D), targets (B, T) already shifted, -100 ignored) ->
    (mean token cross-entropy, logits or None when they were never materialised); with the keyword
    `with_accuracy=True`, a third value: the fraction of targets that are the argmax (no gradient)."""
    names: dict[str, str] = dataclasses.field(default_factory=dict)
    """What was chosen for each switched-on operation ("liger", "chunked", or "torch" after a fallback)."""


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------

_logged_fallbacks: set[tuple[str, str]] = set()


def log_fallback(switch: str, reason: str, instead: str) -> None:
    """Say once per process that `switch` runs `instead` of its fast path, and why."""
    if (switch, reason) in _logged_fallbacks:
        return
    _logged_fallbacks.add((switch, reason))
    log.warning("%s: %s; using %s instead", switch, reason, instead)


def liger_unavailable_reason() -> str | None:
    """Why Liger Kernel's Triton kernels cannot run in this process, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA device (Liger Kernel's kernels are Triton GPU kernels)"
    try:
        importlib.import_module("liger_kernel.ops.rms_norm")
    except ImportError as e:
        if getattr(e, "name", None) in ("liger_kernel", "triton"):
            return f"{e.name} is not installed ({GPU_EXTRAS_HINT})"
        return f"liger-kernel failed to import ({e})"
    except Exception as e:  # a Triton / liger-kernel version mismatch fails in other ways at import time
        return f"liger-kernel failed to import ({type(e).__name__}: {e})"
    return None


def _cuda_or(fast: Callable[..., Any], reference: Callable[..., Any]) -> Callable[..., Any]:
    """Call `fast` on CUDA tensors and `reference` otherwise (a GPU-trained model used on the CPU)."""

    def kernel(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return fast(x, *args, **kwargs) if x.is_cuda else reference(x, *args, **kwargs)

    kernel.__name__ = getattr(fast, "__name__", "kernel")
    return kernel


def select_kernels(config: KernelSwitches, reference: Kernels) -> Kernels:
    """`reference` with every operation switched on in `config` replaced by its fast version."""
    # Where Liger cannot run, an operation keeps its PyTorch version: the model's reference, except the
    # loss, which falls back to the chunked cross-entropy so that the memory saving stays.
    fallbacks = {
        "rms_norm": (reference.rms_norm, "torch", "torch F.rms_norm"),
        "rotary": (reference.rotary, "torch", "the PyTorch rotary embedding"),
        "swiglu": (reference.swiglu, "torch", "torch F.silu(gate) * up"),
        "linear_cross_entropy": (
            chunked_linear_cross_entropy,
            "chunked",
            "the chunked PyTorch cross-entropy",
        ),
    }
    wanted = {
        ("fused_norm", "rms_norm"): config.fused_norm,
        ("fused_rope", "rotary"): config.fused_rope,
        ("fused_swiglu", "swiglu"): config.fused_swiglu,
        ("fused_cross_entropy", "linear_cross_entropy"): config.fused_cross_entropy == "liger",
    }
    chosen: dict[str, Any] = {}
    names: dict[str, str] = {}
    if config.fused_cross_entropy == "chunked":
        chosen["linear_cross_entropy"], names["fused_cross_entropy"] = chunked_linear_cross_entropy, "chunked"
    liger_reason = liger_unavailable_reason() if any(wanted.values()) else None
    for (switch, field), on in wanted.items():
        if not on:
            continue
        slow, slow_name, slow_description = fallbacks[field]
        reason = liger_reason
        if reason is None:
            try:
                chosen[field], names[switch] = _cuda_or(_LIGER_BUILDERS[field](), slow), "liger"
                continue
            except Exception as e:  # an older or partial liger-kernel without this operation
                reason = f"liger-kernel has no usable kernel for it ({e})"
        log_fallback(switch, reason, slow_description)
        chosen[field], names[switch] = slow, slow_name
    return dataclasses.replace(reference, names=names, **chosen)


# --------------------------------------------------------------------------------------------------
# Liger Kernel (imported only when selected; GPU only)
# --------------------------------------------------------------------------------------------------


def _liger_rms_norm() -> Callable[..., torch.Tensor]:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # offset 0 and "llama" casting (statistics in fp32, like F.rms_norm); not in place, because the
        # incoming gradient may be shared with other consumers of the residual stream.
        return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)

    return rms_norm


def _liger_rotary() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    # The autograd Function itself, like the other Liger kernels here: liger_rotary_pos_emb goes through
    # Liger's backend dispatcher (environment look-ups and locks on every call, per layer).
    from liger_kernel.ops.rope import LigerRopeFunction

    def rotary(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Same (B, H, T, D) layout and rotate-half cos/sin (B, T, D) as transformers' Llama.
        return LigerRopeFunction.apply(q, k, cos, sin)

    return rotary


def _liger_swiglu() -> Callable[..., torch.Tensor]:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return LigerSiLUMulFunction.apply(gate, up)

    return swiglu


def _liger_linear_cross_entropy() -> Callable[..., tuple[torch.Tensor, None]]:
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
    with_accuracy_fn = LigerFusedLinearCrossEntropyLoss(
        ignore_index=IGNORE_INDEX, reduction="mean", return_token_accuracy=True
    )

    def linear_cross_entropy(
        hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, with_accuracy: bool = False
    ) -> tuple[torch.Tensor, ...]:
        # Liger runs its chunk matmuls under the caller's autocast, so bf16 autocast applies as usual.
        hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if not with_accuracy:
            return loss_fn(weight, hidden, targets), None
        out = with_accuracy_fn(weight, hidden, targets)
        return out.loss, None, out.token_accuracy.detach()

    return linear_cross_entropy


_LIGER_BUILDERS: dict[str, Callable[[], Callable[..., Any]]] = {
    "rms_norm": _liger_rms_norm,
    "rotary": _liger_rotary,
    "swiglu": _liger_swiglu,
    "linear_cross_entropy": _liger_linear_cross_entropy,
}


# --------------------------------------------------------------------------------------------------
# Chunked linear + cross-entropy in plain PyTorch (any device)
# --------------------------------------------------------------------------------------------------


def default_chunk_size(n_tokens: int, dim: int, vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's logits hold about as many numbers as the hidden states.

    That keeps the transient memory of the loss near that of one activation (Liger's rule), whatever the
    vocabulary; a power of two, at least 512 rows so that the LM-head matmuls stay efficient (on a 2-core
    CPU, tiny preset, vocabulary 8000: 128 rows 296 ms, 256 rows 248 ms, 512 rows 223 ms for the head + loss
    forward and backward of 2048 tokens; the full-logits path 314 ms).
    """
    chunks = math.ceil(vocab_size / dim)
    rows = 2 ** math.ceil(math.log2(max(1, math.ceil(n_tokens / chunks))))
    return max(1, min(n_tokens, max(512, rows)))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden @ weight.T, with both gradients computed chunk by chunk in forward.

    Computing the gradients while the chunk's logits exist (instead of recomputing them in backward)
    keeps the FLOPs of the plain path: three matmuls per chunk. Backward only scales the stored gradients.
    Also returns the number of targets that are their row's argmax (no gradient; for the accuracy metric).
    """

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_valid = (targets != IGNORE_INDEX).sum().to(torch.float32)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            raw = h @ weight.t()  # in the autocast dtype when autocast is on (bf16 on GPU)
            logits = raw.float()
            valid = t != IGNORE_INDEX
            safe_t = t.masked_fill(~valid, 0)[:, None]
            target_logits = logits.gather(1, safe_t).squeeze(1)
            # Log-sum-exp by hand so that its exponentials are reused: `logits` becomes exp(logits - max) in
            # place, the softmax numerator, instead of logsumexp's own copy plus a second exp for the gradient.
            row_max = logits.amax(dim=-1, keepdim=True)
            # The target is the argmax when its logit is the row's maximum: free here, where an argmax
            # would be one more pass over the (chunk x vocab) logits in every training step.
            correct += ((target_logits >= row_max.squeeze(1)) & valid).sum()
            probs = logits.sub_(row_max).exp_()
            row_sum = probs.sum(dim=-1, keepdim=True)
            lse = row_sum.log().add_(row_max).squeeze(1)
            loss_sum += ((lse - target_logits) * valid).sum()
            # d(mean CE)/d(logits) = (softmax - one_hot) / n_valid on valid rows, zero on ignored ones: one
            # in-place scale of the numerator, then -1/n_valid at the targets, in float32, then cast to the
            # matmul dtype: what autograd does for logits.float() in the plain path.
            weight_of_row = valid[:, None] / n_valid
            grad = probs.mul_(weight_of_row / row_sum)
            grad.scatter_add_(1, safe_t, -weight_of_row)
            grad = grad.to(raw.dtype)
            del raw, logits, probs
            if grad.dtype == hidden.dtype == weight.dtype == grad_weight.dtype:
                # No autocast: write straight into the outputs (no temporaries, no extra add pass).
                torch.mm(grad, weight, out=grad_hidden[start : start + chunk_size])
                grad_weight.addmm_(grad.t(), h)
            else:
                grad_hidden[start : start + chunk_size] = grad @ weight
                grad_weight += grad.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return loss_sum / n_valid, correct

    @staticmethod
    def backward(
        ctx: Any, grad_loss: torch.Tensor, _grad_correct: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype),
            (grad_weight * grad_loss).to(ctx.weight_dtype),
            None,
            None,
        )


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int | None = None,
    *,
    with_accuracy: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Mean token cross-entropy of `hidden @ weight.T` against `targets` (-100 ignored), never holding the
    full (tokens, vocab) logits: chunks of `chunk_size` tokens (default: `default_chunk_size`).

    Returns (loss, None), or with `with_accuracy` (loss, None, fraction of targets that are the argmax)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    n_valid = (targets != IGNORE_INDEX).sum()
    chunk_size = chunk_size or default_chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss, correct = _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size)
    else:
        # No backward to prepare for (validation): the loss alone, chunk by chunk.
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            logits = (hidden[start : start + chunk_size] @ weight.t()).float()
            t = targets[start : start + chunk_size]
            loss_sum += torch.nn.functional.cross_entropy(
                logits, t, ignore_index=IGNORE_INDEX, reduction="sum"
            )
            if with_accuracy:
                correct += (logits.argmax(dim=-1) == t).sum()  # an ignored target (-100) is never an argmax
        loss = loss_sum / n_valid
    return (loss, None, correct / n_valid) if with_accuracy else (loss, None)


# --------------------------------------------------------------------------------------------------
# torch.compile per block
# --------------------------------------------------------------------------------------------------


def decoder_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The decoder blocks of our Llama or of transformers' LlamaForCausalLM (both at `.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def compile_model(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """torch.compile every decoder block in place (torchtitan's per-block compile); returns `model`.

    Blocks share one code path, so the compiled graph is reused by every layer (the parameters are graph
    inputs), which compiles in seconds rather than minutes for a deep model, and activation checkpointing
    wraps compiled blocks unchanged. Compiling in place keeps parameter names, so checkpoints stay
    unprefixed. A module without decoder blocks is compiled whole.
    """
    blocks = decoder_blocks(model)
    if blocks is None:
        model.compile(**compile_kwargs)
        return model
    for block in blocks:
        block.compile(**compile_kwargs)
    return model
