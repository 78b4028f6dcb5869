"""The reference of preference tuning: which one a run uses (`reference:` section), and the cached one.

The reference is the frozen starting model. `copy` keeps a second copy beside the policy (the stage script
makes it), `adapter` is the LoRA policy with its adapters disabled (training/preference.py), and `cached`
computes its log-probabilities of every prepared pair in one pass before training (`cached_reference`),
kept in a file whose key is everything they depend on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson
import torch
from accelerate import Accelerator

from common.config import ConfigError
from common.files import write_atomic
from common.run_folder import checkpoint_folder
from dataset.preference_prepare import PreferenceDataConfig
from dataset.preference_stream import build_preference_loaders
from dataset.prepare import PreparedData
from dataset.tokenizer import Tokenizer
from models.llama import Llama
from training.config import TrainConfig
from training.lora import LoraConfig
from training.preference import PreferenceLossConfig, compute_reference_logps

CACHE_FILE = "reference_logps.pt"


@dataclasses.dataclass
class ReferenceConfig:
    """Where the reference model's log-probabilities come from (the `reference:` section)."""

    mode: Literal["auto", "copy", "adapter", "cached"] = "auto"
    """copy: a frozen second copy of the --init model beside the policy (sharded like it under ZeRO-3/FSDP);
    adapter: with LoRA, the policy with its adapters disabled (no second copy); cached: computed in one
    pass before training and kept in a file (no reference in memory while training); auto: adapter with
    LoRA, else copy. SimPO uses none."""
    cache_dir: str = ""
    """cached: where the file goes; empty = <train.output_dir>/reference. Its key is the model, the
    tokenizer, the template, the data and the precision: any change recomputes it."""


class PreferenceRunConfig(Protocol):
    """What the reference reads of a preference-tuning run's config (preference_tuning.DPOConfig)."""

    init: str
    data: PreferenceDataConfig
    loss: PreferenceLossConfig
    reference: ReferenceConfig
    lora: LoraConfig
    train: TrainConfig


def reference_mode(config: PreferenceRunConfig) -> str | None:
    """The reference the run uses (None: SimPO has none), checked against the LoRA settings."""
    if not config.loss.needs_reference:
        return None
    mode = config.reference.mode
    if mode == "auto":
        return "adapter" if config.lora.enabled else "copy"
    if mode == "adapter" and not config.lora.enabled:
        raise ConfigError("reference.mode adapter needs LoRA (lora.rank > 0); use copy or cached")
    return mode


def _model_identity(init: str) -> list[Any]:
    """What the --init model is, for the cache key: its folder's files with their sizes and modification
    times (cheap for 7B, unlike hashing the weights; rewriting the model changes them)."""
    folder = checkpoint_folder(init)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return [str(folder.resolve())] + [
        [str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in files
    ]


def cached_reference(
    config: PreferenceRunConfig,
    model: Llama,
    prepared: PreparedData,
    tokenizer: Tokenizer,
    accelerator: Accelerator,
) -> torch.Tensor:
    """The reference's [chosen, rejected] log-probabilities of every prepared pair, from the cache file when
    its key matches, else computed now (each rank a share of the pairs, then summed over ranks) and saved."""
    cache_dir = Path(config.reference.cache_dir or Path(config.train.output_dir) / "reference")
    key_inputs = {
        "model": _model_identity(config.init),
        "data": prepared.fingerprint,  # covers the sources, the tokenizer, the template and seq_len
        "packing": [config.data.packing, config.data.batch_size, config.data.pack_block],
        "precision": config.train.precision,
        "options": dataclasses.asdict(config.train.run_options()),
    }
    key = hashlib.sha256(orjson.dumps(key_inputs, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    path = cache_dir / CACHE_FILE
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == key:
            if accelerator.is_main_process:
                print(f"reference log-probabilities: cached in {path}", flush=True)
            return saved["logps"]
    world, rank = accelerator.num_processes, accelerator.process_index
    passes = build_preference_loaders(
        config.data, prepared, tokenizer.pad_id, rank=rank, world_size=world, every_pair=True
    )
    model.to(accelerator.device)
    table = torch.zeros((prepared.report["pairs"], 2), dtype=torch.float32)
    seen = torch.zeros(prepared.report["pairs"], dtype=torch.float32)
    try:
        for loader in passes:
            if loader is None:
                continue
            part = compute_reference_logps(
                model, loader, len(table), device=accelerator.device, autocast=accelerator.autocast
            )
            done = ~part[:, 0].isnan()
            table[done], seen[done] = part[done], seen[done] + 1
    finally:
        for loader in passes:
            if loader is not None:
                loader.close()
    if world > 1:
        table = accelerator.reduce(table.to(accelerator.device), reduction="sum").cpu()
        seen = accelerator.reduce(seen.to(accelerator.device), reduction="sum").cpu()
    if not bool((seen == 1).all()):
        raise RuntimeError(f"the reference pass saw {int((seen == 0).sum())} pairs never, some twice")
    if accelerator.is_main_process:
        cache_dir.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({"key": key, "inputs": key_inputs, "logps": table}, buffer)
        write_atomic(path, buffer.getvalue())
        print(
            f"reference log-probabilities of {len(table):,} pairs computed and cached in {path}", flush=True
        )
    accelerator.wait_for_everyone()
    return table
