"""Pretrain a Llama model from jsonl.zst shards: config -> tokenizer -> model -> data stream -> shared loop.

    accelerate launch --config_file configs/accelerate/deepspeed_zero1.yaml pretrain_llama.py \
        --config configs/pretrain/7b.yaml
    python pretrain_llama.py --config configs/pretrain/demo.yaml --train.max_steps 50 --resume auto
    python pretrain_llama.py --config my_domain.yaml --init runs/demo/pretrain/hf   # continued pretraining

The model is new (the `model:` section's shape) or, with --init, an existing one to continue on more text.
What every stage shares (set-up, the loop, closing, exit status) is training/runner.py's; this file is the
config and the data. Every key of the YAML can be overridden as `--section.key value`; `--help` lists them
all. See docs/training.md.
"""

from __future__ import annotations

import dataclasses
import sys

from dataset.pretrain_dataset import (
    PretrainDataConfig,
    build_pretrain_dataloader,
    build_validation_dataloader,
)
from dataset.tokenizer import token_byte_lengths
from models.llama import ModelConfig
from training.config import EvalConfig, LoggingConfig, OptimConfig, TrainConfig
from training.finetune import exporter, text_sampler
from training.objectives import CausalLMObjective
from training.runner import Run, Stage, run_stage

PROG = "pretrain_llama.py"
SHARD_ERROR = (
    "a shard cannot be read: {}\n"
    "Fix or remove that shard, then continue from the last checkpoint with --resume auto."
)


@dataclasses.dataclass
class PretrainConfig:
    """A pretraining run: model shape, data, optimizer, loop settings and logging."""

    model: ModelConfig
    """The model: `preset: tiny|125m|350m|1b|7b` plus any ModelConfig field; vocab_size 0 = the tokenizer's.
    With --init it is filled in from that model, and the keys given in the file or on the command line must
    describe it."""
    data: PretrainDataConfig
    """Shards, tokenizer, sequence length, micro-batch size, mixture, held-out data."""
    init: str = ""
    """Continue pretraining this model instead of a new one: a Hugging Face Llama folder, a checkpoint of
    ours (step-N/) or a run folder; with its tokenizer unless data.tokenizer is set."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


def build(stage: Stage) -> Run:
    """The shards' training and held-out streams of this rank, the language-model objective."""
    config, tokenizer, acc = stage.config, stage.tokenizer, stage.accelerator
    rank, world = acc.process_index, acc.num_processes
    train_data = stage.opened(build_pretrain_dataloader(config.data, tokenizer, rank=rank, world_size=world))
    val_data = stage.opened(
        build_validation_dataloader(
            config.data, tokenizer, rank=rank, world_size=world, max_batches=config.train.eval_batches
        )
    )
    stage.report(stage.model)
    return Run(
        stage.model,
        train_data,
        CausalLMObjective(token_bytes=token_byte_lengths(tokenizer)),  # bits per byte beside the loss
        val_data,
        sampler=text_sampler(config.logging, tokenizer),
        export=exporter(config, tokenizer, chat=False),
        unreadable=SHARD_ERROR,
    )


def main(argv: list[str] | None = None) -> int:
    return run_stage(PROG, PretrainConfig, build, argv)


if __name__ == "__main__":
    sys.exit(main())
