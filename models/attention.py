"""Attention backends behind one interface, chosen once by name when the model is built.

Every backend computes causal grouped-query attention: queries (B, Hq, Tq, D), keys/values (B, Hkv, Tk, D)
with Hq a multiple of Hkv; the queries are the last Tq of the Tk positions (Tq < Tk while decoding with a KV
cache). Optionally `document_ids` (B, Tk) split a packed row into documents: a query only sees keys of its own
document. The model calls `backend.prepare(...)` once per forward (masks, block masks and sequence lengths
are built once, not per layer) and then `backend(q, k, v, mask)` in every layer.

| name       | kernel                                                      | where              |
|------------|-------------------------------------------------------------|--------------------|
| sdpa       | torch scaled_dot_product_attention (flash / mem-efficient   | CPU, GPU (default) |
|            | kernels on GPU when no dense mask is needed)                |                    |
| eager      | explicit softmax(QK^T/sqrt(d)) V: the reference             | anywhere           |
| flex       | torch flex_attention with a causal+document block mask       | GPU; CPU inference |
| xformers   | xformers memory_efficient_attention                          | GPU, optional      |
| flash_attn | FlashAttention-2 (varlen kernel for packed documents)        | GPU, optional      |

xformers and flash_attn only have kernels for training shapes (Tq == Tk) on CUDA; KV-cache decoding steps
through those backends use sdpa, which is what a single decoding step needs anyway, and so does everything
where the package is missing or the tensors are on the CPU (with one log line saying so).
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from models.kernels import GPU_EXTRAS_HINT, log_fallback


@dataclass
class DenseMask:
    """Mask for sdpa/eager: either sdpa's built-in causal flag or an explicit boolean (B|1, 1, Tq, Tk) mask."""

    mask: torch.Tensor | None
    is_causal: bool


def dense_causal_mask(
    q_len: int, kv_len: int, document_ids: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Boolean mask, True where a query may attend: causal (queries are the last q_len keys) and same document."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, Tq, Tk)
    if document_ids is not None:
        same_doc = document_ids[:, -q_len:, None] == document_ids[:, None, :]  # (B, Tq, Tk)
        allowed = allowed & same_doc[:, None]
    return allowed


class AttentionBackend(ABC):
    """Interface: `prepare` builds the backend's mask once per forward; `__call__` attends in every layer."""

    name = "base"

    @abstractmethod
    def prepare(
        self, *, q_len: int, kv_len: int, document_ids: torch.Tensor | None, device: torch.device
    ) -> Any: ...

    @abstractmethod
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor: ...


class SdpaBackend(AttentionBackend):
    """torch's scaled_dot_product_attention; GQA without repeating keys/values (enable_gqa)."""

    name = "sdpa"

    def prepare(
        self, *, q_len: int, kv_len: int, document_ids: torch.Tensor | None, device: torch.device
    ) -> DenseMask:
        if document_ids is None and q_len == kv_len:
            return DenseMask(None, is_causal=True)  # no mask tensor: lets sdpa pick flash kernels on GPU
        if document_ids is None and q_len == 1:
            return DenseMask(None, is_causal=False)  # one new token sees the whole cache
        return DenseMask(dense_causal_mask(q_len, kv_len, document_ids, device), is_causal=False)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DenseMask) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.mask, is_causal=mask.is_causal, enable_gqa=q.shape[1] != k.shape[1]
        )


class EagerBackend(SdpaBackend):
    """The reference: explicit scores, float32 softmax, keys/values repeated per query group."""

    name = "eager"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DenseMask) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        allowed = mask.mask
        if mask.is_causal:
            allowed = dense_causal_mask(q.shape[2], k.shape[2], None, q.device)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return probs @ v


