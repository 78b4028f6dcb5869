"""Packing: documents -> rows of exactly `seq_len` tokens, with positions, labels and segments.

A document is a token array, optionally with per-token labels (a later stage passes a loss mask this way:
IGNORE_INDEX on the tokens not to train on); without labels, the labels are the tokens (the model shifts
them). Two policies:

- "concat" (pretraining): documents are concatenated and cut into rows. No padding, every token of every
  document appears exactly once, in order; a document longer than the rest of a row continues in the next.
- "pad": a document that does not fit in the rest of a row starts the next row, and the rest of the row is
  padding, so documents are kept whole whenever they fit in a row (a longer one is still cut).

`positions` restart at 0 at every segment start: at every document start, and also at the start of a row
that continues a document cut at the end of the previous row. The model reads a 0 as "new segment", so a
continuation is attended to on its own, with positions 0, 1, ... like any document start (what most
packers do). Padding (only at the end of a finite stream with "concat") is `pad_id` with IGNORE_INDEX
labels.

`BlockPacker` never cuts a document (instruction data: a conversation cut in two would train an answer
without its question). It takes documents in blocks of `block_docs` and arranges each block at once:

- "best_fit": best-fit decreasing, the longest document first, each into the fullest row it still fits;
  rows are then shuffled (seeded by the block), so a row's place says nothing about its documents.
  Blocks of a thousand conversations fill rows to within a few percent of seq_len;
- "pad": one document per row (the loader trims each batch to its longest row). Documents are sorted by
  length and cut into groups of `group_rows` rows, which are shuffled: the rows of a group (one optimizer
  step's worth) have similar lengths, so little of a batch is padding.

Because a block is a pure function of its documents and its number, a resumable stream only has to save
where its block started and how many of its rows were handed out (see dataset/chat_stream.py).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from common import IGNORE_INDEX
from common.randomness import seeded_permutation
from dataset.document_order import Document

Policy = Literal["concat", "pad"]
BlockPolicy = Literal["best_fit", "pad"]


@dataclass
class Segment:
    """A run of one document's tokens inside a row."""

    source: str
    start: int  # first column in the row
    length: int
    document_start: bool  # False: continues a document cut at the end of the previous row
    document_end: bool  # False: the document goes on in the next row
    meta: Any = None  # the document's meta (dataset.document_order.Document)


@dataclass
class PackedRow:
    tokens: np.ndarray  # int64 [seq_len]
    positions: np.ndarray  # int64 [seq_len], 0 at each segment start
    labels: (
        np.ndarray
    )  # int64 [seq_len]: the documents' labels (default: their tokens), IGNORE_INDEX on padding
    segments: list[Segment]


class Packer:
    """Packs documents, pulled one at a time, into rows; holds the document cut at the end of a row."""

    def __init__(self, seq_len: int, pad_id: int, *, policy: Policy = "concat"):
        if policy not in ("concat", "pad"):
            raise ValueError(f"packing policy must be 'concat' or 'pad', got {policy!r}")
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.policy = policy
        self.reset()

    def reset(self) -> None:
        self.current: Document | None = None  # the document being packed
        self.offset = 0  # tokens of `current` already packed

    @property
    def cut(self) -> tuple[Document, int] | None:
        """The document that the next row continues, and how many of its tokens are packed already."""
        if self.current is None or self.offset >= len(self.current.tokens):
            return None
        return self.current, self.offset

    def restore(self, document: Document, offset: int) -> None:
        """Continue with `document` from token `offset` (the `cut` of a saved state)."""
        self.current, self.offset = document, offset

    def next_row(self, next_document: Callable[[], Document | None]) -> PackedRow | None:
        """The next row, taking documents from `next_document()` (None: no more); None when there is
        nothing left to pack."""
        seq_len = self.seq_len
        tokens = np.empty(seq_len, dtype=np.int64)
        labels = np.empty(seq_len, dtype=np.int64)
        positions = np.empty(seq_len, dtype=np.int64)
        segments: list[Segment] = []
        filled = 0
        while filled < seq_len:
            if self.cut is None:
                document = next_document()
                if document is None:
                    break
                self.current, self.offset = document, 0
            doc = self.current
            assert doc is not None
            remaining = len(doc.tokens) - self.offset
            if self.policy == "pad" and filled and self.offset == 0 and remaining > seq_len - filled:
                break  # the document starts the next row
            n = min(seq_len - filled, remaining)
            tokens[filled : filled + n] = doc.tokens[self.offset : self.offset + n]
            source_labels = doc.tokens if doc.labels is None else doc.labels
            labels[filled : filled + n] = source_labels[self.offset : self.offset + n]
            positions[filled : filled + n] = np.arange(n)
            segments.append(Segment(doc.source, filled, n, self.offset == 0, n == remaining))
            self.offset += n
            filled += n
        if filled == 0:
            return None
        if filled < seq_len:
            tokens[filled:] = self.pad_id
            positions[filled:] = np.arange(seq_len - filled)
            labels[filled:] = IGNORE_INDEX
        return PackedRow(tokens, positions, labels, segments)


