"""A rank's share of the shards: which source each shard belongs to, which parts of which shards a rank
reads, and reading the records of a part.

1. Shards are grouped by source, the name in `part-<source>-<index>.jsonl.zst` (for other file names, the
   name of the folder holding the file). With mixture weights each source is a group of its own; without,
   all shards form one group read in their natural proportions.
2. Rank split. A group's shards are cut into *parts*, and part j belongs to rank j % world_size, so across
   the world every record is read exactly once per epoch. A part is a whole shard when there are at least
   EVEN_SPLIT_SHARDS_PER_RANK shards per rank; with fewer, shards are split by record index (part r of a
   shard = its records r, r + world_size, ...), so that every rank gets an equal share.

The plan is a pure function of the shard files, the mixture, rank and world_size.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from data.shard_io import ShardError, expand_shard_paths, iter_lines, iter_zstd_chunks

# data/shard.py writes part-<source>-<input>-<shard>.jsonl.zst; part-<source>-<index>.jsonl.zst is accepted too.
SHARD_NAMES = [
    re.compile(r"^part-(?P<source>.+)-\d+-\d+\.jsonl\.zst$"),
    re.compile(r"^part-(?P<source>.+)-\d+\.jsonl\.zst$"),
]
# With fewer shards per rank than this, splitting whole shards among ranks is uneven (one shard more is up
# to twice the data, and shards differ in size): every rank then reads every world_size-th record of every
# shard instead, an equal share whatever the shard sizes, for the price of decompressing all of them.
EVEN_SPLIT_SHARDS_PER_RANK = 8


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


def plan_groups(
    shards: Sequence[str],
    validation_shards: Sequence[str],
    mixture: dict[str, float],
    rank: int,
    world_size: int,
    *,
    validation: bool,
) -> list[Group]:
    """The groups (sources) of the training or the held-out stream, with this rank's parts.

    `shards` and `validation_shards` are globs, files or folders; held-out shards are left out of training.
    `mixture` maps sources to token shares ({} = one group of everything).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    held_out = expand_shard_paths(list(validation_shards)) if validation_shards else []
    if validation and held_out:
        paths = held_out
    else:
        if not shards:
            raise ValueError("no training shards: set data.shards (globs, files or folders)")
        held = set(held_out)
        paths = [p for p in expand_shard_paths(list(shards)) if p not in held]
        if not paths:
            raise ValueError(f"every shard of {list(shards)} is a validation shard: nothing to train on")
    by_source: dict[str, list[Path]] = {}
    for path in paths:
        by_source.setdefault(shard_source(path), []).append(path)
    if not mixture:
        return [Group("all", 1.0, split_parts(paths, rank, world_size))]
    # A weight for a source with no shard is checked first: it is usually a typo of the source that then
    # seems to lack a weight.
    absent = sorted(s for s, w in mixture.items() if w > 0 and s not in by_source)
    if absent and not validation:
        raise ValueError(f"mixture source(s) {absent} match no shard; sources found: {sorted(by_source)}")
    missing = sorted(set(by_source) - set(mixture))
    if missing and not validation:
        raise ValueError(
            f"shards of source(s) {missing} have no mixture weight; give each a weight (0 leaves it out). "
            f"Weights given: {mixture}"
        )
    return [
        Group(source, mixture.get(source, 1.0), split_parts(by_source[source], rank, world_size))
        for source in sorted(by_source)
        # Held-out shards of a source without a weight are still evaluated; weight 0 leaves a source out.
        if mixture.get(source, 1.0 if validation else 0.0) > 0
    ]


def iter_part_records(part: Part, start: int, stop: int) -> Iterator[tuple[int, Any]]:
    """Records `start` to `stop` (exclusive) of `part`, in file order, as (line number, parsed JSON).

    The shard is decompressed from its start (zstd cannot seek), but only these records are parsed, and
    reading stops after the last one. Blank lines are not records (as in data.shard_io.iter_shard_records).
    """
    record = -1
    for line_number, line in enumerate(iter_lines(iter_zstd_chunks(part.path)), start=1):
        if not line.strip():
            continue
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
        yield line_number, obj
