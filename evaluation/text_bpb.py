"""Bits per byte of held-out text, per source of the mixture: the figure that compares models whatever
their vocabularies (a loss per token does not).

The shards are the pretraining stream's (`part-<source>-<index>.jsonl.zst`, read through data/shard_io.py);
a document's source is `dataset.rank_shards.shard_source`, and with a `validation_fraction` only the
documents the held-out rule keeps (dataset/held_out.py) are scored, so a run's own validation split is
measured without a list of documents. Each document is `<s>` (when the tokenizer has one) + its tokens, cut
into windows of the model's length that overlap by one token, so every token is predicted once; its bits
are the sum of -log2 p over its tokens, its bytes the UTF-8 length of its text. A source's figure is its
total bits over its total bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from common import IGNORE_INDEX
from data.shard_io import expand_shard_paths, iter_shard_records
from dataset.held_out import is_held_out
from dataset.rank_shards import shard_source
from evaluation.encoding import TextEncoder
from models.llama import Llama


@dataclass
class SourceBits:
    """A source's scored documents, bytes and bits."""

    documents: int = 0
    bytes: int = 0
    bits: float = 0.0

    @property
    def bpb(self) -> float | None:
        return self.bits / self.bytes if self.bytes else None


def source_texts(
    patterns: Sequence[str], *, validation_fraction: float = 0.0, limit: int = 0
) -> dict[str, list[str]]:
    """The texts to score per source, in shard order: the held-out ones when `validation_fraction` > 0, at
    most `limit` per source when > 0. A pattern that names no shard is a FileNotFoundError naming it."""
    texts: dict[str, list[str]] = {}
    for path in expand_shard_paths(patterns):
        kept = texts.setdefault(shard_source(path), [])
        for record in iter_shard_records(path):
            if limit and len(kept) == limit:
                break
            text = record["text"]
            if text and (not validation_fraction or is_held_out(text, validation_fraction)):
                kept.append(text)
    return texts


def windows(ids: Sequence[int], length: int) -> Iterator[list[int]]:
    """`ids` cut into windows of at most `length` tokens, each starting at the last token of the one before,
    so every token after the first is a target exactly once."""
    for start in range(0, max(len(ids) - 1, 1), length - 1):
        yield list(ids[start : start + length])


@torch.inference_mode()
def text_bits(
    model: Llama, encoder: TextEncoder, texts: Iterable[str], *, batch_size: int = 16
) -> SourceBits:
    """The bits of `texts` under `model` (module docstring), scored in batches of windows sorted by length."""
    texts = list(texts)
    total = SourceBits(documents=len(texts), bytes=sum(len(t.encode("utf-8")) for t in texts))
    prefix = [] if encoder.bos_id is None else [encoder.bos_id]
    rows = [w for ids in encoder.encode(texts) for w in windows(prefix + ids, model.config.max_seq_len)]
    rows = [w for w in rows if len(w) > 1]
    rows.sort(key=len, reverse=True)
    device = model.lm_head.weight.device
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = len(batch[0])
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, window in enumerate(batch):
            ids[row, : len(window)] = torch.tensor(window)
            labels[row, : len(window)] = torch.tensor(window)
        out = model(ids.to(device), labels=labels.to(device), return_token_logprobs=True)
        total.bits -= float(out.token_logprobs.double().sum()) / math.log(2)
    return total


def bits_per_byte_by_source(
    model: Llama,
    encoder: TextEncoder,
    patterns: Sequence[str],
    *,
    validation_fraction: float = 0.0,
    limit: int = 0,
    batch_size: int = 16,
    rank: int = 0,
    world: int = 1,
) -> dict[str, SourceBits]:
    """Each source's bits and bytes over the documents of the shards `patterns` name (module docstring); of
    every `world`-th document from the `rank`-th when several processes share the work (their sums add up)."""
    texts = source_texts(patterns, validation_fraction=validation_fraction, limit=limit)
    if not any(texts.values()):
        held = f" held out at validation_fraction {validation_fraction}" if validation_fraction else ""
        raise ValueError(f"no documents{held} in the shards {list(patterns)}")
    return {
        source: text_bits(model, encoder, kept[rank::world], batch_size=batch_size)
        for source, kept in sorted(texts.items())
    }
