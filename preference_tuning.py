"""Preference tuning (the RLHF stage): DPO and its variants from an --init model, on the shared loop.

    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml preference_tuning.py \\
        --config configs/dpo/7b.yaml
    python preference_tuning.py --config configs/dpo/demo.yaml --loss.type ipo --resume auto

Each pair's prompt and answers go through the chat template (see what is trained with
`python dataset/preference_data.py --config configs/dpo/demo.yaml`); the loss (`loss.type`: dpo, cdpo,
ipo, simpo) compares the policy's summed answer log-probabilities with the reference's, the frozen
starting model (`reference.mode`: a prepared copy, the LoRA model with its adapters disabled, or
log-probabilities cached in one pass before training). Before the first update the policy equals the
reference, which is checked (loss ln 2, every reward 0, for DPO). The final model is exported to
<output_dir>/hf, metrics go to <output_dir>/metrics.jsonl. `--help` lists every key. See
docs/preference_tuning.md.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import logging
import sys
from pathlib import Path
from typing import Any

import orjson
import torch
from accelerate import Accelerator

from common.config import ConfigError, parse_config
from common.files import write_atomic
from data.shard_io import ShardError
from dataset.chat_data import PreparedData
from dataset.chat_dataset import find_tokenizer
from dataset.preference_data import (
    PreferenceDataConfig,
    PreferenceLoader,
    build_preference_loaders,
    format_report,
    prepare_preference_data,
)
from dataset.tokenizer import Tokenizer, token_byte_lengths
from models.llama import Llama, ModelConfig
from training.checkpoint import LATEST, CheckpointError
from training.config import LoggingConfig, OptimConfig, TrainConfig
from training.distributed import build_accelerator
from training.finetune import chat_sampler, exporter, starting_model
from training.loop import NonFiniteLossError, finish_run, seed_everything, train
from training.lora import LoraConfig, add_lora, checkpoint_trainable_only
from training.preference import (
    REFERENCE_MODES,
    PreferenceLossConfig,
    PreferenceObjective,
    ReferenceMismatchError,
    compute_reference_logps,
)
from training.pretrained import checkpoint_folder

PROG = "preference_tuning.py"
CACHE_FILE = "reference_logps.pt"


@dataclasses.dataclass
class ReferenceConfig:
    """Where the reference model's log-probabilities come from (the `reference:` section)."""

    mode: str = "auto"
    """copy: a frozen second copy of the --init model beside the policy (sharded like it under ZeRO-3/FSDP);
    adapter: with LoRA, the policy with its adapters disabled (no second copy); cached: computed in one
    pass before training and kept in a file (no reference in memory while training); auto: adapter with
    LoRA, else copy. SimPO uses none."""
    cache_dir: str = ""
    """cached: where the file goes; empty = <train.output_dir>/reference. Its key is the model, the
    tokenizer, the template, the data and the precision: any change recomputes it."""

    def __post_init__(self) -> None:
        if self.mode not in REFERENCE_MODES:
            raise ValueError(f"reference mode must be one of {', '.join(REFERENCE_MODES)}, got {self.mode!r}")


@dataclasses.dataclass
class DPOConfig:
    """A preference-tuning run: the starting model, pairs, loss, reference, LoRA, optimizer, loop, logging."""

    data: PreferenceDataConfig
    """Preference pairs (files or hf:DATASET), tokenizer, row length, packing, micro-batch size."""
    init: str = ""
    """The model to tune (and the reference): a Hugging Face Llama folder, a checkpoint of ours or a run
    folder, usually the instruction-tuned model's export."""
    model: ModelConfig | None = None
    """Filled in from --init and saved with every checkpoint, so a later stage can rebuild the model; if
    given, it must describe --init."""
    loss: PreferenceLossConfig = dataclasses.field(default_factory=PreferenceLossConfig)
    reference: ReferenceConfig = dataclasses.field(default_factory=ReferenceConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=5e-7, warmup_steps=10))
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(output_dir="runs/dpo"))
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


def reference_mode(config: DPOConfig) -> str | None:
    """The reference the run uses (None: SimPO has none), checked against the LoRA settings."""
    if not config.loss.needs_reference:
        return None
    mode = config.reference.mode
    if mode == "auto":
        return "adapter" if config.lora.enabled else "copy"
    if mode == "adapter" and not config.lora.enabled:
        raise ConfigError("reference.mode adapter needs LoRA (lora.rank > 0); use copy or cached")
    return mode


