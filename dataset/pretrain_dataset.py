"""The pretraining stream: jsonl.zst shards -> tokenized documents -> packed rows of `seq_len` tokens.

Check what the model will see with `python dataset/pretrain_dataset.py --config configs/pretrain/demo.yaml`
(any `--data.key value` overrides the run config's `data:` section; `--show.batches 2`, `--show.validation
true`, `--show.rank 1 --show.world_size 2`, `--show.max_chars 0` choose what is printed): it prints decoded
rows with their document boundaries and the token count per source.

What a batch is
---------------
`{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}` plus `"position_ids"` when
`document_masking` is on. Every document becomes `<s> text </s>` (`<s>` only with `add_bos`), and documents
are concatenated and cut into rows of exactly T = `seq_len` tokens: no padding, every token of every
document appears exactly once, in order. `labels` is a copy of `input_ids` (the model shifts them).
`position_ids` restart at 0 at every document start, and also at the start of a row that continues a
document cut at the end of the previous row.

How it is built (one concern a module, shared with the other stages' streams)
-----------------------------------------------------------------------------
- dataset/rank_shards.py: shards grouped by source, this rank's parts of them (every document read exactly
  once per epoch across ranks), reading a part's records;
- dataset/worker_pool.py: worker processes that read and tokenize units of records
  (dataset/text_units.py), looked up by request;
- dataset/document_order.py: the deterministic, resumable order of each source's documents;
- dataset/mixing.py: which source the next document comes from (token shares);
- dataset/packing.py: documents -> rows ("concat" policy);
- dataset/loader.py: batches, the exact-resume state envelope, the held-out iteration.

Everything about the order is a pure function of the seed, the shards, rank and world_size, and is
decided in the main process; the workers only tokenize. So the row stream does not depend on
`num_workers`, and the resumable state is small and JSON-serialisable: per source the position in its
order, plus the document cut at the end of the last row (source, epoch, part, record, token offset) and
the token counts. Restoring it re-tokenizes only the units that are open (at most `shuffle_window` per
source, plus the cut document's unit), so resuming after a week of training takes seconds.

The held-out stream (`build_validation_dataloader`) uses the same packing on held-out shards or on the
documents that a hash of their text puts in the held-out fraction (those are then left out of training),
read in a fixed order, once; its last row is completed with `<pad>` tokens whose labels are -100.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from jsonargparse.typing import NonNegativeInt, PositiveInt

from common.config import ConfigError, parse_config
from data.shard_io import ShardError
from dataset.document_order import Document, GroupStream, OrderSettings
from dataset.held_out import HeldOutFraction
from dataset.loader import PackedLoader
from dataset.mixing import Mixer, check_weights
from dataset.packing import PackedRow, Packer
from dataset.rank_shards import Group, plan_groups
from dataset.text_units import TextTokenizer, TextUnitRequest, tokenize_unit
from dataset.worker_pool import WorkerPool

STATE_VERSION = 2  # v2 dropped v1's informational "epochs", "rows" and "documents_per_source"


@dataclass
class PretrainDataConfig:
    """Where the pretraining text is and how it becomes packed batches (the `data:` section of a run)."""

    shards: list[str] = field(default_factory=list)
    """Training shards: glob patterns, files or folders of `part-<source>-<index>.jsonl.zst`."""
    tokenizer: str = ""
    """Tokenizer folder written by dataset/train_tokenizer.py."""
    seq_len: PositiveInt = 2048
    """Tokens per row; documents are packed into rows of exactly this length."""
    batch_size: PositiveInt = 8
    """Rows per batch on each device (the micro-batch)."""
    num_workers: NonNegativeInt = 2
    """Worker processes that read and tokenize shards (0 = in the main process). Does not change the data."""
    seed: NonNegativeInt = 0
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
    shuffle_window: PositiveInt = 8
    """Shards (parts) of a source open at once; each document is drawn from one of them at random."""
    unit_docs: PositiveInt = 256
    """Records per unit, the piece of a shard one worker tokenizes in one go and the span of the in-unit
    shuffle. Changing it changes the order of the data."""
    validation_shards: list[str] = field(default_factory=list)
    """Held-out shards (globs, files, folders) for the validation stream; they are left out of training."""
    validation_fraction: HeldOutFraction = 0.0
    """Hold out this fraction of the training documents (chosen by a hash of their text) for validation
    instead; used when validation_shards is empty."""
    pin_memory: bool = False
    """Return batches in pinned memory (faster copies to a GPU)."""

    def __post_init__(self) -> None:
        self.mixture = check_weights(self.mixture)

    @property
    def held_out_fraction(self) -> float:
        """The fraction of the training shards' documents held out (0 when there are held-out shards)."""
        return 0.0 if self.validation_shards else self.validation_fraction


