"""Instruction tuning (SFT): a model from --init, chat data through the chat template, the shared loop.

    accelerate launch --config_file configs/accelerate/deepspeed_zero1.yaml instruction_tuning.py \\
        --config configs/sft/7b.yaml
    python instruction_tuning.py --config configs/sft/demo.yaml --lora.rank 16 --resume auto

Only assistant turns (with their <|end|>) are trained; see what is trained with
`python dataset/chat_dataset.py --config configs/sft/demo.yaml`. The final model is exported to
<output_dir>/hf (a plain Llama folder with the chat template; LoRA adapters merged in), and with LoRA the
adapter alone to <output_dir>/adapter. Every key of the YAML can be overridden as `--section.key value`;
`--help` lists them all. See docs/instruction_tuning.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from pathlib import Path

from accelerate import Accelerator

from common.config import ConfigError, parse_config
from data.shard_io import ShardError
from dataset.chat_data import ChatDataConfig, PreparedData, format_report, prepare_chat_data
from dataset.chat_dataset import ChatLoader, build_chat_loaders, find_tokenizer
from dataset.tokenizer import Tokenizer, token_byte_lengths
from models.llama import ModelConfig
from training.checkpoint import CheckpointError
from training.config import LoggingConfig, OptimConfig, TrainConfig
from training.distributed import build_accelerator
from training.finetune import chat_sampler, exporter, starting_model
from training.loop import NonFiniteLossError, finish_run, seed_everything, train
from training.lora import LoraConfig, add_lora, checkpoint_trainable_only
from training.neftune import add_neftune
from training.objectives import CausalLMObjective

PROG = "instruction_tuning.py"
NO_MODEL = "no model: pass --init DIR (a model folder, a checkpoint or a run folder), or give a model section"


@dataclasses.dataclass
class SFTConfig:
    """An instruction-tuning run: the starting model, chat data, LoRA, optimizer, loop settings, logging."""

    data: ChatDataConfig
    """Instruction data (files or hf:DATASET), tokenizer, sequence length, packing, micro-batch size."""
    init: str = ""
    """The model to fine-tune: a Hugging Face Llama folder, a checkpoint of ours (step-N/) or a run folder."""
    model: ModelConfig | None = None
    """Without --init: a new model of this shape (preset plus fields; vocab_size 0 = the tokenizer's). With
    --init it is filled in from the model and saved, so a later stage can rebuild it."""
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    neftune_alpha: float = 0.0
    """NEFTune: noise of this scale on the input embeddings while training (the paper's 5); 0 = off."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(output_dir="runs/sft"))
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


def steps_per_pass(prepared: PreparedData, config: SFTConfig, world_size: int) -> int:
    """About how many optimizer steps one pass over the training conversations takes."""
    sources = prepared.report["sources"].values()
    rows_per_step = config.data.batch_size * config.train.grad_accum_steps * world_size
    if config.data.packing == "pad":
        rows = sum(s["kept"] for s in sources)
    else:  # best-fit fills rows to within a few percent
        rows = sum(s["tokens"] for s in sources) / (0.97 * config.data.seq_len)
    return max(1, math.ceil(rows / rows_per_step))


def prepare_data(
    config: SFTConfig, tokenizer: Tokenizer, accelerator: Accelerator
) -> tuple[PreparedData, ChatLoader, ChatLoader | None]:
    """The prepared data (the main process prepares it, the others then find it ready) and this rank's
    training and held-out loaders."""
    cache_dir = config.data.cache_dir or str(Path(config.train.output_dir) / "data")
    with accelerator.main_process_first():
        log = print if accelerator.is_main_process else _quiet
        prepared = prepare_chat_data(config.data, tokenizer, config.data.tokenizer, cache_dir, log=log)
    world = accelerator.num_processes
    train_data, val_data = build_chat_loaders(
        config.data,
        prepared,
        tokenizer.pad_id,
        rank=accelerator.process_index,
        world_size=world,
        rows_per_step=config.data.batch_size * config.train.grad_accum_steps * world,
        eval_batches=config.train.eval_batches,
    )
    return prepared, train_data, val_data


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        config = parse_config(SFTConfig, argv, aliases={"resume": "train.resume"}, prog=PROG)
        if not config.init and config.model is None:
            raise ConfigError(NO_MODEL)
        config.data.tokenizer = find_tokenizer(config.data.tokenizer, config.init)
        tokenizer = Tokenizer.load(config.data.tokenizer)
        Path(config.train.output_dir).mkdir(parents=True, exist_ok=True)  # unwritable: fail before any work
        accelerator = build_accelerator(config.train)
        model = starting_model(config, tokenizer)
        config.model = model.config  # saved with every checkpoint: a later stage rebuilds the model from it
        prepared, train_data, val_data = prepare_data(config, tokenizer, accelerator)
    except (ConfigError, OSError, ValueError, ShardError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    add_neftune(model, config.neftune_alpha)  # hooks on our Llama: they stay when LoRA wraps it
    base_params = model.num_parameters()
    if config.lora.enabled:
        seed_everything(config.train.seed)  # the adapters' initial values: the same in every run and rank
        model = add_lora(model, config.lora)
        checkpoint_trainable_only(accelerator)
    world = accelerator.num_processes
    if accelerator.is_main_process:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        how = f"LoRA rank {config.lora.rank}" if config.lora.enabled else "full fine-tuning"
        print(format_report(prepared.report), flush=True)
        print(
            f"model: {base_params:,} parameters; training {trainable:,} ({how}); {world} process(es) x "
            f"{config.data.batch_size} rows x {config.data.seq_len} tokens x {config.train.grad_accum_steps} "
            f"accumulation steps per optimizer step; one pass over the data is about "
            f"{steps_per_pass(prepared, config, world):,} steps",
            flush=True,
        )
    try:
        result = train(
            model,
            train_data,
            CausalLMObjective(token_accuracy=True, token_bytes=token_byte_lengths(tokenizer)),
            config=config,
            accelerator=accelerator,
            val_data=val_data,
            sampler=chat_sampler(config.logging, tokenizer),
            export=exporter(config, tokenizer),
        )
    except (NonFiniteLossError, CheckpointError) as exc:
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
