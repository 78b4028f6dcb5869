"""The order of documents within a group: deterministic, resumable, and computed in the main process.

A rank reads its parts of a group (dataset/rank_shards.py) in an order shuffled per epoch. Each part is read
in *units* of `unit_docs` consecutive records (unit u = records u*unit_docs ...), whose order is shuffled
inside the unit. `shuffle_window` parts are open at once and each next document is drawn from one of them
by a seeded hash of (seed, group, epoch, draw number): a shuffle across shards that needs no memory of past
documents. When a part runs out, the next one in the epoch's order takes its place; when all are read, the
group's epoch count goes up and a new order is drawn. The stream never ends (the held-out stream, read in
file order, stops at the end of its first epoch instead).

Why resume is exact with any number of workers: the workers of a `WorkerPool` only produce units. A unit
is asked for by a request that names it completely (`UnitKey`: part, unit index, in-unit permutation seed,
plus whatever the stream's worker function needs), and every choice above (which unit is needed next,
which open part the next document comes from) is made here, from plain integers. So the documents do not
depend on `num_workers`, nor on which worker finishes first. The state is small and JSON-serialisable: the
epoch, the position in the epoch's part order, the open parts with the number of records consumed, the
draw counter. Restoring it re-reads only the units of the open parts: past parts and past units of open
parts are skipped without being read, so resuming after a week of training takes seconds.

A stream's own worker function turns a unit's records into a `Unit` (token ids, and optionally per-token
labels, per record); the pretraining stream's is dataset/text_units.py.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from common.randomness import mix_seed, name_seed, seeded_permutation
from dataset.rank_shards import Group, Part, iter_part_records
from dataset.worker_pool import WorkerPool

T = TypeVar("T")


@dataclass(frozen=True)
class OrderSettings:
    """What the order of a group's documents depends on (besides the parts and the rank)."""

    seed: int
    shuffle: bool
    """False: parts and records in file order, one part at a time."""
    shuffle_window: int
    unit_docs: int


@dataclass(frozen=True)
class UnitKey:
    """Which records of which part make a unit, and their order; hashable and picklable."""

    part: Part
    index: int
    unit_docs: int
    permutation_seed: int | None  # None keeps file order

    def iter_records(self) -> Iterator[tuple[int, Any]]:
        """The unit's records in file order, as (line number, parsed JSON)."""
        start = self.index * self.unit_docs
        return iter_part_records(self.part, start, start + self.unit_docs)

    def shuffle(self, items: Sequence[T]) -> list[T]:
        """`items` (one per record, file order) in the unit's order: the in-unit shuffle."""
        if self.permutation_seed is None:
            return list(items)
        return [items[i] for i in seeded_permutation(len(items), self.permutation_seed)]


