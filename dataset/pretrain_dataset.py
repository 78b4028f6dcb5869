"""The pretraining stream: jsonl.zst shards -> tokenized documents -> packed rows of `seq_len` tokens.

Check what the model will see with `python dataset/pretrain_dataset.py --config configs/pretrain/demo.yaml`
(or `--shards 'DIR/*.jsonl.zst' --tokenizer TOKDIR --seq-len 256`): it prints decoded rows with their
document boundaries and the token count per source.

What a batch is
---------------
`{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}` plus `"position_ids"` when
`document_masking` is on. Every document becomes `<s> text </s>` (`<s>` only with `add_bos`), and documents
are concatenated and cut into rows of exactly T = `seq_len` tokens: no padding, every token of every
document appears exactly once, in order. `labels` is a copy of `input_ids` (the model shifts them).
`position_ids` restart at 0 at every document start, and also at the start of a row that continues a
document cut at the end of the previous row: the model reads a 0 as "new segment", so a continuation is
attended to on its own, with positions 0, 1, ... like any document start (what most packers do).

How documents are ordered (a pure function of the seed, the shards, rank and world_size)
----------------------------------------------------------------------------------------
1. Shards are grouped by source, the name in `part-<source>-<index>.jsonl.zst` (for other file names, the
   name of the folder holding the file). With `mixture` weights each source is a group of its own;
   without, all shards form one group read in their natural proportions.
2. Rank split. A group's shards are cut into *parts*, and part j belongs to rank j % world_size, so across
   the world every document is read exactly once per epoch. A part is a whole shard when there are at
   least 8 shards per rank; with fewer, shards are split by record index (part r of a shard = its records
   r, r + world_size, ...), so that every rank gets an equal share.
3. A rank reads its parts of a group in an order shuffled per epoch. Each part is read in *units* of
   `unit_docs` consecutive records (unit u = records u*unit_docs ...), whose order is shuffled inside the
   unit. `shuffle_window` parts are open at once and each next document is drawn from one of them by a
   seeded hash of (seed, source, epoch, draw number): a shuffle across shards that needs no memory of past
   documents. When a part runs out, the next one in the epoch's order takes its place; when all are read,
   the group's epoch count goes up and a new order is drawn. The stream never ends.
4. Mixture. Before each document the group furthest below its share (tokens taken / weight smallest) is
   chosen, so with weights 1:1 the token counts of the sources stay equal however long their documents
   are. This is deterministic; the randomness comes from step 3.

Why resume is exact with any number of workers
----------------------------------------------
The DataLoader workers only tokenize: a worker is handed a unit by its key (shard, part, unit index, epoch
permutation seed) and returns its documents' token ids. Which unit is needed next, and every choice in
steps 3-4, is made in the main process, which also packs the rows. So the row stream does not depend on
`num_workers` (0 tokenizes in the main process), nor on which worker finishes first: the workers
only decide how early a unit is ready. The resumable state is small and JSON-serialisable: per group the
epoch, the position in the epoch's part order, the open parts with the number of records consumed, the
draw counter; plus the document cut at the end of the last row (source, epoch, part, record, token
offset) and the token counts. Restoring it re-tokenizes only the units that are open (at most
`shuffle_window` per group, plus the cut document's unit): past shards and past units of open shards are
skipped without being read or tokenized, so resuming after a week of training takes seconds.

The held-out stream (`build_validation_dataloader`) uses the same packing on held-out shards or on the
documents that a hash of their text puts in the held-out fraction (those are then left out of training),
read in a fixed order, once; its last row is completed with `<pad>` tokens whose labels are -100.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import multiprocessing
import re
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

if __package__ in (None, ""):  # run as `python dataset/pretrain_dataset.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import orjson
import torch

from data.shard_io import ShardError, expand_shard_paths, iter_lines, iter_zstd_chunks

STATE_VERSION = 1
IGNORE_INDEX = -100
# data/shard.py writes part-<source>-<input>-<shard>.jsonl.zst; part-<source>-<index>.jsonl.zst is accepted too.
SHARD_NAMES = [
    re.compile(r"^part-(?P<source>.+)-\d+-\d+\.jsonl\.zst$"),
    re.compile(r"^part-(?P<source>.+)-\d+\.jsonl\.zst$"),
]
# With fewer shards per rank than this, splitting whole shards among ranks is uneven (one shard more is up
# to twice the data, and shards differ in size): every rank then reads every world_size-th record of every
# shard instead, an equal share whatever the shard sizes, for the price of decompressing all of them.
EVEN_SPLIT_SHARDS_PER_RANK = 8


@dataclass
class PretrainDataConfig:
    """Where the pretraining text is and how it becomes packed batches (the `data:` section of a run)."""

    shards: list[str] = field(default_factory=list)
    """Training shards: glob patterns, files or folders of `part-<source>-<index>.jsonl.zst`."""
    tokenizer: str = ""
    """Tokenizer folder written by dataset/train_tokenizer.py."""
    seq_len: int = 2048
    """Tokens per row; documents are packed into rows of exactly this length."""
    batch_size: int = 8
    """Rows per batch on each device (the micro-batch)."""
    num_workers: int = 2
    """Worker processes that read and tokenize shards (0 = in the main process). Does not change the data."""
    seed: int = 0
    """Seed of the shard order, the in-unit shuffle and the draws between open shards."""
    mixture: dict[str, float] = field(default_factory=dict)
    """Token share per source, e.g. {pile: 1, wudao: 1}; a source weighted 0 is left out. Empty = every
    source in its natural proportion."""
    document_masking: bool = False
    """Emit position_ids that restart at 0 at each document start, so attention stays inside documents."""
    add_bos: bool = True
    """Start every document with <s> (every document always ends with </s>)."""
    shuffle: bool = True
    """Shuffle shard order per epoch, records inside each unit, and draw between open shards; False reads
    shards and records in file order (one shard at a time)."""
    shuffle_window: int = 8
    """Shards (parts) of a source open at once; each document is drawn from one of them at random."""
    unit_docs: int = 256
    """Records per unit, the piece of a shard one worker tokenizes in one go and the span of the in-unit
    shuffle. Changing it changes the order of the data."""
    validation_shards: list[str] = field(default_factory=list)
    """Held-out shards (globs, files, folders) for the validation stream; they are left out of training."""
    validation_fraction: float = 0.0
    """Hold out this fraction of the training documents (chosen by a hash of their text) for validation
    instead; used when validation_shards is empty."""
    pin_memory: bool = False
    """Return batches in pinned memory (faster copies to a GPU)."""

    def __post_init__(self) -> None:
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        if isinstance(self.validation_shards, str):
            self.validation_shards = [self.validation_shards]
        checks = [
            (self.seq_len >= 1, "seq_len must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (self.shuffle_window >= 1, "shuffle_window must be >= 1"),
            (self.unit_docs >= 1, "unit_docs must be >= 1"),
            (0.0 <= self.validation_fraction < 1.0, "validation_fraction must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        mixture = {}
        for source, weight in self.mixture.items():
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise ValueError(f"mixture weight of {source!r} must be a number, got {weight!r}") from None
            if not (weight >= 0 and math.isfinite(weight)):
                raise ValueError(f"mixture weight of {source!r} must be finite and >= 0, got {weight}")
            mixture[str(source)] = weight
        if mixture and not any(mixture.values()):
            raise ValueError("every mixture weight is 0: nothing to train on")
        self.mixture = mixture


class TextTokenizer(Protocol):
    """What the stream needs from `dataset.tokenizer.Tokenizer`."""

    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = False, eos: bool = False
    ) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


# --------------------------------------------------------------------------------------------------
# Plan: which parts of which shards this rank reads
# --------------------------------------------------------------------------------------------------


def shard_source(path: str | Path) -> str:
    """The source name of a shard: `<source>` in `part-<source>-<index>.jsonl.zst`, else its folder's name."""
    path = Path(path)
    for pattern in SHARD_NAMES:
        if match := pattern.match(path.name):
            return match["source"]
    return path.resolve().parent.name


