"""What a run folder tells later stages: its newest checkpoint and the tokenizer it was trained with, read
by every layer that takes a model, run or checkpoint folder.

training/checkpoint.py writes `step-N/` folders (complete once they hold `trainer_state.json`) and the
`latest` file naming the newest; the stages' `--init`, the tokenizer of a run and the preference reference
cache resolve a run folder through `checkpoint_folder`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

LATEST = "latest"


def checkpoint_folder(path: str | Path) -> Path:
    """`path` itself, or the checkpoint a run folder's `latest` pointer names."""
    folder = Path(path)
    if (folder / LATEST).is_file():  # (DeepSpeed also writes a `latest` file, inside a checkpoint)
        named = folder / (folder / LATEST).read_text().strip()
        if (named / "trainer_state.json").is_file():
            return named
    return folder


def find_tokenizer(tokenizer: str, init: str) -> str:
    """The tokenizer folder of a run: `data.tokenizer` when set, else the --init model's: an exported folder
    holds one; a checkpoint of ours (or a run folder, through its `latest`) names it in its config.yaml."""
    if tokenizer:
        return tokenizer
    if not init:
        raise ValueError("no tokenizer: set data.tokenizer, or --init a model folder that has one")
    if (Path(init) / "tokenizer.model").is_file():
        return str(Path(init))
    saved = checkpoint_folder(init) / "config.yaml"
    if saved.is_file():
        named = ((yaml.safe_load(saved.read_text()) or {}).get("data") or {}).get("tokenizer")
        if named:
            return str(named)
    raise ValueError(
        f"{init}: no tokenizer.model there and no data.tokenizer in its config.yaml; set data.tokenizer"
    )
