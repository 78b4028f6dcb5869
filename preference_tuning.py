"""Preference tuning (the RLHF stage): DPO and its variants from an --init model, on the shared loop.

    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml preference_tuning.py \\
        --config configs/dpo/7b.yaml
    python preference_tuning.py --config configs/dpo/demo.yaml --loss.type ipo --resume auto

Each pair's prompt and answers go through the chat template (see what is trained with
`python dataset/preference_preview.py --config configs/dpo/demo.yaml`); the loss (`loss.type`: dpo, cdpo,
ipo, simpo) compares the policy's summed answer log-probabilities with the reference's, the frozen
starting model (`reference.mode`: a prepared copy, the LoRA model with its adapters disabled, or
log-probabilities cached in one pass before training). Before the first update the policy equals the
reference, which is checked (loss ln 2, every reward 0, for DPO). The final model is exported to
<output_dir>/hf, metrics go to <output_dir>/metrics.jsonl. The reference's modes and cached pass are
training/reference.py's; what every stage shares (set-up, LoRA, the loop, closing, exit status) is
training/runner.py's. `--help` lists every key. See docs/preference_tuning.md.
"""

from __future__ import annotations

import copy
import dataclasses
import sys

import torch

from dataset.preference_prepare import PreferenceDataConfig, format_report, prepare_preference_data
from dataset.preference_stream import build_preference_loaders
from dataset.tokenizer import token_byte_lengths
from models.llama import ModelConfig
from training.checkpoint import will_resume
from training.config import EvalConfig, LoggingConfig, OptimConfig, TrainConfig
from training.finetune import chat_sampler, exporter
from training.lora import LoraConfig
from training.preference import PreferenceLossConfig, PreferenceObjective
from training.reference import ReferenceConfig, cached_reference, reference_mode
from training.runner import Run, Stage, run_stage

PROG = "preference_tuning.py"


@dataclasses.dataclass
class DPOConfig:
    """A preference-tuning run: the starting model, pairs, loss, reference, LoRA, optimizer, loop, logging."""

    data: PreferenceDataConfig
    """Preference pairs (files or hf:DATASET), tokenizer, row length, packing, micro-batch size."""
    init: str = ""
    """The model to tune (and the reference): a Hugging Face Llama folder, a checkpoint of ours or a run
    folder, usually the instruction-tuned model's export."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Filled in from --init and saved with every checkpoint, so a later stage can rebuild the model; the
    keys given in the file or on the command line must describe --init."""
    loss: PreferenceLossConfig = dataclasses.field(default_factory=PreferenceLossConfig)
    reference: ReferenceConfig = dataclasses.field(default_factory=ReferenceConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=5e-7, warmup_steps=10))
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(output_dir="runs/dpo"))
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


def build(stage: Stage) -> Run:
    """The prepared pairs' loaders, the reference (a frozen copy, the adapters off, or a cached pass), LoRA,
    the preference objective."""
    config, tokenizer = stage.config, stage.tokenizer
    mode = reference_mode(config)
    prepared, train_data, val_data = stage.prepare_data(prepare_preference_data, build_preference_loaders)
    cache = None
    if mode == "cached":
        cache = cached_reference(config, stage.model, prepared, tokenizer, stage.accelerator)
    frozen = {"reference": copy.deepcopy(stage.model)} if mode == "copy" else {}
    model = stage.with_lora()
    objective = PreferenceObjective(
        config.loss,
        mode,
        cache=cache,
        token_bytes=torch.tensor(token_byte_lengths(tokenizer), dtype=torch.float32),
        check_first_call=not will_resume(config.train),  # a resumed policy has moved off the reference
    )
    stage.print(format_report(prepared.report))
    stage.report(model, f"loss {config.loss.type} (beta {config.loss.beta})", f"reference: {mode or 'none'}")
    return Run(
        model,
        train_data,
        objective,
        val_data,
        frozen=frozen,
        sampler=chat_sampler(config.logging, tokenizer),
        export=exporter(config, tokenizer, chat=True),
    )


def main(argv: list[str] | None = None) -> int:
    return run_stage(PROG, DPOConfig, build, argv, needs_init=True, check=reference_mode)


if __name__ == "__main__":
    sys.exit(main())
