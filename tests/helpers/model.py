"""The tiny Llama shape the tests build; a test names only the fields it varies."""

from __future__ import annotations

from models.llama import ModelConfig

TINY_MODEL = {"vocab_size": 211, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128}


def tiny_model_config(**overrides) -> ModelConfig:
    """Two layers of width 64, four query heads sharing two key/value heads; `overrides` replace fields."""
    return ModelConfig(**{**TINY_MODEL, **overrides})
