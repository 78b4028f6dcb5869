"""What a sharding job is: its options, its inputs and where each of its files lies.

Every pipeline step (data/steps.py) is handed the `Job`; data/pipeline.py builds the stages from it and
data/shard.py is its command line. The job's working files live in `DIR/.shard-state/` until the manifest
is written:

    config.json                      the options and inputs the state belongs to
    logs/<stage>/                    datatrove's logging folder of each stage: completions/ (a task that
                                     finished is never run again), stats/, logs/; on Ray also tmp/, each
                                     task's temporary folder while it runs (data/executors.py)
    work/<input>-<shard>.jsonl.zst   the documents an input kept after reading and curation
    counts/<step>/<input>.json       what each step counted for each input (summed into the manifest)
    exact/, near/                    the signatures and duplicate lists of datatrove's dedup stages
    final/                           each final shard's record, written before its rename
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

from common.files import write_atomic

LINES_PER_SHARD = 16384  # Open-Llama's shard size
STATE_DIR = ".shard-state"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
SOURCE_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
MAX_EXAMPLES = 5  # malformed lines / bad records reported in full per input
# Exact dedup keeps the first copy in input order through datatrove's document priority, a 16-bit number
# (65535 - the input's index; 0 is reserved): a job takes at most this many input files.
MAX_INPUTS = 65534

# Why a document read is not in the output, in the order the steps run: the reader's checks, language ID,
# the quality filters (data/curation.py), then exact and near duplicates across the whole corpus.
READ_REASONS = ("malformed", "missing_text", "empty", "too_short", "too_long")
DEDUP_REASONS = ("duplicate", "near_duplicate")


FILTERS = ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")

# lid.176 names a language by its ISO 639-1 code, or ISO 639-3 where there is none ("wuu", "yue").
_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}")


def parse_filters(spec: str | None) -> tuple[str, ...]:
    """`--filters`: "all", or a comma list of FILTERS' names; returned in FILTERS' order."""
    if not spec:
        return ()
    names = {name.strip() for name in spec.split(",")}
    if "all" in names:
        return FILTERS
    unknown = sorted(names - set(FILTERS))
    if unknown:
        raise ValueError(
            f"unknown filter {', '.join(map(repr, unknown))}: choose from all, {', '.join(FILTERS)}"
        )
    return tuple(name for name in FILTERS if name in names)


def parse_languages(spec: str | None) -> tuple[str, ...]:
    """`--languages en,zh`: the codes as lid.176 names them (ISO 639-1, else ISO 639-3), in the order given."""
    if not spec:
        return ()
    codes = [code.strip().lower() for code in spec.split(",")]
    for code in codes:
        if not _LANGUAGE_CODE.fullmatch(code):
            raise ValueError(
                f"--languages: {code!r} is not a language code; give ISO 639-1 codes as fastText's lid.176 "
                "names them, e.g. en,zh (ISO 639-3 where a language has no 2-letter code, e.g. yue)"
            )
    return tuple(dict.fromkeys(codes))


CURATION_REASONS = ("language", *FILTERS)
DROP_REASONS = (*READ_REASONS, *CURATION_REASONS, *DEDUP_REASONS)


class ShardingError(Exception):
    """A fatal problem with the job (bad options, unusable output folder, --strict input error)."""


@dataclass(frozen=True)
class MinhashOptions:
    """--near-dedup's parameters; FineWeb's defaults (5-grams, 14 buckets of 8 hashes: pairs above a 5-gram
    Jaccard similarity of about 0.72 are caught most of the time)."""

    n_grams: int = 5
    buckets: int = 14
    hashes_per_bucket: int = 8


@dataclass(frozen=True)
class ShardOptions:
    """What determines the output (not --workers or the executor, which only change the speed)."""

    fmt: str = "auto"
    source: str | None = None
    lines_per_shard: int = LINES_PER_SHARD
    dedup: bool = True
    min_chars: int = 0
    max_chars: int | None = None
    text_field: str = "text"
    text_unit: str = "line"
    strict: bool = False
    near_dedup: MinhashOptions | None = None
    filters: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()
    language_model: str | None = None
    pii: bool = False

    def validate(self) -> None:
        """Raise ShardingError for a bad option (data/pipeline.py's `check_options` adds curation's checks)."""
        from data.readers import FORMATS, TEXT_UNITS

        if self.fmt not in FORMATS:
            raise ShardingError(f"unknown --format {self.fmt!r}; expected one of {', '.join(FORMATS)}")
        if self.text_unit not in TEXT_UNITS:
            raise ShardingError(f"unknown --text-unit {self.text_unit!r}; expected {', '.join(TEXT_UNITS)}")
        if self.lines_per_shard < 1:
            raise ShardingError("--lines-per-shard must be at least 1")
        if self.max_chars is not None and self.max_chars < max(1, self.min_chars):
            raise ShardingError("--max-chars must be at least 1 and at least --min-chars")
        if self.source is not None and (not self.source or SOURCE_CHARS.search(self.source)):
            raise ShardingError(f"--source {self.source!r}: use letters, digits, '_', '.' and '-' only")
        near = self.near_dedup
        if near is not None and min(near.n_grams, near.buckets, near.hashes_per_bucket) < 1:
            raise ShardingError(
                "--near-dedup's n-grams, buckets and hashes per bucket must each be at least 1"
            )

    @property
    def curated(self) -> bool:
        """Whether curation (data/curation.py) has anything to do."""
        return bool(self.filters or self.languages or self.pii)

    def manifest_form(self) -> dict:
        return asdict(self) | {"filters": list(self.filters), "languages": list(self.languages)}


@dataclass(frozen=True)
class Job:
    """One sharding job: handed, pickled, to every step on every worker (local processes, Ray, Slurm)."""

    inputs: tuple[str, ...]
    output_dir: str
    options: ShardOptions = field(default_factory=ShardOptions)
    keep_removed: str | None = None
    """Where removed documents go (`<reason>/<source>-<input>.jsonl.zst`), or None to drop them."""

    @property
    def state_dir(self) -> Path:
        return Path(self.output_dir) / STATE_DIR

    def work_shard(self, index: int, shard: int) -> Path:
        return self.state_dir / "work" / f"{index:05d}-{shard:05d}.jsonl.zst"

    def counts_path(self, step: str, index: int) -> Path:
        return self.state_dir / "counts" / step / f"{index:05d}.json"

    def save_counts(self, step: str, index: int, counts: dict) -> None:
        """What `step` found in input `index`, written atomically (a rerun of the task rewrites it)."""
        path = self.counts_path(step, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, orjson.dumps(counts))

    def load_counts(self, step: str, index: int) -> dict | None:
        return read_json(self.counts_path(step, index))


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None if there is no such file."""
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None


def final_name(source: str, index: int, shard: int) -> str:
    return f"part-{source}-{index:05d}-{shard:05d}.jsonl.zst"