class PretrainStream:
    """The packed rows of one rank: tokenizing workers -> per-source order -> mixture -> packing.

    Implements dataset.loader.RowStream; counts the tokens handed out per source.
    """

    def __init__(
        self,
        config: PretrainDataConfig,
        tokenizer: TextTokenizer,
        groups: list[Group],
        *,
        rank: int,
        validation: bool,
    ):
        # `tokenize_unit` is looked up here, when the stream is built, so that a replacement (tests and
        # bench/bench_dataloader.py count the units tokenized) takes effect.
        self.pool = WorkerPool(tokenize_unit, tokenizer, config.num_workers)
        settings = OrderSettings(
            seed=config.seed,
            shuffle=config.shuffle and not validation,  # the held-out stream is read in file order
            shuffle_window=config.shuffle_window,
            unit_docs=config.unit_docs,
        )
        make_request = functools.partial(
            TextUnitRequest,
            add_bos=config.add_bos,
            held_out_fraction=config.held_out_fraction,
            keep_held_out=validation,
        )
        streams = [GroupStream(g, settings, self.pool, make_request, rank=rank) for g in groups]
        self.mixer = Mixer(streams, [g.weight for g in groups], finite=validation)
        self.packer = Packer(config.seq_len, tokenizer.pad_id, policy="concat")
        self.sources = sorted({p.source for g in groups for p in g.parts})
        self.reset()

    @property
    def streams(self) -> list[GroupStream]:
        return self.mixer.streams

    def reset(self) -> None:
        self.mixer.reset()
        self.packer.reset()
        self.current_group = 0  # the group of the document the packer holds
        self.tokens_per_source = dict.fromkeys(self.sources, 0)  # tokens emitted in rows

    def state_dict(self) -> dict[str, Any]:
        current = None
        if (cut := self.packer.cut) is not None:
            document, offset = cut
            current = {"group": self.current_group, "ref": list(document.ref), "offset": offset}
        return {
            **self.mixer.state_dict(),
            "current": current,
            "tokens_per_source": dict(self.tokens_per_source),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self.mixer.load_state_dict(state)
        self.tokens_per_source.update({k: int(v) for k, v in state["tokens_per_source"].items()})
        if (current := state["current"]) is not None:
            self.current_group = int(current["group"])
            epoch, part_index, position = (int(x) for x in current["ref"])
            document = self.mixer.document_at(self.current_group, (epoch, part_index, position))
            self.packer.restore(document, int(current["offset"]))

    def counters(self) -> dict[str, dict[str, int]]:
        return {"tokens_per_source": dict(self.tokens_per_source)}

    def prefetch(self) -> None:
        """Tell the workers which units come next."""
        self.pool.prefetch(self.mixer.upcoming())

    def _take_document(self) -> Document | None:
        taken = self.mixer.next_document()
        if taken is None:
            return None
        self.current_group, document = taken
        return document

    def next_row(self) -> PackedRow | None:
        """The next row of seq_len tokens (None when a finite stream is over)."""
        row = self.packer.next_row(self._take_document)
        if row is None:
            return None
        for segment in row.segments:
            self.tokens_per_source[segment.source] += segment.length
        self.prefetch()
        return row

    def close(self) -> None:
        self.pool.close()


class PretrainDataLoader(PackedLoader):
    """Batches of packed rows for one rank, with `state_dict()`/`load_state_dict()` for exact resume (see
    dataset.loader.PackedLoader)."""

    STATE_VERSION = STATE_VERSION
    READS_VERSIONS = (1, 2)  # v1 holds every key v2 reads

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
        self.world_size = world_size
        batch_size = batch_size or config.batch_size
        groups = plan_groups(
            config.shards, config.validation_shards, config.mixture, rank, world_size, validation=validation
        )
        super().__init__(
            PretrainStream(config, tokenizer, groups, rank=rank, validation=validation),
            batch_size=batch_size,
            fingerprint=self._fingerprint(groups, rank, world_size, batch_size),
            position_ids=config.document_masking,
            pin_memory=config.pin_memory,
            validation=validation,
            max_batches=max_batches,
            rank=rank,
        )

    def _fingerprint(
        self, groups: list[Group], rank: int, world_size: int, batch_size: int
    ) -> dict[str, Any]:
        """What the row stream depends on; a state saved under other settings cannot resume exactly."""
        c = self.config
        shards = sorted({(Path(p.path).name, Path(p.path).stat().st_size) for g in groups for p in g.parts})
        return {
            "rank": rank,
            "world_size": world_size,
            "seq_len": c.seq_len,
            "batch_size": batch_size,
            "seed": c.seed,
            "mixture": dict(sorted(c.mixture.items())),
            "add_bos": c.add_bos,
            "shuffle": c.shuffle,
            "shuffle_window": c.shuffle_window,
            "unit_docs": c.unit_docs,
            "validation_fraction": c.held_out_fraction,
            "vocab_size": self.tokenizer.vocab_size,
            "shards": hashlib.sha256(orjson.dumps(shards)).hexdigest()[:16],
        }

    @property
    def tokens_per_source(self) -> dict[str, int]:
        """Tokens handed out so far per source (Open-Llama's training data category distribution)."""
        return self.counters()["tokens_per_source"]


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
    """This rank's held-out stream (None when the config holds nothing out): the same batches every time
    it is iterated; with `max_batches` exactly that many, starting over if the held-out set is shorter."""
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


@dataclass
class ShowConfig:
    """What to print (the `show:` options of `python dataset/pretrain_dataset.py`)."""

    batches: NonNegativeInt = 1
    """Batches to print."""
    validation: bool = False
    """Show the held-out stream instead of the training stream."""
    rank: NonNegativeInt = 0
    """Show this rank's share ..."""
    world_size: PositiveInt = 1
    """... of a run with this many processes."""
    max_chars: NonNegativeInt = 160
    """Characters shown per document segment (0: all)."""

    def __post_init__(self) -> None:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} must be less than world_size {self.world_size}")


