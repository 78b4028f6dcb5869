"""Chat tokenizers trained on generated text (no corpus needed), and a conversation that uses every role."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import zstandard

from dataset.train_tokenizer import train_tokenizer

# Common English words, to make English-like text.
COMMON = "the of and to in is was for on that with as by at from it an be this are or his which not but"
WORDS = COMMON.split(" ")
HAN = [chr(c) for c in range(0x4E00, 0x4E00 + 120)]

MULTI_TURN = [
    {"role": "system", "content": "You are a concise assistant.\n"},
    {"role": "user", "content": "What is the of and? 中文问题"},
    {"role": "assistant", "content": "It is\n\n  the answer.\n"},
    {"role": "user", "content": "\nAnd this,\twith a tab?"},
    {"role": "assistant", "content": " def f(x):\n    return x"},
]


def generated_texts(n: int, seed: int = 0) -> list[str]:
    """English-like sentences, Chinese-like lines, code with indentation and blank lines."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        if i % 3 == 0:
            texts.append(
                " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))).capitalize() + ".\n"
            )
        elif i % 3 == 1:
            texts.append("".join(rng.choice(HAN) for _ in range(rng.randint(20, 80))) + "。\n\n")
        else:
            body = "\n".join(f"    {rng.choice(WORDS)} = {rng.randint(0, 99)}" for _ in range(5))
            texts.append(f"def f(x):\n{body}\n\n\treturn  x\n")
    return texts


def train_chat_tokenizer(folder: Path, texts: list[str], vocab_size: int) -> Path:
    """A tokenizer (SentencePiece + Hugging Face files with the chat template) trained on `texts`."""
    shards = folder / "shards"
    shards.mkdir(parents=True)
    lines = b"".join(orjson.dumps({"text": t}) + b"\n" for t in texts)
    (shards / "part-chat-00000.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    return train_tokenizer(str(shards / "*.jsonl.zst"), vocab_size, folder / "tokenizer")
