"""Our own Hugging Face model folder for the serving tests: a tokenizer trained on generated English and
Chinese text, and a tiny random Llama exported with export_hf."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import AutoTokenizer

from dataset.train_tokenizer import train_tokenizer
from models.hf import export_hf
from models.llama import Llama, ModelConfig
from tests.helpers.shards import write_shard

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "you",
    "that",
    "it",
    "he",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "from",
    "have",
    "or",
    "by",
    "one",
    "had",
    "not",
    "but",
    "what",
    "all",
    "were",
    "when",
    "we",
    "there",
    "can",
    "an",
    "your",
    "which",
    "their",
    "said",
    "if",
    "do",
    "will",
    "each",
    "about",
    "how",
    "up",
    "out",
    "them",
    "then",
    "she",
    "many",
    "some",
    "so",
    "these",
    "would",
    "other",
    "into",
    "has",
    "more",
    "her",
    "two",
    "like",
    "him",
    "see",
    "time",
    "could",
    "no",
    "make",
    "than",
    "first",
]
CHINESE = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而"


def training_texts(n: int = 700) -> list[str]:
    """English-like sentences and Chinese text; only the first 20 Chinese characters are common enough to get
    tokens, so the others are byte-fallback pieces (three tokens per character)."""
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(5, 40))) + "." for _ in range(n)]
    return texts + ["".join(rng.choices(CHINESE[:20], k=rng.randint(20, 80))) for _ in range(n // 7)]


def make_visible(model: Llama, hidden_ids: list[int]) -> None:
    """Let a random model never pick `hidden_ids` (control and byte tokens): its replies are readable words
    and run to max_tokens, which makes the tests' expectations exact."""
    with torch.no_grad():
        model.lm_head.weight[hidden_ids] = 0.0
        model.lm_head.weight.mul_(20.0)  # clear winners: greedy ties are far below float rounding


MODEL_NAME = "tiny-chat"


def build_our_folder(root: Path) -> Path:
    """A tokenizer trained here and a tiny random Llama exported with export_hf (untied head, see make_visible)
    under the name MODEL_NAME, as a training run names its export."""
    root.mkdir(parents=True, exist_ok=True)
    write_shard(root / "part-test-0.jsonl.zst", training_texts())
    tokdir = train_tokenizer([str(root / "part-test-0.jsonl.zst")], 400, root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(tokdir))
    torch.manual_seed(0)
    config = ModelConfig.from_preset(
        "tiny", vocab_size=len(tokenizer), dim=64, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=False
    )
    model = Llama(config)
    hidden = [
        i
        for i, piece in enumerate(tokenizer.convert_ids_to_tokens(range(len(tokenizer))))
        if piece.startswith("<")
    ]
    make_visible(model, hidden)
    return export_hf(model, root / "model", tokenizer_dir=tokdir, name=MODEL_NAME)