@dataclass(frozen=True)
class Part:
    """The records of one shard that one rank reads: those whose index is `residue` modulo `modulus`."""

    path: str
    source: str
    residue: int = 0
    modulus: int = 1


def split_parts(paths: Sequence[Path], rank: int, world_size: int) -> list[Part]:
    """The parts of `paths` (sorted) that `rank` reads; together the ranks read every record once."""
    modulus = 1 if len(paths) >= EVEN_SPLIT_SHARDS_PER_RANK * world_size else world_size
    parts = [Part(str(p), shard_source(p), r, modulus) for p in paths for r in range(modulus)]
    return parts[rank::world_size]


@dataclass
class Group:
    """A stream of documents drawn from a set of parts; one per mixture source (or one for all)."""

    name: str
    weight: float
    parts: list[Part]


def plan_groups(config: PretrainDataConfig, rank: int, world_size: int, *, validation: bool) -> list[Group]:
    """The groups (sources) of the training or the held-out stream, with this rank's parts."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    held_out = expand_shard_paths(config.validation_shards) if config.validation_shards else []
    if validation and held_out:
        paths = held_out
    else:
        if not config.shards:
            raise ValueError("no training shards: set data.shards (globs, files or folders)")
        held = set(held_out)
        paths = [p for p in expand_shard_paths(config.shards) if p not in held]
        if not paths:
            raise ValueError(f"every shard of {config.shards} is a validation shard: nothing to train on")
    by_source: dict[str, list[Path]] = {}
    for path in paths:
        by_source.setdefault(shard_source(path), []).append(path)
    if not config.mixture:
        return [Group("all", 1.0, split_parts(paths, rank, world_size))]
    # A weight for a source with no shard is checked first: it is usually a typo of the source that then
    # seems to lack a weight.
    absent = sorted(s for s, w in config.mixture.items() if w > 0 and s not in by_source)
    if absent and not validation:
        raise ValueError(f"mixture source(s) {absent} match no shard; sources found: {sorted(by_source)}")
    missing = sorted(set(by_source) - set(config.mixture))
    if missing and not validation:
        raise ValueError(
            f"shards of source(s) {missing} have no mixture weight; give each a weight (0 leaves it out). "
            f"Weights given: {config.mixture}"
        )
    return [
        Group(source, config.mixture.get(source, 1.0), split_parts(by_source[source], rank, world_size))
        for source in sorted(by_source)
        # Held-out shards of a source without a weight are still evaluated; weight 0 leaves a source out.
        if config.mixture.get(source, 1.0 if validation else 0.0) > 0
    ]


# --------------------------------------------------------------------------------------------------
# Units: the work a DataLoader worker does (read some records of a shard, tokenize them)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitRequest:
    """Everything a worker needs to produce one unit; also the unit's identity (it is hashable)."""

    part: Part
    index: int
    unit_docs: int
    add_bos: bool
    permutation_seed: int | None  # None keeps file order
    held_out_fraction: float  # 0 = keep every record
    keep_held_out: bool  # True: keep only the held-out records (validation); False: only the others


