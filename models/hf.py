"""Hugging Face Llama checkpoints in and out.

`export_hf(model, out_dir, tokenizer_dir)` writes a stock Llama folder (config.json, model.safetensors or
shards with an index, generation_config.json, the tokenizer files) that transformers'
`AutoModelForCausalLM.from_pretrained` loads with no custom code and that gives the same logits:

- stable embedding: its LayerNorm acts on each embedding row independently, so LN(E)[i] is precomputed for
  every vocabulary row and exported as the embedding matrix. When the embeddings are tied, the exported head
  keeps the original E, so the export is untied (tie_word_embeddings false).
- shared embeddings without stable embedding: exported tied (tie_word_embeddings true, no lm_head tensor).

Beside it go `open_llama_config.json` (our ModelConfig) and, for stable-embedding models,
`open_llama_extra.safetensors` (the LayerNorm and, if untied, the raw embedding), which transformers ignores;
with them `load_hf` restores the exact trainable model. A stage's export also records the model's name in
config.json (`open_llama_model_name`, which transformers keeps) and carries a model card (`README.md`).

`load_hf(path)` loads any Hugging Face Llama folder (single or sharded safetensors, or pytorch_model.bin read
with weights_only=True: nothing is ever unpickled) into our Llama, e.g. to continue pretraining a Llama model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common.files import atomic_dir
from models.llama import Llama, ModelConfig, RunOptions

OUR_CONFIG = "open_llama_config.json"
OUR_EXTRA = "open_llama_extra.safetensors"
# config.json's record of the model's name (its run's): transformers keeps a key it does not know through
# from_pretrained and save_pretrained (unlike `_name_or_path`, which it overwrites with the folder's path).
NAME_KEY = "open_llama_model_name"
CARD = "README.md"
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def hf_config_dict(config: ModelConfig, *, tie_word_embeddings: bool, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for transformers' LlamaConfig (rope written both the v5 way and the older way)."""
    rope_parameters = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "initializer_range": config.init_std,
        "rope_theta": config.rope_theta,  # read by older transformers, vLLM, llama.cpp's converter
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
        "rope_parameters": rope_parameters,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": tie_word_embeddings,
        "use_cache": True,
        "dtype": _DTYPE_NAMES.get(dtype, "float32"),
        "torch_dtype": _DTYPE_NAMES.get(dtype, "float32"),
    }


def _special_token_ids(tokenizer_dir: Path | None) -> dict[str, int | None]:
    """bos/eos/pad ids of a Hugging Face tokenizer folder (None for each when there is no tokenizer)."""
    ids: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer_dir is None:
        return ids
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


@torch.no_grad()
def export_state_dict(model: Llama) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], bool]:
    """(HF tensors, our extra tensors, tie_word_embeddings) for `model`, stable embedding folded in."""
    config = model.config
    ours = {name: t.detach() for name, t in model.state_dict().items()}
    embedding = ours["model.embed_tokens.weight"]
    extra: dict[str, torch.Tensor] = {}
    tied = config.tie_embeddings
    hf = {name: t for name, t in ours.items() if not name.startswith("model.embed_layernorm.")}
    if config.stable_embedding:
        ln = model.model.embed_layernorm
        folded = F.layer_norm(
            embedding.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps
        )
        hf["model.embed_tokens.weight"] = folded.to(embedding.dtype)
        extra = {name: t for name, t in ours.items() if name.startswith("model.embed_layernorm.")}
        if tied:
            tied = False  # the folded input embedding differs from the head, which keeps E
            hf["lm_head.weight"] = embedding
        else:
            extra["model.embed_tokens.weight"] = embedding
    if tied:
        hf.pop("lm_head.weight")  # transformers re-ties it from tie_word_embeddings
    contiguous = {name: t.contiguous().cpu() for name, t in hf.items()}
    return contiguous, {name: t.contiguous().cpu() for name, t in extra.items()}, tied


