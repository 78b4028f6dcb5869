"""The tokenizer an evaluation encodes with: the model folder's own Hugging Face tokenizer, ours or another's.

A Hugging Face folder carries its tokenizer (tokenizer.json / tokenizer_config.json); a checkpoint or run
folder of ours names the one it trained with (`data.tokenizer` in its config.yaml). Text is encoded as plain
text: no special tokens added (the caller puts <s> first, as OLMo does) and the spelling of a control
token ("<s>", "<|user|>") in a task's text stays text, as everywhere in this project.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from common.run_folder import checkpoint_folder
from dataset.chat_template import END

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tokenizer_folder(model: str | Path) -> Path:
    """The tokenizer folder of a model folder (module docstring); a ValueError when it has none."""
    folder = Path(model)
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        return folder
    saved = checkpoint_folder(folder) / "config.yaml"
    if saved.is_file():
        named = ((yaml.safe_load(saved.read_text()) or {}).get("data") or {}).get("tokenizer")
        if named and any((Path(named) / name).is_file() for name in TOKENIZER_FILES):
            return Path(named)
    raise ValueError(
        f"{model}: no tokenizer (tokenizer.json or tokenizer_config.json there, or data.tokenizer in a "
        "checkpoint's config.yaml)"
    )


class TextEncoder:
    """A Hugging Face tokenizer as the evaluation uses it: `encode` plain texts, `bos_id`, `vocab_size`."""

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))  # tokenizer.json: data, no code
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder}: the tokenizer does not load ({exc})") from None
        self.bos_id: int | None = self.tokenizer.bos_token_id
        self.vocab_size = len(self.tokenizer)
        self.chat = bool(self.tokenizer.chat_template)
        """Whether the tokenizer has a chat template: generative tasks are then asked as a user turn."""

    @property
    def stop_ids(self) -> list[int]:
        """The ids that end a generation: `</s>`, generation_config.json's eos_token_id (an export's
        end-of-turn token) when the folder has one, and our chat format's `<|end|>` when the vocabulary has it."""
        ids = [self.tokenizer.eos_token_id]
        config = self.folder / "generation_config.json"
        if config.is_file():
            listed = json.loads(config.read_text(encoding="utf-8")).get("eos_token_id")
            ids += listed if isinstance(listed, list) else [listed]
        ids.append(self.tokenizer.convert_tokens_to_ids(END) if END in self.tokenizer.get_vocab() else None)
        return [i for i in dict.fromkeys(ids) if isinstance(i, int)]

    def prompt(self, text: str) -> list[int]:
        """The ids a model continues to answer `text`: with a chat template, `text` as the user's turn
        rendered by it (an assistant turn opened); else `<s>` (if any) + the text, as a context is encoded."""
        if self.chat:
            messages = [{"role": "user", "content": text}]
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            return list(ids)
        return ([] if self.bos_id is None else [self.bos_id]) + self.encode([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of generated ids (special tokens dropped)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids of each text, nothing added, control-token spellings split as plain text."""
        if not texts:
            return []
        # verbose=False: no warning for texts longer than the model (the caller truncates them).
        encoded = self.tokenizer(
            list(texts), add_special_tokens=False, split_special_tokens=True, verbose=False
        )
        return encoded["input_ids"]


def check_vocabulary(encoder: TextEncoder, model_vocab_size: int) -> None:
    """A ValueError when the tokenizer has ids the model has no row for: they do not belong together."""
    if encoder.vocab_size > model_vocab_size:
        raise ValueError(
            f"{encoder.folder}: the tokenizer has {encoder.vocab_size} tokens but the model only "
            f"{model_vocab_size}: they do not belong together"
        )