class FlexBackend(AttentionBackend):
    """torch.nn.attention.flex_attention with a block mask (skips fully masked blocks across documents)."""

    name = "flex"

    def __init__(self) -> None:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self._create_block_mask = create_block_mask
        self._flex_attention = flex_attention
        # The fused kernel comes from compiling; uncompiled flex materialises the scores (fine for CPU tests,
        # where torch also has no flex backward). Compiled lazily, on first GPU use.
        self._flex_attention_compiled = None

    def prepare(
        self, *, q_len: int, kv_len: int, document_ids: torch.Tensor | None, device: torch.device
    ) -> Any:
        offset = kv_len - q_len

        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        def causal_document(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx + offset) & (document_ids[b, q_idx + offset] == document_ids[b, kv_idx])

        if document_ids is None:
            return self._create_block_mask(causal, None, None, q_len, kv_len, device=device)
        return self._create_block_mask(
            causal_document, document_ids.shape[0], None, q_len, kv_len, device=device
        )

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        attend = self._flex_attention
        if q.is_cuda:
            if self._flex_attention_compiled is None:
                self._flex_attention_compiled = torch.compile(self._flex_attention)
            attend = self._flex_attention_compiled
        return attend(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


@dataclass
class PackedMask:
    """Training-shape mask for xformers/flash_attn: plain causal, or document lengths of a packed batch."""

    cu_seqlens: torch.Tensor | None  # (n_docs + 1,) int32 offsets into the flattened (B·T) tokens
    seqlens: list[int] | None
    max_seqlen: int
    fallback: DenseMask | None = None  # sdpa does the work: KV-cache decoding, or the kernel cannot run here


def packed_mask(
    q_len: int, kv_len: int, document_ids: torch.Tensor | None, device: torch.device
) -> PackedMask:
    if q_len != kv_len:
        dense = SdpaBackend().prepare(q_len=q_len, kv_len=kv_len, document_ids=document_ids, device=device)
        return PackedMask(None, None, 0, fallback=dense)
    if document_ids is None:
        return PackedMask(None, None, q_len)
    # A document starts where the id changes or a row begins; its length runs to the next start.
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_idx = starts.flatten().nonzero().flatten()
    cu_seqlens = F.pad(start_idx, (0, 1), value=document_ids.numel()).to(torch.int32)
    seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()  # one host sync per forward, not per layer
    return PackedMask(cu_seqlens, seqlens, max(seqlens))


def one_kernel_dtype(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in autocast's dtype when autocast is on, for kernels that autocast does not cast.

    Under bf16 autocast the rotated q and k come out in float32 (the rotary cos/sin follow the float32
    residual stream) while v is bf16; sdpa is cast by autocast itself, but xformers needs one dtype for all
    three and flash-attn a 16-bit one.
    """
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


class PackageBackend(AttentionBackend):
    """A GPU kernel from an optional package. Packed documents reach the kernel as sequence lengths
    (PackedMask). Where the kernel cannot run, sdpa does the work with the same masking, and the first such
    forward in the process logs one line saying why, like the fused-kernel switches (models/kernels.py):
    the package is missing or fails to import, or the tensors are not on a CUDA device (a GPU-trained
    model's config used on a CPU for export or chat). KV-cache decoding steps always use sdpa."""

    module: str  # the import name
    package: str  # the pip name
    install: str = GPU_EXTRAS_HINT  # how to install it
    device_types: tuple[str, ...] = ("cuda",)  # where the kernels run

    def __init__(self) -> None:
        self.kernels: Any = None
        self.unavailable: str | None = None
        """Why the package cannot be used in this process, or None."""
        try:
            self.kernels = importlib.import_module(self.module)
        except Exception as e:  # missing, or built against another torch / CUDA
            self.unavailable = f"the {self.package} package cannot be imported ({e}; {self.install})"

    def prepare(
        self, *, q_len: int, kv_len: int, document_ids: torch.Tensor | None, device: torch.device
    ) -> PackedMask:
        on_device = device.type in self.device_types
        reason = self.unavailable or (None if on_device else f"a CUDA kernel, not for {device.type} tensors")
        if reason is not None:
            log_fallback(f"attention_backend {self.name}", reason, "sdpa")
            dense = SdpaBackend().prepare(
                q_len=q_len, kv_len=kv_len, document_ids=document_ids, device=device
            )
            return PackedMask(None, None, 0, fallback=dense)
        return packed_mask(q_len, kv_len, document_ids, device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: PackedMask) -> torch.Tensor:
        if mask.fallback is not None:
            return SdpaBackend()(q, k, v, mask.fallback)
        return self.attend(*one_kernel_dtype(q, k, v), mask)

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: PackedMask) -> torch.Tensor:
        """The kernel on (B, H, T, D) inputs of one dtype; returns (B, n_heads, T, D)."""


class XformersBackend(PackageBackend):
    """xformers.ops.memory_efficient_attention (optional GPU dependency)."""

    name, module, package = "xformers", "xformers.ops", "xformers"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: PackedMask) -> torch.Tensor:
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        # xformers layout (B, T, G, H, D): kv heads as groups, the query heads of each group expanded over H.
        q5 = q.transpose(1, 2).reshape(b, t, hkv, hq // hkv, d)
        k5 = k.transpose(1, 2)[:, :, :, None].expand(b, t, hkv, hq // hkv, d)
        v5 = v.transpose(1, 2)[:, :, :, None].expand(b, t, hkv, hq // hkv, d)
        fmha = self.kernels.fmha
        if mask.seqlens is None:
            bias = fmha.attn_bias.LowerTriangularMask()
        else:  # packed documents: one long row of block-diagonal causal attention
            bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(mask.seqlens)
            q5, k5, v5 = (x.reshape(1, b * t, hkv, hq // hkv, d) for x in (q5, k5, v5))
        out = self.kernels.memory_efficient_attention(q5, k5, v5, attn_bias=bias)
        return out.reshape(b, t, hq, d).transpose(1, 2)


class FlashAttnBackend(PackageBackend):
    """FlashAttention-2 (flash_attn package, optional; fp16/bf16 on CUDA); varlen kernel for packed documents."""

    name, module, package = "flash_attn", "flash_attn", "flash-attn"
    # Not in requirements-gpu.txt: PyPI has only its source, which builds for an hour or more (docs/gpu.md).
    install = 'pip install "flash-attn>=2.7,<3" --no-build-isolation'

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: PackedMask) -> torch.Tensor:
        b, hq, t, d = q.shape
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # flash layout (B, T, H, D); GQA is native
        if mask.cu_seqlens is None:
            out = self.kernels.flash_attn_func(q, k, v, causal=True)
        else:
            flat = (x.reshape(b * t, x.shape[2], d) for x in (q, k, v))
            out = self.kernels.flash_attn_varlen_func(
                *flat,
                cu_seqlens_q=mask.cu_seqlens,
                cu_seqlens_k=mask.cu_seqlens,
                max_seqlen_q=mask.max_seqlen,
                max_seqlen_k=mask.max_seqlen,
                causal=True,
            )
        return out.reshape(b, t, hq, d).transpose(1, 2)


BACKENDS: dict[str, type[AttentionBackend]] = {
    backend.name: backend
    for backend in (SdpaBackend, EagerBackend, FlexBackend, XformersBackend, FlashAttnBackend)
}


def get_attention_backend(name: str) -> AttentionBackend:
    """The backend called `name`; a missing optional package raises ImportError saying how to install it."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]()
