"""A run folder's pointer to its newest checkpoint, read by every layer that takes a run or checkpoint folder.

training/checkpoint.py writes `step-N/` folders (complete once they hold `trainer_state.json`) and the
`latest` file naming the newest; the stages' `--init`, the tokenizer of a run and the preference reference
cache resolve a run folder through `checkpoint_folder`.
"""

from __future__ import annotations

from pathlib import Path

LATEST = "latest"


def checkpoint_folder(path: str | Path) -> Path:
    """`path` itself, or the checkpoint a run folder's `latest` pointer names."""
    folder = Path(path)
    if (folder / LATEST).is_file():  # (DeepSpeed also writes a `latest` file, inside a checkpoint)
        named = folder / (folder / LATEST).read_text().strip()
        if (named / "trainer_state.json").is_file():
            return named
    return folder
