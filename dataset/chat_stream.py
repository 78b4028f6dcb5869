"""The instruction-tuning stream: prepared shards -> per-source order -> mixture -> rows of whole
conversations -> batches. Preference tuning streams its pairs through it too (dataset/preference_stream.py).

What a batch is
---------------
`{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`, labels IGNORE_INDEX (-100) wherever
nothing is trained: <s>, role tokens, system and user text, padding. With `packing: best_fit`, T is
`seq_len`, rows hold several conversations, and `"position_ids"` restart at 0 at each one, so attention
never crosses conversations; with `packing: pad`, each row is one conversation and T is the batch's
longest. Both give the same loss on the same conversations: the loss is the mean over trained tokens (the
shared loop weights every micro-batch and rank by its count of them), a conversation's first token (<s>)
is never a target, and attention sees only the conversation itself either way.

How it is built (the shared parts of the pretraining stream)
------------------------------------------------------------
dataset/chat_prepare.py prepares the sources once into shards of rendered conversations; then
dataset/rank_shards.py groups them by source, dataset/document_order.py orders each source's conversations
(per-epoch shuffles, exact resume, worker processes optional: `load_chat_unit` only parses), dataset/
mixing.py draws sources by weight, dataset/packing.py's BlockPacker arranges blocks of conversations into
rows, and dataset/loader.py batches them with the exact-resume state envelope.

The rows are one global stream, identical on every rank; rank r takes the r-th `batch_size` rows of every
`world_size * batch_size`. So the global batch does not depend on how it is split: two processes with
batch 4 see the same rows per step as one process with batch 8, or with batch 1 and 8 accumulation steps.
The state is where the current packing block started (the mixer's small state) and how many of its rows
were handed out; a restored stream arranges that block again and skips them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import IGNORE_INDEX
from data.shard_io import ShardError
from dataset.document_order import Document, GroupStream, OrderSettings, Unit, UnitKey
from dataset.loader import PackedLoader
from dataset.mixing import Mixer
from dataset.packing import BlockPacker, PackedRow
from dataset.prepare import PreparedData, PreparedDataConfig
from dataset.rank_shards import Group, plan_groups
from dataset.worker_pool import WorkerPool

STATE_VERSION = 1
UNIT_DOCS = 256  # conversations a worker reads in one go (and the span of the in-unit shuffle)
SHUFFLE_WINDOW = 8  # prepared shards of a source open at once


@dataclass(frozen=True)
class ChatUnitRequest:
    """A unit of prepared conversations to read; also the unit's identity."""

    key: UnitKey

    def __str__(self) -> str:
        return f"unit {self.key.index} ({self.key.unit_docs} conversations) of {self.key.part.path}"


