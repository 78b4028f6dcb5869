"""The Open-Llama model: a Llama decoder in one file that reads top to bottom.

Architecture choices and where they come from:

- Pre-normalisation with RMSNorm, SwiGLU feed-forward, rotary position embeddings, no biases
  (LLaMA, Touvron et al. 2023; RMSNorm: Zhang & Sennrich 2019; SwiGLU: Shazeer 2020; RoPE: Su et al. 2021).
- Grouped-query attention: ``n_kv_heads`` key/value heads shared by groups of query heads (GQA, Ainslie et al. 2023).
- Optional Llama-3 rotary frequency scaling for long contexts (``rope_scaling={"rope_type": "llama3", ...}``).
- Stable embedding, a LayerNorm right after the token embedding plus Xavier-normal initialisation of the
  embedding matrix (BLOOM, Le Scao et al. 2022; bitsandbytes' StableEmbedding). Open-Llama addition #1.
- Shared input/output embeddings: the LM head reuses the token embedding matrix (PaLM, Chowdhery et al. 2022).
  Open-Llama addition #2.
- Initialisation: normal(0, 0.02) everywhere; the residual output projections (``o_proj``, ``down_proj``) are
  scaled by 1/sqrt(2·n_layers) so the residual stream's variance does not grow with depth (GPT-2, Radford et al. 2019).
- No dropout: single-epoch pretraining does not need it (LLaMA, PaLM).
- FLOPs per token 6N + 12·L·H·Q·T (PaLM, appendix B), used by the trainer for MFU.

Parameter names follow transformers' ``LlamaForCausalLM`` (``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.q_proj.weight``, ..., ``lm_head.weight``) so checkpoints map one to one;
the stable-embedding LayerNorm (``model.embed_layernorm``) is the only extra module, folded away on export
(models/hf.py). Attention kernels are chosen once by name in models/attention.py, fused kernels for the
norm, RoPE, SwiGLU and the loss by the fused_* switches in models/kernels.py; both are RunOptions,
chosen per run and never part of the saved ModelConfig. The LM head and its losses are in models/lm_head.py,
the KV cache that generation and serving pass to `Llama.forward` in models/kv_cache.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.attention import AttentionBackend, get_attention_backend
from models.kernels import CrossEntropyMode, Kernels, select_kernels
from models.kv_cache import KVCache
from models.lm_head import LMHead, linear_cross_entropy, shift_labels

# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def llama_intermediate_size(dim: int, multiple_of: int = 256) -> int:
    """SwiGLU hidden width derived from the model width, the way LLaMA does it.

    A plain MLP uses 4·dim; SwiGLU has three matrices instead of two, so LLaMA keeps the parameter count and
    compute equal by using 2/3 of that (2/3·4·dim), then rounds up to a multiple of 256 for efficient
    matrix-multiply tiles. For dim 4096 this gives LLaMA-7B's 11008.
    """
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass
class ModelConfig:
    """The architecture of a Llama model, and nothing else: what a saved model is. How it runs (kernels,
    activation checkpointing) is a RunOptions, chosen per run. Every field is a plain value, so it
    round-trips through YAML/JSON."""

    vocab_size: NonNegativeInt = 32000
    """Number of token ids; set it from the tokenizer (``Tokenizer.vocab_size``). A run config's 0 means the
    tokenizer's."""
    dim: PositiveInt = 4096
    """Width of the residual stream (hidden size)."""
    n_layers: PositiveInt = 32
    """Number of decoder blocks."""
    n_heads: PositiveInt = 32
    """Number of query heads."""
    n_kv_heads: PositiveInt | None = None
    """Number of key/value heads (grouped-query attention); None means n_heads (plain multi-head attention)."""
    intermediate_size: PositiveInt | None = None
    """SwiGLU hidden width; None derives it from dim (2/3·4·dim rounded up to a multiple of 256)."""
    head_dim: PositiveInt | None = None
    """Width of one attention head; None means dim // n_heads (a few imported checkpoints differ)."""
    max_seq_len: PositiveInt = 2048
    """Longest sequence the model is trained for (written as max_position_embeddings on export)."""
    rope_theta: PositiveFloat = 10000.0
    """Rotary embedding base."""
    rope_scaling: dict[str, Any] | None = None
    """Optional rotary scaling: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"} or {"rope_type": "linear", "factor"}."""
    norm_eps: PositiveFloat = 1e-6
    """Epsilon of the RMSNorm (and of the stable-embedding LayerNorm)."""
    stable_embedding: bool = False
    """BLOOM's stable embedding: LayerNorm after the token embedding, Xavier-normal embedding init."""
    tie_embeddings: bool = False
    """PaLM's shared input/output embeddings: the LM head reuses the token embedding matrix."""
    init_std: PositiveFloat = 0.02
    """Standard deviation of the normal initialisation."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.intermediate_size is None:
            self.intermediate_size = llama_intermediate_size(self.dim)
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in ("llama3", "linear", "default"):
                raise ValueError(
                    f"rope_scaling type {rope_type!r} is not supported (use 'llama3' or 'linear')"
                )

    @classmethod
    def preset_fields(cls, name: str) -> dict[str, Any]:
        """The fields a named preset (tiny, 125m, 350m, 1b, 7b) sets; the others keep their defaults."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dict(PRESETS[name])

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset with any field overridden, e.g. vocab_size."""
        return cls.from_dict({**cls.preset_fields(name), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dict; an unknown key is an error that names the valid keys."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; valid keys: {sorted(valid)}")
        return cls(**d)


@dataclass
class RunOptions:
    """How a model runs, not what it is: chosen per run (the `train:` section of a run config, or an
    argument when loading a model) and never saved with the model. None of them changes the math beyond
    floating-point rounding; each fast path has a fallback and an agreement test."""

    attention_backend: Literal["sdpa", "eager", "flex", "xformers", "flash_attn"] = "sdpa"
    """Attention kernel: sdpa (default), eager (reference), flex, xformers, flash_attn (see models/attention.py)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~30% more compute)."""
    fused_norm: bool = False
    """RMSNorm through Liger Kernel's Triton kernel on CUDA (models/kernels.py); F.rms_norm elsewhere."""
    fused_rope: bool = False
    """Rotary embedding of q and k through Liger Kernel's Triton kernel on CUDA; PyTorch elsewhere."""
    fused_swiglu: bool = False
    """SwiGLU's silu(gate) * up through Liger Kernel's Triton kernel on CUDA; PyTorch elsewhere."""
    fused_cross_entropy: CrossEntropyMode = "auto"
    """LM head + loss: none (full logits), chunked (PyTorch, any device) or liger (Liger's fused kernel on
    CUDA, else chunked). chunked and liger never hold the full logits: with labels, forward returns none.
    auto: chunked while the model is in training mode (a training step needs only the loss, and the chunked
    loss is faster and smaller), full logits in eval mode (evaluation and generation see the logits)."""