@dataclass
class Unit:
    """The token ids of a unit's records, in the unit's order; a skipped record has no tokens."""

    tokens: np.ndarray  # int32, all documents concatenated
    offsets: np.ndarray  # int64, len = number of records + 1
    labels: np.ndarray | None = None  # per-token labels (e.g. a loss mask), None: the tokens themselves
    meta: list[Any] | None = None  # per record: what a stage's batches need beside the tokens, None: nothing

    @classmethod
    def build(
        cls,
        documents: Sequence[Sequence[int] | None],
        labels: Sequence[Sequence[int]] | None = None,
        meta: Sequence[Any] | None = None,
    ) -> Unit:
        """A unit from one token list per record (None: skipped) and, optionally, one label list per kept
        record, as long as its tokens, and one `meta` value per record (kept or not)."""
        lengths = np.array([len(d) if d is not None else 0 for d in documents], dtype=np.int64)
        offsets = np.zeros(len(documents) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        kept = [d for d in documents if d is not None]
        count = int(offsets[-1])
        tokens = np.fromiter((t for ids in kept for t in ids), dtype=np.int32, count=count)
        flat_labels = None
        if labels is not None:
            flat_labels = np.fromiter((t for ls in labels for t in ls), dtype=np.int32, count=count)
        return cls(tokens, offsets, flat_labels, None if meta is None else list(meta))

    @property
    def num_records(self) -> int:
        return len(self.offsets) - 1

    def tokens_of(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def labels_of(self, i: int) -> np.ndarray | None:
        return None if self.labels is None else self.labels[self.offsets[i] : self.offsets[i + 1]]

    def meta_of(self, i: int) -> Any:
        return None if self.meta is None else self.meta[i]


Ref = tuple[int, int, int]  # (epoch, part index, record position in the part)


@dataclass
class Document:
    """A document taken from a group, with where it came from (to find it again after a restart)."""

    tokens: np.ndarray
    labels: np.ndarray | None
    source: str
    ref: Ref
    meta: Any = None
    """The unit's per-record value (e.g. a preference pair's id), carried into the packed row's segment."""


class GroupStream:
    """The documents of one group for one rank, in the order described in the module docstring.

    `make_request(key)` turns a UnitKey into the request `pool` computes the unit for (the key plus the
    stream's own options, e.g. whether to add <s>).
    """

    def __init__(
        self,
        group: Group,
        settings: OrderSettings,
        pool: WorkerPool[Any, Unit],
        make_request: Callable[[UnitKey], Hashable],
        *,
        rank: int,
    ):
        self.group = group
        self.settings = settings
        self.pool = pool
        self.make_request = make_request
        self.rank = rank
        self.window = settings.shuffle_window if settings.shuffle else 1
        self._name_seed = name_seed(group.name)
        self._units: dict[tuple[int, int, int], Unit] = {}
        self.reset()

    def reset(self, epoch: int = 0) -> None:
        """Go to the start of `epoch`."""
        self.epoch = epoch
        self.next_part = 0  # position in the epoch's part order of the next part to open
        self.open: list[list[int]] = []  # [part index, records consumed] of the open parts
        self.draws = 0  # records drawn in this epoch (the draw hash's counter)
        self.documents_in_epoch = 0  # an epoch without any is an error (the stream would never end)
        self.order = self._part_order(epoch)
        self._units.clear()

    def _part_order(self, epoch: int) -> list[int]:
        n = len(self.group.parts)
        if not self.settings.shuffle:
            return list(range(n))
        return seeded_permutation(n, self.settings.seed, self._name_seed, epoch, self.rank)

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

    def request(self, epoch: int, part_index: int, unit_index: int) -> Hashable:
        """The pool request for a unit of this group."""
        seed = None
        if self.settings.shuffle:
            seed = mix_seed(self.settings.seed, self._name_seed, epoch, self.rank, part_index, unit_index)
        part = self.group.parts[part_index]
        return self.make_request(UnitKey(part, unit_index, self.settings.unit_docs, seed))

    def _unit(self, epoch: int, part_index: int, unit_index: int) -> Unit:
        key = (epoch, part_index, unit_index)
        unit = self._units.get(key)
        if unit is None:
            # A part is read forward: its earlier units are no longer needed.
            for old in [k for k in self._units if k[:2] == key[:2]]:
                del self._units[old]
            unit = self._units[key] = self.pool.get(self.request(epoch, part_index, unit_index))
        return unit

    def _document(self, unit: Unit, ref: Ref, i: int) -> Document:
        source = self.group.parts[ref[1]].source
        return Document(unit.tokens_of(i), unit.labels_of(i), source, ref, unit.meta_of(i))

    def document_at(self, ref: Ref) -> Document:
        """The document at `ref` (used to restore the document cut by a checkpoint)."""
        epoch, part_index, position = ref
        unit_docs = self.settings.unit_docs
        unit = self.pool.get(self.request(epoch, part_index, position // unit_docs))
        return self._document(unit, ref, position % unit_docs)

    def upcoming(self) -> list[Hashable]:
        """Requests for the units this stream will need soon, most urgent first: the unit of the next
        draw, the current units of the other open parts, then their next units and the first unit of the
        next part."""
        unit_docs = self.settings.unit_docs
        opening = self.order[self.next_part : self.next_part + max(0, self.window - len(self.open))]
        slots = [*self.open, *([p, 0] for p in opening)]
        if not slots:
            return []
        first = mix_seed(self.settings.seed, self._name_seed, self.epoch, self.draws) % len(slots)
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
        unit_docs = self.settings.unit_docs
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
            slot = mix_seed(self.settings.seed, self._name_seed, self.epoch, self.draws) % len(self.open)
            part_index, consumed = self.open[slot]
            unit = self._unit(self.epoch, part_index, consumed // unit_docs)
            if consumed % unit_docs >= unit.num_records:  # the part has no more records
                del self.open[slot]
                for key in [k for k in self._units if k[:2] == (self.epoch, part_index)]:
                    del self._units[key]
                continue
            self.open[slot][1] += 1
            self.draws += 1
            document = self._document(unit, (self.epoch, part_index, consumed), consumed % unit_docs)
            if len(document.tokens):
                self.documents_in_epoch += 1
                return document
