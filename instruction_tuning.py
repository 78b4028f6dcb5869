"""Instruction tuning (SFT): a model from --init, chat data through the chat template, the shared loop.

    accelerate launch --config_file configs/accelerate/deepspeed_zero1.yaml instruction_tuning.py \\
        --config configs/sft/7b.yaml
    python instruction_tuning.py --config configs/sft/demo.yaml --lora.rank 16 --resume auto

Only assistant turns (with their <|end|>) are trained; see what is trained with
`python dataset/chat_preview.py --config configs/sft/demo.yaml`. The final model is exported to
<output_dir>/hf (a plain Llama folder with the chat template; LoRA adapters merged in), and with LoRA the
adapter alone to <output_dir>/adapter. What every stage shares (set-up, LoRA, the loop, closing, exit status)
is training/runner.py's. Every key of the YAML can be overridden as `--section.key value`; `--help` lists
them all. See docs/instruction_tuning.md.
"""

from __future__ import annotations

import dataclasses
import math
import sys

from jsonargparse.typing import NonNegativeFloat

from dataset.chat_prepare import ChatDataConfig, format_report, prepare_chat_data
from dataset.chat_stream import build_chat_loaders
from dataset.prepare import PreparedData
from dataset.tokenizer import token_byte_lengths
from models.llama import ModelConfig
from training.config import EvalConfig, LoggingConfig, OptimConfig, TrainConfig
from training.finetune import chat_sampler, exporter
from training.lora import LoraConfig
from training.neftune import add_neftune
from training.objectives import CausalLMObjective
from training.runner import Run, Stage, run_stage

PROG = "instruction_tuning.py"


@dataclasses.dataclass
class SFTConfig:
    """An instruction-tuning run: the starting model, chat data, LoRA, optimizer, loop settings, logging."""

    data: ChatDataConfig
    """Instruction data (files or hf:DATASET), tokenizer, sequence length, packing, micro-batch size."""
    init: str = ""
    """The model to fine-tune: a Hugging Face Llama folder, a checkpoint of ours (step-N/) or a run folder."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Filled in from --init and saved with every checkpoint, so a later stage can rebuild the model; the
    keys given in the file or on the command line must describe --init."""
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    neftune_alpha: NonNegativeFloat = 0.0
    """NEFTune: noise of this scale on the input embeddings while training (the paper's 5); 0 = off."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(output_dir="runs/sft"))
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


def steps_per_pass(prepared: PreparedData, config: SFTConfig, rows_per_step: int) -> int:
    """About how many optimizer steps one pass over the training conversations takes."""
    sources = prepared.report["sources"].values()
    if config.data.packing == "pad":
        rows = sum(s["kept"] for s in sources)
    else:  # best-fit fills rows to within a few percent
        rows = sum(s["tokens"] for s in sources) / (0.97 * config.data.seq_len)
    return max(1, math.ceil(rows / rows_per_step))


def build(stage: Stage) -> Run:
    """The prepared conversations' loaders, NEFTune and LoRA, the language-model objective on the answers."""
    config, tokenizer = stage.config, stage.tokenizer
    prepared, train_data, val_data = stage.prepare_data(prepare_chat_data, build_chat_loaders)
    add_neftune(stage.model, config.neftune_alpha)  # hooks on our Llama: they stay when LoRA wraps it
    model = stage.with_lora()
    stage.print(format_report(prepared.report))
    passes = steps_per_pass(prepared, config, stage.rows_per_step)
    stage.report(model, end=f"one pass over the data is about {passes:,} steps")
    return Run(
        model,
        train_data,
        CausalLMObjective(token_accuracy=True, token_bytes=token_byte_lengths(tokenizer)),
        val_data,
        sampler=chat_sampler(config.logging, tokenizer),
        export=exporter(config, tokenizer, chat=True),
    )


def main(argv: list[str] | None = None) -> int:
    return run_stage(PROG, SFTConfig, build, argv, needs_init=True)


if __name__ == "__main__":
    sys.exit(main())