# Open-Llama models use both of its additions (stable + shared embeddings) at every size. Fields not given
# here (intermediate_size, n_kv_heads) are derived in __post_init__.
_OPEN_LLAMA = {"stable_embedding": True, "tie_embeddings": True}
PRESETS: dict[str, dict[str, Any]] = {
    # Trains on a laptop CPU in minutes; the vocabulary comes from the tokenizer.
    "tiny": {"dim": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 512, **_OPEN_LLAMA},
    "125m": {"dim": 768, "n_layers": 12, "n_heads": 12, **_OPEN_LLAMA},
    "350m": {"dim": 1024, "n_layers": 24, "n_heads": 16, **_OPEN_LLAMA},
    # TinyLlama's shape (22 layers, 4 kv heads): about 1.0B parameters with a 32k vocabulary.
    "1b": {
        "dim": 2048,
        "n_layers": 22,
        "n_heads": 32,
        "n_kv_heads": 4,
        "intermediate_size": 5632,
        **_OPEN_LLAMA,
    },
    # Open-Llama's published 7B: 6,885,879,808 parameters.
    "7b": {
        "vocab_size": 100000,
        "dim": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "intermediate_size": 11008,
        **_OPEN_LLAMA,
    },
}


# --------------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, one kernel (F.rms_norm)."""
    return F.rms_norm(x, weight.shape, weight, eps)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned gain; `kernel` computes it (models/kernels.py)."""

    def __init__(self, dim: int, eps: float, kernel: Callable[..., torch.Tensor] = rms_norm) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight, self.eps)


# --------------------------------------------------------------------------------------------------
# Rotary position embeddings
# --------------------------------------------------------------------------------------------------


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with optional linear or Llama-3 scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type != "llama3":
        return inv_freq
    # Llama 3.1: long wavelengths (low frequencies) are slowed down by `factor`, short ones are kept,
    # and the band in between is interpolated smoothly.
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for given positions once per forward; every layer reuses them."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the frequencies, e.g. after building the model on the meta device."""
        c = self.config
        with torch.device("cpu"):  # real values even inside a `with torch.device("meta")` block
            inv_freq = rope_inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
        self.inv_freq = inv_freq.to(device or self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in float32 whatever the model dtype: bf16 positions would lose precision past 256.
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim), the "rotate half" layout of HF Llama
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys; cos/sin are (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def rotate_queries_keys(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the rotary embedding to queries and keys."""
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


# --------------------------------------------------------------------------------------------------
# Attention with grouped-query heads
# --------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, backend: AttentionBackend, kernels: Kernels
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.backend = backend
        self.rotary = kernels.rotary

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Any,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        out = self.backend(q, k, v, mask)  # (B, n_heads, T, head_dim); kv heads are shared, never repeated
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


# --------------------------------------------------------------------------------------------------
# SwiGLU feed-forward
# --------------------------------------------------------------------------------------------------


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gating: silu(gate) * up."""
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, kernels: Kernels) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.dim, bias=False)
        self.swiglu = kernels.swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.swiglu(self.gate_proj(x), self.up_proj(x)))