def read_prepared_unit(
    request: ChatUnitRequest, what: str, meta: Callable[[dict[str, Any]], Any] | None = None
) -> Unit:
    """A unit of prepared lines (`what`: "conversation", "pair") in the unit's order: ids, labels that are
    the ids on the trained spans, and `meta(line)` of each when given."""
    documents, labels, metas = [], [], []
    for line_number, obj in request.key.iter_records():
        try:
            ids, spans = obj["ids"], obj["train"]
            row_labels = [IGNORE_INDEX] * len(ids)
            for start, end in spans:
                row_labels[start:end] = ids[start:end]
            metas.append(meta(obj) if meta is not None else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardError(f"{request.key.part.path}:{line_number}: not a prepared {what} ({exc})") from exc
        documents.append(ids)
        labels.append(row_labels)
    order = request.key.shuffle(list(range(len(documents))))
    return Unit.build(
        [documents[i] for i in order],
        [labels[i] for i in order],
        [metas[i] for i in order] if meta is not None else None,
    )


def load_chat_unit(request: ChatUnitRequest, _state: Any = None) -> Unit:
    """A unit's conversations in the unit's order: ids, and labels that are the ids on the trained spans."""
    return read_prepared_unit(request, "conversation")


class ChatStream:
    """One rank's rows of whole conversations (dataset.loader.RowStream); see the module docstring.

    `rows_per_step` (batch_size x accumulation x world_size) is the length of a "pad" group, so an
    optimizer step's rows have similar lengths whatever the split. Preference tuning streams its pairs
    through this too: `load_unit` reads its own prepared records, `item` names them in the counters.
    `config` is a ChatDataConfig or a PreferenceDataConfig.
    """

    def __init__(
        self,
        config: PreparedDataConfig,
        groups: list[Group],
        pad_id: int,
        *,
        rank: int,
        world_size: int,
        rows_per_step: int,
        validation: bool,
        load_unit: Callable[[ChatUnitRequest, Any], Unit] = load_chat_unit,
        item: str = "conversations",
    ):
        self.item = item
        self.pool = WorkerPool(load_unit, None, config.num_workers)
        settings = OrderSettings(
            seed=config.seed,
            shuffle=not validation,  # the held-out stream is read in file order
            shuffle_window=SHUFFLE_WINDOW,
            unit_docs=UNIT_DOCS,
        )
        streams = [GroupStream(g, settings, self.pool, ChatUnitRequest, rank=0) for g in groups]
        self.mixer = Mixer(streams, [g.weight for g in groups], finite=validation)
        group_rows = rows_per_step if config.packing == "pad" else 1
        self.packer = BlockPacker(
            config.seq_len,
            pad_id,
            policy=config.packing,  # type: ignore[arg-type]
            # A whole number of groups per block, so that groups line up with optimizer steps.
            block_docs=math.ceil(config.pack_block / group_rows) * group_rows,
            seed=config.seed,
            group_rows=group_rows,
        )
        self.rank, self.world_size, self.batch_size = rank, world_size, config.batch_size
        self.validation = validation
        self.sources = sorted({p.source for g in groups for p in g.parts})
        self.reset()

    def reset(self) -> None:
        self.mixer.reset()
        self.packer.reset()
        self.block_start: dict[str, Any] = self.mixer.state_dict()  # the mixer where the block began
        self.block = 0  # that block's number
        self.block_rows = 0  # rows of that block handed out (to every rank)
        self.rows = 0  # rows handed out since the start (to every rank)
        self.counts: dict[str, dict[str, int]] = {
            name: dict.fromkeys(self.sources, 0)
            for name in ("tokens_per_source", "trained_tokens_per_source", f"{self.item}_per_source")
        }

    def _mine(self, row_index: int) -> bool:
        if self.validation:  # round robin: every rank gets held-out rows even when they are few
            return row_index % self.world_size == self.rank
        return (row_index // self.batch_size) % self.world_size == self.rank

    def _take(self) -> Document | None:
        taken = self.mixer.next_document()
        return None if taken is None else taken[1]

    def next_row(self) -> PackedRow | None:
        """This rank's next row (None when a finite stream is over)."""
        while True:
            if self.packer.needs_block:
                self.block_start, self.block, self.block_rows = self.mixer.state_dict(), self.packer.blocks, 0
            row = self.packer.next_row(self._take)
            if row is None:
                return None
            index, self.rows, self.block_rows = self.rows, self.rows + 1, self.block_rows + 1
            if self._mine(index):
                self._count(row)
                self.prefetch()
                return row

    def _count(self, row: PackedRow) -> None:
        for seg in row.segments:
            trained = int((row.labels[seg.start : seg.start + seg.length] != IGNORE_INDEX).sum())
            self.counts["tokens_per_source"][seg.source] += seg.length
            self.counts["trained_tokens_per_source"][seg.source] += trained
            self.counts[f"{self.item}_per_source"][seg.source] += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "block_start": self.block_start,
            "block": self.block,
            "block_rows": self.block_rows,
            "rows": self.rows,
            "counts": {name: dict(c) for name, c in self.counts.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self.mixer.load_state_dict(state["block_start"])
        self.block_start, self.block = state["block_start"], int(state["block"])
        self.packer.blocks = self.block
        self.block_rows, self.rows = int(state["block_rows"]), int(state["rows"])
        if self.block_rows:  # arrange the block again and skip the rows already handed out
            self.packer.next_row(self._take)
            self.packer.skip(self.block_rows - 1)
        for name, counts in state["counts"].items():
            self.counts[name].update({k: int(v) for k, v in counts.items()})

    def counters(self) -> dict[str, dict[str, int]]:
        return {name: dict(c) for name, c in self.counts.items()}

    def prefetch(self) -> None:
        self.pool.prefetch(self.mixer.upcoming())

    def close(self) -> None:
        self.pool.close()


class ChatLoader(PackedLoader):
    """Batches of this rank's rows, with exact-resume state (dataset.loader.PackedLoader); with "pad"
    packing each batch is trimmed to its longest row."""

    STATE_VERSION = STATE_VERSION
    READS_VERSIONS = (STATE_VERSION,)

    def __init__(self, stream: ChatStream, *, packing: str, **kwargs: Any):
        super().__init__(stream, position_ids=packing == "best_fit", **kwargs)
        self.trim = packing == "pad"

    def rows_to_batch(self, rows: list[PackedRow]) -> dict[str, Any]:
        if self.trim:
            # Rows are padded on the right only, so columns past the longest row hold nothing but padding.
            n = max(sum(seg.length for seg in row.segments) for row in rows)
            rows = [PackedRow(r.tokens[:n], r.positions[:n], r.labels[:n], r.segments) for r in rows]
        return super().rows_to_batch(rows)


def build_chat_loaders(
    config: PreparedDataConfig,
    prepared: PreparedData,
    pad_id: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    rows_per_step: int | None = None,
    eval_batches: int | None = None,
    once: bool = False,
    load_unit: Callable[[ChatUnitRequest, Any], Unit] = load_chat_unit,
    item: str = "conversations",
    loader_class: type[ChatLoader] | None = None,
) -> tuple[ChatLoader, ChatLoader | None]:
    """The endless training loader of this rank and its held-out loader (None when nothing is held out).

    `rows_per_step`: rows per optimizer step over all ranks (default batch_size x world_size). `once`: the
    training loader goes over the training data once, in file order, instead. Preference tuning passes its
    own `load_unit`, `item` and `loader_class` (dataset/preference_stream.py).
    """
    loader_class = loader_class or ChatLoader
    rows_per_step = rows_per_step or config.batch_size * world_size
    fingerprint = {
        "data": prepared.fingerprint,
        "rank": rank,
        "world_size": world_size,
        "batch_size": config.batch_size,
        "rows_per_step": rows_per_step,
        "seq_len": config.seq_len,
        "packing": config.packing,
        "pack_block": config.pack_block,
        "seed": config.seed,
        "mixture": dict(sorted(config.mixture.items())),
    }
    loaders: list[ChatLoader | None] = []
    for validation in (False, True):
        if validation and not prepared.has_validation:
            loaders.append(None)
            continue
        finite = validation or once
        shards = prepared.validation_shards if validation else prepared.train_shards
        groups = plan_groups(shards, [], {} if once else config.mixture, 0, 1, validation=finite)
        stream = ChatStream(
            config,
            groups,
            pad_id,
            rank=rank,
            world_size=world_size,
            rows_per_step=rows_per_step,
            validation=finite,
            load_unit=load_unit,
            item=item,
        )
        loaders.append(
            loader_class(
                stream,
                packing=config.packing,
                batch_size=config.batch_size,
                fingerprint=fingerprint,
                pin_memory=config.pin_memory,
                validation=finite,
                max_batches=eval_batches if validation else None,
                rank=rank,
            )
        )
    return loaders[0], loaders[1]  # type: ignore[return-value]
