"""Pretrain a Llama model from jsonl.zst shards: config -> tokenizer -> data stream -> model -> shared loop.

    accelerate launch --config_file configs/accelerate/deepspeed_zero1.yaml pretrain_llama.py \
        --config configs/pretrain/7b.yaml
    python pretrain_llama.py --config configs/pretrain/demo.yaml --train.max_steps 50 --resume auto

Every key of the YAML can be overridden as `--section.key value`; `--help` lists them all. See
docs/training.md.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import torch

from common.config import ConfigError, parse_config
from data.shard_io import ShardError
from dataset.pretrain_dataset import (
    PretrainDataConfig,
    build_pretrain_dataloader,
    build_validation_dataloader,
)
from dataset.tokenizer import Tokenizer, token_byte_lengths
from models.hf import export_hf
from models.llama import Llama, ModelConfig
from training.checkpoint import CheckpointError
from training.config import LoggingConfig, OptimConfig, TrainConfig
from training.distributed import build_accelerator
from training.evaluation import Sampler
from training.loop import NonFiniteLossError, finish_run, seed_everything, train
from training.objectives import CausalLMObjective


@dataclasses.dataclass
class PretrainConfig:
    """A pretraining run: model shape, data, optimizer, loop settings and logging."""

    model: ModelConfig
    """The model: `preset: tiny|125m|350m|1b|7b` plus any ModelConfig field; vocab_size 0 = the tokenizer's."""
    data: PretrainDataConfig
    """Shards, tokenizer, sequence length, micro-batch size, mixture, held-out data."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


def resolve_model_config(model: ModelConfig, tokenizer: Tokenizer, seq_len: int) -> ModelConfig:
    """Take the vocabulary size from the tokenizer (when 0) and check the shapes agree with the data."""
    if model.vocab_size == 0:
        model = dataclasses.replace(model, vocab_size=tokenizer.vocab_size)
    if model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size {model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
            "(set it to 0 to take the tokenizer's)"
        )
    if seq_len > model.max_seq_len:
        raise ConfigError(f"data.seq_len {seq_len} is longer than model.max_seq_len {model.max_seq_len}")
    return model


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per file saved is too chatty
    try:
        config = parse_config(
            PretrainConfig, argv, aliases={"resume": "train.resume"}, prog="pretrain_llama.py"
        )
        if not config.data.tokenizer:
            raise ConfigError("data.tokenizer is required (a folder written by dataset/train_tokenizer.py)")
        tokenizer = Tokenizer.load(config.data.tokenizer)
        config.model = resolve_model_config(config.model, tokenizer, config.data.seq_len)
        Path(config.train.output_dir).mkdir(parents=True, exist_ok=True)  # unwritable: fail before any work
        accelerator = build_accelerator(config.train)
        rank, world = accelerator.process_index, accelerator.num_processes
        train_data = build_pretrain_dataloader(config.data, tokenizer, rank=rank, world_size=world)
        val_data = build_validation_dataloader(
            config.data, tokenizer, rank=rank, world_size=world, max_batches=config.train.eval_batches
        )
    except (ConfigError, OSError, ValueError) as exc:  # OSError: missing files, an unwritable output_dir
        print(f"pretrain_llama.py: error: {exc}", file=sys.stderr)
        return 2

    seed_everything(config.train.seed)  # the same initial weights on every rank
    model = Llama(config.model, config.train.run_options())
    if accelerator.is_main_process:
        print(
            f"model: {model.num_parameters():,} parameters; {world} process(es) x "
            f"{config.data.batch_size} x {config.data.seq_len} tokens x {config.train.grad_accum_steps} "
            "accumulation steps per optimizer step",
            flush=True,
        )

    def export(state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        export_hf(
            Llama.from_state_dict(config.model, state_dict), out_dir, tokenizer_dir=config.data.tokenizer
        )
        print(f"exported the final model in Hugging Face format to {out_dir}", flush=True)

    try:
        result = train(
            model,
            train_data,
            CausalLMObjective(token_bytes=token_byte_lengths(tokenizer)),  # bits per byte beside the loss
            config=config,
            accelerator=accelerator,
            val_data=val_data,
            sampler=Sampler(
                config.logging.sample_prompts,
                encode=lambda prompt: tokenizer.encode(prompt, bos=True),
                decode=tokenizer.decode,
                stop_token_ids=[tokenizer.eos_id],
                every=config.logging.sample_every,
                max_new_tokens=config.logging.sample_max_new_tokens,
            ),
            export=export,
        )
    except (NonFiniteLossError, CheckpointError) as exc:
        print(f"pretrain_llama.py: error: {exc}", file=sys.stderr)
        return 1
    except ShardError as exc:
        # The loader's worker processes hand the exception over as it was raised (concurrent.futures),
        # so its message is the shard's file:line and what is wrong there.
        print(
            f"pretrain_llama.py: error: a shard cannot be read: {exc}\n"
            "Fix or remove that shard, then continue from the last checkpoint with --resume auto.",
            file=sys.stderr,
        )
        return 1
    finally:
        train_data.close()
        if val_data is not None:
            val_data.close()
    finish_run(accelerator, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