# --------------------------------------------------------------------------------------------------
# Decoder block
# --------------------------------------------------------------------------------------------------


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then + mlp(norm(.))."""

    def __init__(
        self, config: ModelConfig, layer_idx: int, backend: AttentionBackend, kernels: Kernels
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps, kernels.rms_norm)
        self.self_attn = Attention(config, layer_idx, backend, kernels)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps, kernels.rms_norm)
        self.mlp = MLP(config, kernels)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Any,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class LlamaModel(nn.Module):
    """Embedding (+ stable-embedding LayerNorm), the decoder blocks, the final norm."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend, kernels: Kernels) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.embed_layernorm = (
            nn.LayerNorm(config.dim, eps=config.norm_eps) if config.stable_embedding else None
        )
        self.layers = nn.ModuleList(DecoderLayer(config, i, backend, kernels) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, kernels.rms_norm)


@dataclass
class CausalLMOutput:
    """What Llama.forward returns: the mean token loss (when labels are given) and the logits."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None
    """With labels and `return_token_accuracy`: the fraction of target tokens that are the argmax."""
    token_logprobs: torch.Tensor | None = None
    """With labels and `return_token_logprobs`: (B, T) float32, at position t the log-probability of the
    target labels[t + 1] (0 where it is ignored)."""


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """True where a new document starts: its position restarts at 0, or a row begins (KVCache.begin does the
    same for rows that continue a cache)."""
    starts = position_ids == 0
    starts[:, 0] = True
    return starts


class Llama(nn.Module):
    """Llama causal language model with transformers-compatible parameter names.

    `config` is the architecture (saved with the model); `options` how this instance runs (not saved).
    """

    def __init__(self, config: ModelConfig, options: RunOptions | None = None) -> None:
        super().__init__()
        self.config = config
        self.options = options or RunOptions()
        self.attention_backend = get_attention_backend(self.options.attention_backend)
        self.kernels = select_kernels(self.options, REFERENCE_KERNELS)
        self.model = LlamaModel(config, self.attention_backend, self.kernels)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = LMHead(
            config.dim,
            config.vocab_size,
            self.kernels.linear_cross_entropy,
            chunked_in_training=self.options.fused_cross_entropy == "auto",
        )
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std); residual output projections scaled by 1/sqrt(2·n_layers); Xavier for stable embedding."""
        c = self.config
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=c.init_std)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                module.reset_parameters() if isinstance(module, nn.LayerNorm) else nn.init.ones_(
                    module.weight
                )
        residual_std = c.init_std / math.sqrt(2 * c.n_layers)
        for layer in self.model.layers:
            nn.init.normal_(layer.self_attn.o_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(layer.mlp.down_proj.weight, mean=0.0, std=residual_std)
        # The embedding is initialised last: when tied, it is also the LM head.
        if c.stable_embedding:
            nn.init.xavier_normal_(self.model.embed_tokens.weight)
        else:
            nn.init.normal_(self.model.embed_tokens.weight, mean=0.0, std=c.init_std)
        self.rotary.reset_buffers()

    def tie_weights(self) -> None:
        """Re-share the LM head with the embedding (needed after loading weights with assign=True)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_state_dict(
        cls,
        config: ModelConfig,
        state_dict: dict[str, torch.Tensor],
        *,
        options: RunOptions | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> Llama:
        """A model holding exactly `state_dict`'s tensors, in `dtype` (None keeps theirs): no initialisation
        pass, no copy when the tensors already have the dtype and device. A tied head may be given or left out; anything else
        missing or unexpected is a ValueError naming it."""
        with torch.device("meta"):
            model = cls(config, options)
        expected = {n for n in model.state_dict() if not (config.tie_embeddings and n == "lm_head.weight")}
        given = set(state_dict) - ({"lm_head.weight"} if config.tie_embeddings else set())
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        if missing or unexpected:
            raise ValueError(
                f"the weights do not match the config: missing {missing[:8]}, unexpected {unexpected[:8]}"
            )
        state = {name: state_dict[name].to(device=device, dtype=dtype) for name in expected}
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        model.rotary.reset_buffers(device)
        return model

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self.model.embed_layernorm is not None:
            x = self.model.embed_layernorm(x)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
        return_token_accuracy: bool = False,
        return_token_logprobs: bool = False,
    ) -> CausalLMOutput:
        """Logits for every position (or the last `logits_to_keep`), and the loss when `labels` are given.

        labels: Hugging Face convention, same shape as input_ids, shifted here, -100 ignored, mean over tokens.
            In training mode (and with fused_cross_entropy chunked/liger) the loss is computed chunk by chunk
            and no logits are returned (`.logits` is None); call `.eval()` for the logits with the loss.
        position_ids: (B, T); where they restart at 0 a new document starts: rotary positions restart and
            attention never crosses documents (packed rows). Without them a row is one causal sequence.
        kv_cache: a KVCache; each row's cached positions come before its input_ids (rows may be at different
            positions), and every row is advanced by T.
        return_token_accuracy: with labels, also the fraction of targets that are the argmax (a metric: every
            loss kernel counts it from the chunk logits it already has, so no full logits are needed).
        return_token_logprobs: with labels, each target's log-probability instead of the mean loss (what
            preference tuning sums per answer); no logits are returned.
        """
        b, t = input_ids.shape
        if kv_cache is not None:
            # The cache always tracks documents, so left padding from the prefill stays masked while decoding.
            position_ids, mask = kv_cache.begin(position_ids, t, self.attention_backend, input_ids.device)
        else:
            document_ids = None
            if position_ids is not None:
                document_ids = document_starts(position_ids).long().cumsum(dim=1)
            else:
                position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
            mask = self.attention_backend.prepare(
                q_len=t, kv_len=t, document_ids=document_ids, device=input_ids.device
            )

        x = self.embed(input_ids)
        cos, sin = self.rotary(position_ids, x.dtype)
        for layer in self.model.layers:
            if self.options.activation_checkpointing and self.training and kv_cache is None:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache)
        x = self.model.norm(x)
        if kv_cache is not None:
            kv_cache.end(t)

        if labels is None:
            if logits_to_keep:
                x = x[:, -logits_to_keep:]
            return CausalLMOutput(logits=self.lm_head.logits(x))
        targets = shift_labels(labels)
        if return_token_logprobs:
            return CausalLMOutput(token_logprobs=self.lm_head.target_logprobs(x, targets))
        if return_token_accuracy:
            loss, logits, accuracy = self.lm_head.loss_and_accuracy(x, targets)
            return CausalLMOutput(loss=loss, logits=logits, token_accuracy=accuracy)
        loss, logits = self.lm_head.loss(x, targets)
        return CausalLMOutput(loss=loss, logits=logits)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied matrix counts once); optionally without the token embedding
        (and so without a head tied to it), like transformers' num_parameters(exclude_embeddings=True)."""
        params = dict(self.named_parameters())  # named_parameters lists a shared tensor once
        if exclude_embeddings:
            params.pop("model.embed_tokens.weight")
        return sum(p.numel() for p in params.values())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, forward + backward: 6N + 12·L·H·Q·T (PaLM, appendix B).

        N counts the weights that take part in matrix multiplies: every parameter except the embedding
        lookup, plus the LM head (a matmul whether or not it is tied to the embedding). The second term is
        attention's QK^T and AV products for a sequence of seq_len tokens.
        """
        c = self.config
        n = self.num_parameters(exclude_embeddings=True)
        if c.tie_embeddings:
            n += self.lm_head.weight.numel()
        return 6 * n + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len


# The PyTorch implementations the model starts from; models/kernels.py swaps in fused ones by config.
REFERENCE_KERNELS = Kernels(
    rms_norm=rms_norm,
    rotary=rotate_queries_keys,
    swiglu=swiglu,
    linear_cross_entropy=linear_cross_entropy,
)