@dataclass
class Unit:
    """The token ids of a unit's records (after the in-unit shuffle); a skipped record has no tokens."""

    tokens: np.ndarray  # int32, all documents concatenated
    offsets: np.ndarray  # int64, len = number of records + 1

    @property
    def num_records(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def is_held_out(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out fraction: a hash of its text, the same on every machine."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2.0**64


def read_unit_texts(request: UnitRequest) -> list[str | None]:
    """The texts of the unit's records, in file order; None for a record this stream skips.

    The shard is decompressed from its start (zstd cannot seek), but only the unit's own records are
    parsed, and reading stops at the unit's end.
    """
    part = request.part
    start = request.index * request.unit_docs
    stop = start + request.unit_docs
    texts: list[str | None] = []
    record = -1
    for line_number, line in enumerate(iter_lines(iter_zstd_chunks(part.path)), start=1):
        if not line.strip():
            continue  # blank lines are not records (as in data.shard_io.iter_shard_records)
        record += 1
        if record % part.modulus != part.residue:
            continue
        k = record // part.modulus
        if k < start:
            continue
        if k >= stop:
            break
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ShardError(f"{part.path}:{line_number}: malformed JSON ({exc})") from exc
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise ShardError(f"{part.path}:{line_number}: expected an object with a 'text' string")
        if not text:
            texts.append(None)  # an empty document would be a lone </s>
        elif (
            request.held_out_fraction
            and is_held_out(text, request.held_out_fraction) != request.keep_held_out
        ):
            texts.append(None)
        else:
            texts.append(text)
    return texts


def tokenize_unit(request: UnitRequest, tokenizer: TextTokenizer) -> Unit:
    """Read, shuffle and tokenize one unit: `<s>`? ids `</s>` per kept record."""
    texts = read_unit_texts(request)
    if request.permutation_seed is not None:
        order = seeded_permutation(len(texts), request.permutation_seed)
        texts = [texts[i] for i in order]
    kept = [i for i, t in enumerate(texts) if t is not None]
    encoded = tokenizer.encode_batch([texts[i] for i in kept], bos=request.add_bos, eos=True) if kept else []
    lengths = np.zeros(len(texts), dtype=np.int64)
    lengths[kept] = [len(ids) for ids in encoded]
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter((t for ids in encoded for t in ids), dtype=np.int32, count=int(offsets[-1]))
    return Unit(tokens, offsets)


_worker_tokenizer: TextTokenizer | None = None


def _init_worker(tokenizer: TextTokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    torch.set_num_threads(1)


def _tokenize_in_worker(request: UnitRequest) -> Unit:
    assert _worker_tokenizer is not None, "worker started without _init_worker"
    return tokenize_unit(request, _worker_tokenizer)


class UnitFetcher:
    """Hands units to the stream, tokenized ahead of need by worker processes (or inline with 0 workers).

    Results are looked up by request, so the order in which workers finish never matters.
    """

    def __init__(self, tokenizer: TextTokenizer, num_workers: int):
        self.tokenizer = tokenizer
        self.num_workers = num_workers
        self._pool: ProcessPoolExecutor | None = None
        self._pending: dict[UnitRequest, Future[Unit]] = {}

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # fork (as torch's DataLoader does on Linux) hands the tokenizer over without pickling it.
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self._pool = ProcessPoolExecutor(
                self.num_workers, mp_context=context, initializer=_init_worker, initargs=(self.tokenizer,)
            )
        return self._pool

    def prefetch(self, requests: Sequence[UnitRequest]) -> None:
        """Tokenize `requests` (most urgent first) ahead of need; forget pending units no longer wanted.

        At most two units per worker are queued or running, so a unit that becomes urgent waits for
        little more than one unit's work; finished units wait here until taken.
        """
        if not self.num_workers:
            return
        wanted = set(requests)
        for request in [r for r in self._pending if r not in wanted]:
            self._pending.pop(request).cancel()
        busy = sum(not f.done() for f in self._pending.values())
        for request in requests:
            if busy >= 2 * self.num_workers:
                break
            if request not in self._pending:
                self._pending[request] = self._executor().submit(_tokenize_in_worker, request)
                busy += 1

    def get(self, request: UnitRequest) -> Unit:
        """The unit for `request`, waiting for (or starting) its tokenization."""
        future = self._pending.pop(request, None)
        if future is None:
            if not self.num_workers:
                return tokenize_unit(request, self.tokenizer)
            future = self._executor().submit(_tokenize_in_worker, request)
        try:
            return future.result()
        except BrokenProcessPool as exc:
            raise RuntimeError(
                f"a data worker process died (killed, or out of memory?) while tokenizing unit {request.index} "
                f"of {request.part.path}; lower data.num_workers or data.unit_docs"
            ) from exc

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# --------------------------------------------------------------------------------------------------
# Document streams: the order of documents within a group (main process, deterministic)
# --------------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 chained): the stream's stateless source of randomness."""
    h = 0x9E3779B97F4A7C15
    for value in values:
        h = (h ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h


def seeded_permutation(n: int, *seed: int) -> list[int]:
    """A permutation of range(n) from integer seeds (Fisher-Yates on `mix_seed`): the same on every
    machine and library version, which exact resume relies on."""
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = mix_seed(*seed, i) % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def _name_seed(name: str) -> int:
    return zlib.crc32(name.encode())


@dataclass
class Document:
    """A document taken from a group, with where it came from (to find it again after a restart)."""

    tokens: np.ndarray
    source: str
    ref: tuple[int, int, int]  # (epoch, part index, record position in the part)


class GroupStream:
    """The documents of one group for one rank, in the order described in the module docstring."""

    def __init__(
        self,
        group: Group,
        config: PretrainDataConfig,
        fetcher: UnitFetcher,
        *,
        rank: int,
        validation: bool,
    ):
        self.group = group
        self.config = config
        self.fetcher = fetcher
        self.rank = rank
        self.validation = validation
        self.shuffle = config.shuffle and not validation
        self.window = config.shuffle_window if self.shuffle else 1
        self._name_seed = _name_seed(group.name)
        self._units: dict[tuple[int, int, int], Unit] = {}
        self.reset()

    def reset(self, epoch: int = 0) -> None:
        """Go to the start of `epoch`."""
        self.epoch = epoch
        self.next_part = 0  # position in the epoch's part order of the next part to open
        self.open: list[list[int]] = []  # [part index, records consumed] of the open parts
        self.draws = 0  # documents drawn in this epoch (the draw hash's counter)
        self.documents_in_epoch = 0
        self.order = self._part_order(epoch)
        self._units.clear()

    def _part_order(self, epoch: int) -> list[int]:
        n = len(self.group.parts)
        if not self.shuffle:
            return list(range(n))
        return seeded_permutation(n, self.config.seed, self._name_seed, epoch, self.rank)

    # The state: plain ints, JSON-serialisable.
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "next_part": self.next_part,
            "open": [list(slot) for slot in self.open],
            "draws": self.draws,
            "documents_in_epoch": self.documents_in_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset(int(state["epoch"]))
        self.next_part = int(state["next_part"])
        self.open = [[int(p), int(c)] for p, c in state["open"]]
        self.draws = int(state["draws"])
        self.documents_in_epoch = int(state["documents_in_epoch"])

    def request(self, epoch: int, part_index: int, unit_index: int) -> UnitRequest:
        config = self.config
        seed = None
        if self.shuffle:
            seed = mix_seed(config.seed, self._name_seed, epoch, self.rank, part_index, unit_index)
        fraction = 0.0 if config.validation_shards else config.validation_fraction
        return UnitRequest(
            part=self.group.parts[part_index],
            index=unit_index,
            unit_docs=config.unit_docs,
            add_bos=config.add_bos,
            permutation_seed=seed,
            held_out_fraction=fraction,
            keep_held_out=self.validation,
        )

    def _unit(self, epoch: int, part_index: int, unit_index: int) -> Unit:
        key = (epoch, part_index, unit_index)
        unit = self._units.get(key)
        if unit is None:
            # A part is read forward: its earlier units are no longer needed.
            for old in [k for k in self._units if k[:2] == key[:2]]:
                del self._units[old]
            unit = self._units[key] = self.fetcher.get(self.request(epoch, part_index, unit_index))
        return unit

    def document_at(self, ref: tuple[int, int, int]) -> np.ndarray:
        """The tokens of the document at `ref` (used to restore the document cut by a checkpoint)."""
        epoch, part_index, position = ref
        unit_docs = self.config.unit_docs
        unit = self.fetcher.get(self.request(epoch, part_index, position // unit_docs))
        return unit.document(position % unit_docs).copy()

    def upcoming(self) -> list[UnitRequest]:
        """Units this stream will need soon, most urgent first: the unit of the next draw, the current
        units of the other open parts, then their next units and the first unit of the next part."""
        unit_docs = self.config.unit_docs
        opening = self.order[self.next_part : self.next_part + max(0, self.window - len(self.open))]
        slots = [*self.open, *([p, 0] for p in opening)]
        if not slots:
            return []
        first = mix_seed(self.config.seed, self._name_seed, self.epoch, self.draws) % len(slots)
        now, then = [], []
        for part_index, consumed in [slots[first], *slots[:first], *slots[first + 1 :]]:
            unit_index = consumed // unit_docs
            unit = self._units.get((self.epoch, part_index, unit_index))
            if unit is None:
                now.append(self.request(self.epoch, part_index, unit_index))
            if unit is None or unit.num_records == unit_docs:  # a shorter unit is the part's last
                then.append(self.request(self.epoch, part_index, unit_index + 1))
        after = self.next_part + len(opening)
        if after < len(self.order):
            then.append(self.request(self.epoch, self.order[after], 0))
        return now + then

    def next_document(self, *, finite: bool) -> Document | None:
        """The next document; at the end of an epoch a new one starts (or None when `finite`)."""
        unit_docs = self.config.unit_docs
        while True:
            while len(self.open) < self.window and self.next_part < len(self.order):
                self.open.append([self.order[self.next_part], 0])
                self.next_part += 1
            if not self.open:
                if finite:
                    return None
                if self.documents_in_epoch == 0:
                    raise ValueError(
                        f"source {self.group.name!r} has no documents for rank {self.rank} "
                        f"(parts: {[p.path for p in self.group.parts]})"
                    )
                self.reset(self.epoch + 1)
                continue
            slot = mix_seed(self.config.seed, self._name_seed, self.epoch, self.draws) % len(self.open)
            part_index, consumed = self.open[slot]
            unit = self._unit(self.epoch, part_index, consumed // unit_docs)
            if consumed % unit_docs >= unit.num_records:  # the part has no more records
                del self.open[slot]
                for key in [k for k in self._units if k[:2] == (self.epoch, part_index)]:
                    del self._units[key]
                continue
            self.open[slot][1] += 1
            self.draws += 1
            tokens = unit.document(consumed % unit_docs)
            if len(tokens):
                self.documents_in_epoch += 1
                return Document(
                    tokens, self.group.parts[part_index].source, (self.epoch, part_index, consumed)
                )


# --------------------------------------------------------------------------------------------------
# Packing: documents -> rows of seq_len tokens
# --------------------------------------------------------------------------------------------------


@dataclass
class Segment:
    """A run of one document's tokens inside a row."""

    source: str
    start: int  # first column in the row
    length: int
    document_start: bool  # False: continues a document cut at the end of the previous row
    document_end: bool  # False: the document goes on in the next row


@dataclass
class PackedRow:
    tokens: np.ndarray  # int64 [seq_len]
    positions: np.ndarray  # int64 [seq_len], 0 at each segment start
    labels: np.ndarray  # int64 [seq_len]: tokens, with -100 on padding (only the held-out stream pads)
    segments: list[Segment]


class PackedStream:
    """Mixes the groups by token share and packs their documents into rows (see the module docstring)."""

    def __init__(
        self,
        config: PretrainDataConfig,
        tokenizer: TextTokenizer,
        groups: list[Group],
        fetcher: UnitFetcher,
        *,
        rank: int,
        validation: bool,
    ):
        self.config = config
        self.pad_id = tokenizer.pad_id
        self.validation = validation
        self.fetcher = fetcher
        self.streams = [GroupStream(g, config, fetcher, rank=rank, validation=validation) for g in groups]
        self.weights = [g.weight for g in groups]
        self.sources = sorted({p.source for g in groups for p in g.parts})
        self.reset()

    def reset(self) -> None:
        for stream in self.streams:
            stream.reset()
        self.group_tokens = [0] * len(self.streams)  # tokens of the documents taken, per group
        self.tokens_per_source = dict.fromkeys(self.sources, 0)  # tokens emitted in rows
        self.documents_per_source = dict.fromkeys(self.sources, 0)
        self.rows = 0
        self.exhausted = [False] * len(self.streams)
        self.current: Document | None = None  # the document being packed
        self.current_group = 0
        self.offset = 0  # tokens of `current` already packed

    def state_dict(self) -> dict[str, Any]:
        current = None
        if self.current is not None and self.offset < len(self.current.tokens):
            current = {"group": self.current_group, "ref": list(self.current.ref), "offset": self.offset}
        return {
            "groups": {s.group.name: s.state_dict() for s in self.streams},
            "group_tokens": list(self.group_tokens),
            "current": current,
            "rows": self.rows,
            "tokens_per_source": dict(self.tokens_per_source),
            "documents_per_source": dict(self.documents_per_source),
            "epochs": {s.group.name: s.epoch for s in self.streams},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        names = [s.group.name for s in self.streams]
        if sorted(state["groups"]) != sorted(names):
            raise ValueError(
                f"data state has sources {sorted(state['groups'])}, this stream has {sorted(names)}"
            )
        for stream in self.streams:
            stream.load_state_dict(state["groups"][stream.group.name])
        self.group_tokens = [int(t) for t in state["group_tokens"]]
        self.tokens_per_source.update({k: int(v) for k, v in state["tokens_per_source"].items()})
        self.documents_per_source.update({k: int(v) for k, v in state["documents_per_source"].items()})
        self.rows = int(state["rows"])
        current = state["current"]
        if current is not None:
            group = int(current["group"])
            epoch, part_index, position = (int(x) for x in current["ref"])
            stream = self.streams[group]
            tokens = stream.document_at((epoch, part_index, position))
            source = stream.group.parts[part_index].source
            self.current = Document(tokens, source, (epoch, part_index, position))
            self.current_group = group
            self.offset = int(current["offset"])

    def prefetch(self) -> None:
        """Tell the fetcher which units come next: the next group's first, then the groups in turn."""
        lists = [s.upcoming() for s in self.streams]
        if not self.validation and len(lists) > 1:
            first = self._choose_group()
            lists = [lists[first], *lists[:first], *lists[first + 1 :]]
        longest = max(map(len, lists), default=0)
        self.fetcher.prefetch([group[i] for i in range(longest) for group in lists if i < len(group)])

    def _choose_group(self) -> int:
        """The group furthest below its token share (ties: the first)."""
        return min(range(len(self.streams)), key=lambda g: (self.group_tokens[g] / self.weights[g], g))

    def _next_document(self) -> bool:
        """Take the next document into `current`; False when a finite stream is over."""
        if self.validation:
            # Held-out: each group in turn, once, in file order.
            for group, stream in enumerate(self.streams):
                if self.exhausted[group]:
                    continue
                document = stream.next_document(finite=True)
                if document is None:
                    self.exhausted[group] = True
                    continue
                break
            else:
                return False
        else:
            group = self._choose_group()
            document = self.streams[group].next_document(finite=False)
            assert document is not None
        self.current, self.current_group, self.offset = document, group, 0
        self.group_tokens[group] += len(document.tokens)
        self.documents_per_source[document.source] += 1
        return True

    def next_row(self) -> PackedRow | None:
        """The next row of seq_len tokens (None when a finite stream is over)."""
        seq_len = self.config.seq_len
        tokens = np.empty(seq_len, dtype=np.int64)
        positions = np.empty(seq_len, dtype=np.int64)
        segments: list[Segment] = []
        filled = 0
        while filled < seq_len:
            if (
                self.current is None or self.offset >= len(self.current.tokens)
            ) and not self._next_document():
                break
            assert self.current is not None
            doc = self.current.tokens
            n = min(seq_len - filled, len(doc) - self.offset)
            tokens[filled : filled + n] = doc[self.offset : self.offset + n]
            positions[filled : filled + n] = np.arange(n)
            end = self.offset + n == len(doc)
            segments.append(Segment(self.current.source, filled, n, self.offset == 0, end))
            self.tokens_per_source[self.current.source] += n
            self.offset += n
            filled += n
        if filled == 0:
            return None
        labels = tokens.copy()
        if filled < seq_len:  # only the finite held-out stream ends with a partial row
            tokens[filled:] = self.pad_id
            positions[filled:] = np.arange(seq_len - filled)
            labels[filled:] = IGNORE_INDEX
        self.rows += 1
        self.prefetch()
        return PackedRow(tokens, positions, labels, segments)


# --------------------------------------------------------------------------------------------------
# The loader the training loop uses
# --------------------------------------------------------------------------------------------------


class PretrainDataLoader:
    """Batches of packed rows for one rank, with `state_dict()`/`load_state_dict()` for exact resume.

    Iterating continues from the current state; the training stream never ends. The state counts the
    batches handed out (not those prefetched), so a checkpoint taken between steps resumes at the next
    batch. Do not wrap it in `accelerator.prepare`: it already reads only this rank's share.
    """

    def __init__(
        self,
        config: PretrainDataConfig,
        tokenizer: TextTokenizer,
        *,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int | None = None,
        validation: bool = False,
        max_batches: int | None = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size or config.batch_size
        self.validation = validation
        self.max_batches = max_batches
        groups = plan_groups(config, rank, world_size, validation=validation)
        self.fetcher = UnitFetcher(tokenizer, config.num_workers)
        self.stream = PackedStream(config, tokenizer, groups, self.fetcher, rank=rank, validation=validation)
        self.batches = 0
        self._fingerprint = self._make_fingerprint(groups)

    def _make_fingerprint(self, groups: list[Group]) -> dict[str, Any]:
        """What the row stream depends on; a state saved under other settings cannot resume exactly."""
        c = self.config
        shards = sorted({(Path(p.path).name, Path(p.path).stat().st_size) for g in groups for p in g.parts})
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "seq_len": c.seq_len,
            "batch_size": self.batch_size,
            "seed": c.seed,
            "mixture": dict(sorted(c.mixture.items())),
            "add_bos": c.add_bos,
            "shuffle": c.shuffle,
            "shuffle_window": c.shuffle_window,
            "unit_docs": c.unit_docs,
            "validation_fraction": c.validation_fraction if not c.validation_shards else 0.0,
            "vocab_size": self.tokenizer.vocab_size,
            "shards": hashlib.sha256(orjson.dumps(shards)).hexdigest()[:16],
        }

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream, JSON-serialisable; includes tokens and documents per source."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint,
            "batches": self.batches,
            **self.stream.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken (any num_workers; same data settings)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} is not {STATE_VERSION}")
        saved = state["fingerprint"]
        changed = {k: (saved.get(k), v) for k, v in self._fingerprint.items() if saved.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"cannot resume the data stream exactly; settings changed ({details})")
        self.stream.load_state_dict(state)
        self.batches = int(state["batches"])

    @property
    def tokens_per_source(self) -> dict[str, int]:
        """Tokens handed out so far per source (Open-Llama's training data category distribution)."""
        return dict(self.stream.tokens_per_source)

    def _rows_to_batch(self, rows: list[PackedRow]) -> dict[str, torch.Tensor]:
        batch = {
            "input_ids": torch.from_numpy(np.stack([r.tokens for r in rows])),
            "labels": torch.from_numpy(np.stack([r.labels for r in rows])),
        }
        if self.config.document_masking:
            batch["position_ids"] = torch.from_numpy(np.stack([r.positions for r in rows]))
        if self.config.pin_memory and torch.cuda.is_available():
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def iter_rows(self) -> Iterator[PackedRow]:
        """The packed rows one by one (for inspection; the batches are these rows, batch_size at a time)."""
        while (row := self.stream.next_row()) is not None:
            yield row

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.validation:
            return self._iter_validation()
        return self._iter_training()

    def _iter_training(self) -> Iterator[dict[str, torch.Tensor]]:
        self.stream.prefetch()
        while True:
            rows = [self.stream.next_row() for _ in range(self.batch_size)]
            self.batches += 1
            yield self._rows_to_batch(rows)  # type: ignore[arg-type]

    def _iter_validation(self) -> Iterator[dict[str, torch.Tensor]]:
        """The held-out batches from the start (the same ones every time); with `max_batches`, exactly
        that many, starting over if the held-out set is shorter, so every rank runs the same number."""
        try:
            yield from self._held_out_batches()
        finally:
            self.fetcher.close()  # validation is occasional: free the workers until the next round

    def _held_out_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        yielded = 0
        while self.max_batches is None or yielded < self.max_batches:
            self.stream.reset()
            self.stream.prefetch()
            produced = 0
            while self.max_batches is None or yielded < self.max_batches:
                rows = []
                for _ in range(self.batch_size):
                    row = self.stream.next_row()
                    if row is None:
                        break
                    rows.append(row)
                if not rows:
                    break
                produced += 1
                yielded += 1
                yield self._rows_to_batch(rows)
                if len(rows) < self.batch_size:
                    break
            if self.max_batches is None:
                return
            if produced == 0:
                raise ValueError(f"the held-out stream of rank {self.rank} has no documents")

    def close(self) -> None:
        """Stop the worker processes."""
        self.fetcher.close()

    def __enter__(self) -> PretrainDataLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        fetcher = getattr(self, "fetcher", None)
        if fetcher is not None:
            fetcher.close()


def build_pretrain_dataloader(
    config: PretrainDataConfig,
    tokenizer: TextTokenizer,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int | None = None,
) -> PretrainDataLoader:
    """The endless training stream of this rank (batch_size defaults to config.batch_size)."""
    return PretrainDataLoader(config, tokenizer, rank=rank, world_size=world_size, batch_size=batch_size)


def build_validation_dataloader(
    config: PretrainDataConfig,
    tokenizer: TextTokenizer,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int | None = None,
    max_batches: int | None = None,
) -> PretrainDataLoader | None:
    """This rank's held-out stream (None when the config holds nothing out); see `_iter_validation`."""
    if not config.validation_shards and config.validation_fraction == 0:
        return None
    return PretrainDataLoader(
        config,
        tokenizer,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        validation=True,
        max_batches=max_batches,
    )


# --------------------------------------------------------------------------------------------------
# Command line: print decoded rows with their document boundaries
# --------------------------------------------------------------------------------------------------


def _shorten(text: str, max_chars: int) -> str:
    text = text.replace("\n", "\\n")
    if max_chars and len(text) > max_chars:
        half = max_chars // 2
        text = f"{text[:half]} [...] {text[-half:]}"
    return text


def format_row(row: PackedRow, tokenizer: TextTokenizer, *, max_chars: int = 160) -> str:
    """A row as text: one line per document segment (columns, source, boundaries) and its decoded text."""
    lines = []
    for seg in row.segments:
        ids = row.tokens[seg.start : seg.start + seg.length].tolist()
        shown = ("<s>" if ids and ids[0] == tokenizer.bos_id else "") + tokenizer.decode(ids)
        shown += "</s>" if ids and ids[-1] == tokenizer.eos_id else ""
        where = "document start" if seg.document_start else "continues the previous row"
        if not seg.document_end:
            where += ", continues in the next row"
        positions = row.positions[seg.start : seg.start + seg.length]
        lines.append(
            f"  [{seg.start}:{seg.start + seg.length}] {seg.source}, {seg.length} tokens, {where} "
            f"(position_ids {positions[0]}..{positions[-1]})"
        )
        lines.append(f"      {_shorten(shown, max_chars)}")
    padding = int((row.labels == IGNORE_INDEX).sum())
    if padding:
        lines.append(f"  [{len(row.tokens) - padding}:{len(row.tokens)}] padding, labels -100")
    return "\n".join(lines)


def _load_config(args: argparse.Namespace) -> PretrainDataConfig:
    """The `data:` section of a run config (if given), then the command-line flags on top."""
    values: dict[str, Any] = {}
    if args.config:
        from training.config import build_dataclass, read_yaml

        raw = read_yaml(args.config)
        data = raw.get("data") or {}
        config = build_dataclass(PretrainDataConfig, data, source=args.config, prefix="data.")
        values = {k: getattr(config, k) for k in PretrainDataConfig.__dataclass_fields__}
    flags = {
        "shards": args.shards,
        "tokenizer": args.tokenizer,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "seed": args.seed,
        "document_masking": args.document_masking,
        "add_bos": args.add_bos,
        "validation_shards": args.validation_shards,
        "validation_fraction": args.validation_fraction,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.mixture is not None:
        values["mixture"] = {}
        for item in args.mixture.split(","):
            source, sep, weight = item.partition("=")
            if not sep:
                raise ValueError(f"--mixture {args.mixture!r}: expected SOURCE=WEIGHT,SOURCE=WEIGHT")
            values["mixture"][source.strip()] = weight
    return PretrainDataConfig(**values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Print decoded sample rows of the pretraining stream with their document boundaries."
    )
    parser.add_argument("--config", help="run config YAML; its data: section is used (flags override it)")
    parser.add_argument("--shards", nargs="+", help="training shards: globs, files or folders")
    parser.add_argument("--tokenizer", help="tokenizer folder")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--mixture", help="token shares per source, e.g. pile=1,wudao=1")
    parser.add_argument("--document-masking", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--validation-shards", nargs="+")
    parser.add_argument("--validation-fraction", type=float)
    parser.add_argument("--validation", action="store_true", help="show the held-out stream instead")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--batches", type=int, default=1, help="batches to print (default 1)")
    parser.add_argument("--max-chars", type=int, default=160, help="characters shown per segment (0: all)")
    args = parser.parse_args(argv)

    from dataset.tokenizer import Tokenizer
    from training.config import ConfigError

    try:
        config = _load_config(args)
        if not config.tokenizer:
            raise ValueError("no tokenizer: pass --tokenizer DIR or set data.tokenizer in the config")
        tokenizer = Tokenizer.load(config.tokenizer)
        loader = PretrainDataLoader(
            config, tokenizer, rank=args.rank, world_size=args.world_size, validation=args.validation
        )
        with loader:
            groups = ", ".join(f"{s.group.name} ({len(s.group.parts)} parts)" for s in loader.stream.streams)
            print(
                f"{'held-out' if args.validation else 'training'} stream of rank {args.rank}/{args.world_size}: "
                f"seq_len {config.seq_len}, batch_size {loader.batch_size}, document_masking "
                f"{config.document_masking}, add_bos {config.add_bos}; groups: {groups}"
            )
            rows = loader.iter_rows()
            for b in range(args.batches):
                for r in range(loader.batch_size):
                    row = next(rows, None)
                    if row is None:
                        break
                    print(f"batch {b} row {r}:")
                    print(format_row(row, tokenizer, max_chars=args.max_chars))
            total = sum(loader.tokens_per_source.values()) or 1
            shares = ", ".join(f"{s} {n:,} ({n / total:.1%})" for s, n in loader.tokens_per_source.items())
            print(f"tokens per source: {shares}")
    except (ValueError, OSError, ShardError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