def _save_sharded(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json when larger."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_hf(
    model: Llama,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    stop_token_ids: Sequence[int] = (),
    name: str = "",
    card: str = "",
) -> Path:
    """Write `model` as a stock Hugging Face Llama folder at out_dir (atomically: temp folder, then rename).

    dtype: tensor dtype on disk (default: the model's). tokenizer_dir: a tokenizer folder whose files are
    copied in and whose bos/eos/pad ids go to config.json and generation_config.json. stop_token_ids: more
    ids that end generation besides eos (a chat model's end-of-turn token), listed with it as
    generation_config.json's eos_token_id, which transformers' generate() and vLLM stop at. name: the
    model's name, recorded in config.json (`recorded_model_name`; the chat server's model id). card: the
    model card, written as README.md (training/report.py renders it).
    """
    out_dir = Path(out_dir)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if tokenizer_dir is not None and not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"{tokenizer_dir}: not a Hugging Face tokenizer folder (no tokenizer_config.json)"
        )
    tensors, extra, tied = export_state_dict(model)
    if dtype is not None:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
    disk_dtype = next(iter(tensors.values())).dtype
    special = _special_token_ids(tokenizer_dir)

    with atomic_dir(out_dir) as tmp:
        _save_sharded(tensors, tmp, max_shard_bytes)
        config = {**hf_config_dict(model.config, tie_word_embeddings=tied, dtype=disk_dtype), **special}
        if name:
            config[NAME_KEY] = name
        _write_json(tmp / "config.json", config)
        # No max_length: it would override callers' max_new_tokens with a warning in transformers.
        generation = dict(special)
        if stop_token_ids:
            stops = [special["eos_token_id"], *stop_token_ids]
            generation["eos_token_id"] = list(dict.fromkeys(i for i in stops if i is not None))
        _write_json(tmp / "generation_config.json", generation)
        _write_json(tmp / OUR_CONFIG, model.config.to_dict())
        if extra:
            save_file(extra, tmp / OUR_EXTRA, metadata={"format": "pt"})
        if tokenizer_dir is not None:
            for file_name in TOKENIZER_FILES:
                if (tokenizer_dir / file_name).is_file():
                    shutil.copy2(tokenizer_dir / file_name, tmp / file_name)
        if card:
            (tmp / CARD).write_text(card, encoding="utf-8")
    return out_dir


def recorded_model_name(folder: str | Path) -> str:
    """The model's name that an export records in its config.json ("" when it records none)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    name = config.get(NAME_KEY) if isinstance(config, dict) else None
    return name if isinstance(name, str) else ""


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig from a Hugging Face Llama config.json dict; unsupported features are named errors."""
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise ValueError(f"{source}: model_type is {model_type!r}, expected 'llama'")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (Llama uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{source}: {flag}=true is not supported")
    # transformers 5 writes rope_parameters (theta inside); older configs rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor is not supported")
    if rope_type == "llama3":
        rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
    rope_scaling = None if rope_type == "default" else {"rope_type": rope_type, **rope}
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            head_dim=hf.get("head_dim"),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=hf.get("initializer_range", 0.02),
        )
    except KeyError as e:
        raise ValueError(f"{source}: missing key {e.args[0]!r}") from None


def read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: safetensors (single or sharded) or pytorch_model.bin, never pickle."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            tensors: dict[str, torch.Tensor] = {}
            for filename in sorted(set(weight_map.values())):
                tensors.update(_read_weight_file(folder / filename))
            return tensors
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _read_weight_file(folder / name)
    raise FileNotFoundError(f"{folder}: no model.safetensors, sharded index or pytorch_model.bin")


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    # weights_only=True refuses arbitrary pickled objects: a checkpoint cannot run code on load.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_hf(
    path: str | Path,
    *,
    options: RunOptions | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> Llama:
    """Load a Hugging Face Llama folder (ours or anyone's) into our Llama.

    Folders written by export_hf get their exact model back (stable embedding included) from
    open_llama_config.json; others are read from config.json. `options` chooses how the model runs
    (attention kernel, fused kernels, activation checkpointing): a choice of the caller, not of the folder.
    """
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    ours_path = folder / OUR_CONFIG
    if ours_path.is_file():
        saved = json.loads(ours_path.read_text())
        # Exports written before the run options left ModelConfig carried them; they are not architecture.
        run_options = {f.name for f in dataclasses.fields(RunOptions)}
        config = ModelConfig.from_dict({k: v for k, v in saved.items() if k not in run_options})
    else:
        config = config_from_hf(json.loads(config_path.read_text()), str(config_path))

    tensors = read_hf_tensors(folder)
    tensors = {name: t for name, t in tensors.items() if not name.endswith("rotary_emb.inv_freq")}
    if ours_path.is_file() and config.stable_embedding:
        tensors.update(load_file(folder / OUR_EXTRA))  # the LayerNorm (and the raw embedding if untied)
        if config.tie_embeddings:  # the exported head holds the original, unfolded embedding
            tensors["model.embed_tokens.weight"] = tensors["lm_head.weight"]
    try:
        dtype = dtype or torch.get_default_dtype()
        return Llama.from_state_dict(config, tensors, options=options, dtype=dtype, device=device)
    except ValueError as exc:
        raise ValueError(f"{folder}: {exc}") from None
