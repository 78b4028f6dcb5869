"""What the stages that start from a model share (instruction and preference tuning): the starting model,
the final export (LoRA merged) and the chat samples logged while training."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from common.config import ConfigError
from dataset.chat_template import prompt_ids, stop_token_ids
from dataset.tokenizer import Tokenizer
from models.hf import export_hf
from models.llama import Llama, ModelConfig
from training.config import LoggingConfig, TrainConfig
from training.evaluation import Sampler
from training.loop import seed_everything
from training.lora import LoraConfig, peft_model_from_state, save_adapter
from training.pretrained import load_initial_model


class _DataSection(Protocol):
    tokenizer: str
    seq_len: int


class FineTuneConfig(Protocol):
    """The sections a fine-tuning stage's config has (SFTConfig, DPOConfig)."""

    init: str
    model: ModelConfig | None
    lora: LoraConfig
    train: TrainConfig
    logging: LoggingConfig

    @property
    def data(self) -> _DataSection: ...


def starting_model(config: FineTuneConfig, tokenizer: Tokenizer) -> Llama:
    """The model of --init (the model section, if given, must describe it), or a new one from the model
    section; checked against the tokenizer and the data's sequence length."""
    options = config.train.run_options()
    if config.init:
        model = load_initial_model(config.init, options=options)
        if config.model is not None and config.model != model.config:
            differ = [
                f"{f.name} {getattr(config.model, f.name)!r} vs {getattr(model.config, f.name)!r}"
                for f in dataclasses.fields(ModelConfig)
                if getattr(config.model, f.name) != getattr(model.config, f.name)
            ]
            raise ConfigError(
                f"the model section does not describe --init {config.init}: {', '.join(differ)}"
            )
    elif config.model is not None:
        shape = config.model
        if shape.vocab_size == 0:
            shape = dataclasses.replace(shape, vocab_size=tokenizer.vocab_size)
        seed_everything(config.train.seed)  # the same initial weights on every rank
        model = Llama(shape, options)
    else:
        raise ConfigError("no model: pass --init DIR (a model folder, a checkpoint or a run folder)")
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"the model's vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's "
            f"({tokenizer.vocab_size} at {config.data.tokenizer}): they do not belong together"
        )
    if config.data.seq_len > model.config.max_seq_len:
        raise ConfigError(
            f"data.seq_len {config.data.seq_len} is longer than the model's {model.config.max_seq_len}"
        )
    return model


def exporter(config: FineTuneConfig, tokenizer: Tokenizer) -> Callable[[dict[str, torch.Tensor], Path], None]:
    """The final export: LoRA adapters merged (and saved alone beside), the chat stop token listed."""
    out_dir = Path(config.train.output_dir)

    def export(state_dict: dict[str, torch.Tensor], hf_dir: Path) -> None:
        assert config.model is not None
        if config.lora.enabled:
            peft_model = peft_model_from_state(config.model, state_dict, config.lora)
            save_adapter(peft_model, out_dir / "adapter", base_model=config.init)
            print(f"saved the LoRA adapter alone to {out_dir / 'adapter'}", flush=True)
            merged = peft_model.merge_and_unload()
        else:
            merged = Llama.from_state_dict(config.model, state_dict)
        export_hf(
            merged, hf_dir, tokenizer_dir=config.data.tokenizer, stop_token_ids=stop_token_ids(tokenizer)
        )
        print(f"exported the final model in Hugging Face format to {hf_dir}", flush=True)

    return export


def chat_sampler(config: LoggingConfig, tokenizer: Tokenizer) -> Sampler:
    """Answers to logging.sample_prompts, each sent as a user turn through the chat template."""
    return Sampler(
        config.sample_prompts,
        encode=lambda prompt: prompt_ids(tokenizer, [{"role": "user", "content": prompt}]),
        decode=tokenizer.decode,
        stop_token_ids=stop_token_ids(tokenizer),
        every=config.sample_every,
        max_new_tokens=config.sample_max_new_tokens,
    )