# ---------------------------------------------------------------------------------------------------
# Whole documents, a block at a time


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows (lists of document indices) holding every document once, none over `capacity`: the longest
    document first, each into the row with the least free space that still fits it (the first such row on
    ties), or a new row. Deterministic; within a row, documents keep the order they were placed in."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, row index), sorted
    for i in order:
        need = lengths[i]
        if need > capacity:
            raise ValueError(f"a document of {need} tokens does not fit in a row of {capacity}")
        k = bisect_left(free, (need, -1))
        if k == len(free):
            rows.append([i])
            insort(free, (capacity - need, len(rows) - 1))
        else:
            space, row = free.pop(k)
            rows[row].append(i)
            insort(free, (space - need, row))
    return rows


def whole_documents_row(documents: Sequence[Document], seq_len: int, pad_id: int) -> PackedRow:
    """One row of `seq_len` columns: the documents one after another, then padding (IGNORE_INDEX labels)."""
    tokens = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    positions = np.empty(seq_len, dtype=np.int64)
    segments = []
    filled = 0
    for doc in documents:
        n = len(doc.tokens)
        tokens[filled : filled + n] = doc.tokens
        labels[filled : filled + n] = doc.tokens if doc.labels is None else doc.labels
        positions[filled : filled + n] = np.arange(n)
        segments.append(Segment(doc.source, filled, n, True, True, doc.meta))
        filled += n
    positions[filled:] = np.arange(seq_len - filled)
    return PackedRow(tokens, positions, labels, segments)


class BlockPacker:
    """Rows of whole documents, arranged a block of `block_docs` documents at a time (module docstring)."""

    def __init__(
        self,
        seq_len: int,
        pad_id: int,
        *,
        policy: BlockPolicy = "best_fit",
        block_docs: int = 1024,
        seed: int = 0,
        group_rows: int = 1,
    ):
        if policy not in ("best_fit", "pad"):
            raise ValueError(f"packing must be 'best_fit' or 'pad', got {policy!r}")
        if block_docs < 1 or group_rows < 1:
            raise ValueError("block_docs and group_rows must be >= 1")
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.policy = policy
        self.block_docs = block_docs
        self.seed = seed
        self.group_rows = group_rows
        self.reset()

    def reset(self) -> None:
        self.blocks = 0  # blocks arranged so far; the next block's number
        self.pending: deque[PackedRow] = deque()  # rows of the current block not handed out yet

    @property
    def needs_block(self) -> bool:
        """True when the next `next_row` starts a new block (takes documents)."""
        return not self.pending

    def next_row(self, next_document: Callable[[], Document | None]) -> PackedRow | None:
        """The next row; a new block is taken from `next_document()` (None: no more) when the current one is
        used up. None when there is nothing left."""
        if not self.pending:
            self._arrange_block(next_document)
        return self.pending.popleft() if self.pending else None

    def skip(self, rows: int) -> None:
        """Drop the next `rows` rows of the current block (a restored stream skips those handed out)."""
        if rows > len(self.pending):
            raise ValueError(f"cannot skip {rows} rows of a block with {len(self.pending)} left")
        for _ in range(rows):
            self.pending.popleft()

    def _arrange_block(self, next_document: Callable[[], Document | None]) -> None:
        documents: list[Document] = []
        while len(documents) < self.block_docs and (doc := next_document()) is not None:
            documents.append(doc)
        if not documents:
            return
        block, self.blocks = self.blocks, self.blocks + 1
        lengths = [len(d.tokens) for d in documents]
        if self.policy == "best_fit":
            rows = best_fit_decreasing(lengths, self.seq_len)
            rows = [rows[i] for i in seeded_permutation(len(rows), self.seed, block)]
        else:
            if max(lengths) > self.seq_len:
                raise ValueError(
                    f"a document of {max(lengths)} tokens does not fit in a row of {self.seq_len}"
                )
            longest_first = [[i] for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))]
            groups = [
                longest_first[i : i + self.group_rows] for i in range(0, len(longest_first), self.group_rows)
            ]
            rows = [row for g in seeded_permutation(len(groups), self.seed, block) for row in groups[g]]
        for row in rows:
            self.pending.append(whole_documents_row([documents[i] for i in row], self.seq_len, self.pad_id))