@dataclass
class InspectConfig:
    """The data section of a run config (its other sections are ignored) and what to print."""

    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    show: ShowConfig = field(default_factory=ShowConfig)


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
    filled = sum(seg.length for seg in row.segments)
    if filled < len(row.tokens):
        lines.append(f"  [{filled}:{len(row.tokens)}] padding, labels -100")
    return "\n".join(lines)


def show(config: PretrainDataConfig, options: ShowConfig) -> None:
    """Print the first rows of the stream `options` chooses, then the tokens per source."""
    from dataset.tokenizer import Tokenizer

    if not config.tokenizer:
        raise ValueError("no tokenizer: pass --data.tokenizer DIR or set data.tokenizer in the config")
    if options.validation and not config.validation_shards and not config.validation_fraction:
        raise ValueError("no held-out stream: set data.validation_shards or data.validation_fraction")
    tokenizer = Tokenizer.load(config.tokenizer)
    rank, world_size = options.rank, options.world_size
    with PretrainDataLoader(
        config, tokenizer, rank=rank, world_size=world_size, validation=options.validation
    ) as loader:
        groups = ", ".join(f"{s.group.name} ({len(s.group.parts)} parts)" for s in loader.stream.streams)
        print(
            f"{'held-out' if options.validation else 'training'} stream of rank {rank}/{world_size}: "
            f"seq_len {config.seq_len}, batch_size {loader.batch_size}, document_masking "
            f"{config.document_masking}, add_bos {config.add_bos}; groups: {groups}"
        )
        rows = loader.iter_rows()
        for b in range(options.batches):
            for r in range(loader.batch_size):
                row = next(rows, None)
                if row is None:
                    break
                print(f"batch {b} row {r}:")
                print(format_row(row, tokenizer, max_chars=options.max_chars))
        counts = loader.tokens_per_source
        total = sum(counts.values()) or 1
        print("tokens per source: " + ", ".join(f"{s} {n:,} ({n / total:.1%})" for s, n in counts.items()))


PROG = "dataset/pretrain_dataset.py"


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(InspectConfig, argv, prog=PROG, allow_extra_sections=True)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        show(config.data, config.show)
    except (ValueError, OSError, ShardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