def prepare_data(
    config: DPOConfig, tokenizer: Tokenizer, accelerator: Accelerator
) -> tuple[PreparedData, PreferenceLoader, PreferenceLoader | None]:
    """The prepared pairs (the main process prepares them, the others then find them ready) and this
    rank's training and held-out loaders."""
    cache_dir = config.data.cache_dir or str(Path(config.train.output_dir) / "data")
    with accelerator.main_process_first():
        log = print if accelerator.is_main_process else _quiet
        prepared = prepare_preference_data(config.data, tokenizer, config.data.tokenizer, cache_dir, log=log)
    world = accelerator.num_processes
    train_data, val_data = build_preference_loaders(
        config.data,
        prepared,
        tokenizer.pad_id,
        rank=accelerator.process_index,
        world_size=world,
        rows_per_step=config.data.batch_size * config.train.grad_accum_steps * world,
        eval_batches=config.train.eval_batches,
    )
    return prepared, train_data, val_data


def _model_identity(init: str) -> list[Any]:
    """What the --init model is, for the cache key: its folder's files with their sizes and modification
    times (cheap for 7B, unlike hashing the weights; rewriting the model changes them)."""
    folder = checkpoint_folder(init)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return [str(folder.resolve())] + [
        [str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in files
    ]


def cached_reference(
    config: DPOConfig, model: Llama, prepared: PreparedData, tokenizer: Tokenizer, accelerator: Accelerator
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


def will_resume(config: DPOConfig) -> bool:
    """True when the loop will continue a checkpoint (the policy has moved: no step-0 check then)."""
    resume = config.train.resume
    return bool(resume) and (resume != "auto" or (Path(config.train.output_dir) / LATEST).is_file())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        config = parse_config(DPOConfig, argv, aliases={"resume": "train.resume"}, prog=PROG)
        if not config.init:
            raise ConfigError("no model: pass --init DIR (the instruction-tuned model, usually)")
        mode = reference_mode(config)
        config.data.tokenizer = find_tokenizer(config.data.tokenizer, config.init)
        tokenizer = Tokenizer.load(config.data.tokenizer)
        Path(config.train.output_dir).mkdir(parents=True, exist_ok=True)  # unwritable: fail before any work
        accelerator = build_accelerator(config.train)
        model = starting_model(config, tokenizer)
        config.model = model.config  # saved with every checkpoint: a later stage rebuilds the model from it
        prepared, train_data, val_data = prepare_data(config, tokenizer, accelerator)
        cache = (
            cached_reference(config, model, prepared, tokenizer, accelerator) if mode == "cached" else None
        )
    except (ConfigError, OSError, ValueError, ShardError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    frozen = {"reference": copy.deepcopy(model)} if mode == "copy" else {}
    base_params = model.num_parameters()
    if config.lora.enabled:
        seed_everything(config.train.seed)  # the adapters' initial values: the same in every run and rank
        model = add_lora(model, config.lora)
        checkpoint_trainable_only(accelerator)
    objective = PreferenceObjective(
        config.loss,
        mode,
        cache=cache,
        token_bytes=torch.tensor(token_byte_lengths(tokenizer), dtype=torch.float32),
        check_first_call=not will_resume(config),
    )
    if accelerator.is_main_process:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        how = f"LoRA rank {config.lora.rank}" if config.lora.enabled else "full fine-tuning"
        print(format_report(prepared.report), flush=True)
        print(
            f"model: {base_params:,} parameters; training {trainable:,} ({how}); loss {config.loss.type} "
            f"(beta {config.loss.beta}); reference: {mode or 'none'}; {accelerator.num_processes} process(es) "
            f"x {config.data.batch_size} rows x {config.data.seq_len} tokens x {config.train.grad_accum_steps} "
            "accumulation steps per optimizer step",
            flush=True,
        )
    try:
        result = train(
            model,
            train_data,
            objective,
            config=config,
            accelerator=accelerator,
            val_data=val_data,
            frozen=frozen,
            sampler=chat_sampler(config.logging, tokenizer),
            export=exporter(config, tokenizer),
        )
    except (NonFiniteLossError, CheckpointError, ReferenceMismatchError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except ShardError as exc:
        print(f"{PROG}: error: prepared data cannot be read: {exc}", file=sys.stderr)
        return 1
    finally:
        train_data.close()
        if val_data is not None:
            val_data.close()
    finish_run(accelerator, result)
    return 0


def _quiet(*_args: object) -> None:
    pass


if __name__ == "__main__":
    sys.exit(main())
