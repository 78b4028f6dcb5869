"""What the stages share about their model: the starting model (a new one, or --init's), the final export
(LoRA merged) and the samples logged while training (plain text, or chat turns)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from common.config import ConfigError, given_keys
from dataset.chat_template import prompt_ids, stop_token_ids
from dataset.tokenizer import Tokenizer
from models.hf import export_hf
from models.llama import Llama, ModelConfig
from training.config import LoggingConfig, TrainConfig
from training.evaluation import Sampler
from training.loop import seed_everything
from training.lora import LoraConfig, peft_model_from_state, save_adapter
from training.pretrained import load_initial_model
from training.report import model_card, run_name


class _DataSection(Protocol):
    tokenizer: str
    seq_len: int


class StageConfig(Protocol):
    """What `starting_model` reads of a stage's config (PretrainConfig, SFTConfig, DPOConfig)."""

    init: str
    model: ModelConfig
    train: TrainConfig
    logging: LoggingConfig

    @property
    def data(self) -> _DataSection: ...


class FineTuneConfig(StageConfig, Protocol):
    """The sections a fine-tuning stage's config has (SFTConfig, DPOConfig)."""

    lora: LoraConfig


def starting_model(config: StageConfig, tokenizer: Tokenizer) -> Llama:
    """The model of --init (see check_model_section), or a new one of the model section's shape (vocab_size
    0: the tokenizer's); checked against the tokenizer and the data's sequence length. `config.model`
    becomes the model's: saved with every checkpoint, it lets a later stage rebuild the model."""
    options = config.train.run_options()
    if config.init:
        model = load_initial_model(config.init, options=options)
        check_model_section(config, model.config)
    else:
        shape = config.model
        if shape.vocab_size == 0:
            shape = dataclasses.replace(shape, vocab_size=tokenizer.vocab_size)
        seed_everything(config.train.seed)  # the same initial weights on every rank
        model = Llama(shape, options)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"the model's vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's "
            f"({tokenizer.vocab_size} at {config.data.tokenizer}): they do not belong together"
        )
    if config.data.seq_len > model.config.max_seq_len:
        raise ConfigError(
            f"data.seq_len {config.data.seq_len} is longer than the model's {model.config.max_seq_len}"
        )
    config.model = model.config
    return model


def check_model_section(config: StageConfig, init_model: ModelConfig) -> None:
    """The model keys that the run's file or command line set (a preset named there included) must
    describe the --init model: a ConfigError names the fields that differ. vocab_size 0 (the tokenizer's)
    fits any model."""
    given = {key.removeprefix("model.") for key in given_keys(config) if key.startswith("model.")}
    differ = [
        f"{f.name} {getattr(config.model, f.name)!r} vs {getattr(init_model, f.name)!r}"
        for f in dataclasses.fields(ModelConfig)
        if f.name in given
        and getattr(config.model, f.name) != getattr(init_model, f.name)
        and not (f.name == "vocab_size" and config.model.vocab_size == 0)
    ]
    if differ:
        raise ConfigError(f"the model section does not describe --init {config.init}: {', '.join(differ)}")


def exporter(
    config: StageConfig, tokenizer: Tokenizer, *, chat: bool
) -> Callable[[dict[str, torch.Tensor], Path], None]:
    """The final export: the model and its tokenizer, the run's name and model card (training/report.py);
    with LoRA (a config with a `lora` section) the adapters merged in and saved alone beside; for a `chat`
    model the chat template's stop token listed."""
    out_dir = Path(config.train.output_dir)
    lora: LoraConfig | None = getattr(config, "lora", None)

    def export(state_dict: dict[str, torch.Tensor], hf_dir: Path) -> None:
        if lora is not None and lora.enabled:
            peft_model = peft_model_from_state(config.model, state_dict, lora)
            save_adapter(peft_model, out_dir / "adapter", base_model=config.init)
            print(f"saved the LoRA adapter alone to {out_dir / 'adapter'}", flush=True)
            merged = peft_model.merge_and_unload()
        else:
            merged = Llama.from_state_dict(config.model, state_dict)
        stops = stop_token_ids(tokenizer) if chat else ()
        # The loop exports after the run's metrics are complete: the card has the run's figures.
        export_hf(
            merged,
            hf_dir,
            tokenizer_dir=config.data.tokenizer,
            stop_token_ids=stops,
            name=run_name(out_dir, config.logging.wandb_run_name),
            card=model_card(out_dir),
        )
        print(f"exported the final model in Hugging Face format to {hf_dir}", flush=True)

    return export


def text_sampler(config: LoggingConfig, tokenizer: Tokenizer) -> Sampler:
    """Continuations of logging.sample_prompts, each a plain text after <s> (pretraining)."""
    return Sampler(
        config.sample_prompts,
        encode=lambda prompt: tokenizer.encode(prompt, bos=True),
        decode=tokenizer.decode,
        stop_token_ids=[tokenizer.eos_id],
        every=config.sample_every,
        max_new_tokens=config.sample_max_new_tokens,
    )


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
