"""Data prepared once, before training: the skeleton that instruction data and preference pairs fill in.

    sources -> records -> examples -> ids fitted to seq_len -> held out or kept -> shuffled shards + report

Every source (dataset/chat_sources.py) is read once; each record becomes an example or is counted as
malformed (with `file:line` and why); examples are rendered in chunks (SentencePiece threads over a chunk)
and fitted to `seq_len`; the result is written as shards of the pipeline's own kind,
`part-<source>-<k>.jsonl.zst`, one example a line. The training streams (dataset/chat_stream.py,
preference_stream.py) read those shards and never tokenize.

Why once, before training: everything a user must know before spending GPU hours is known then, and
printed (the data report: what was malformed, truncated, dropped, how many tokens are trained). It also
makes tokenization parallel and the data the same on every rank.

The held-out split (`validation_fraction`) is chosen by a hash of each example (dataset/held_out.py), the
same on every machine, or comes from separate `validation_files`. Training shards are written in a seeded
random order (a two-pass shuffle through bucket files, so memory stays bounded whatever the data size); the
streams reshuffle every epoch on top of that.

What differs between kinds of data is a `Preparation`'s hooks: how a record becomes an example, how a chunk
of examples is rendered and fitted to `seq_len`, what the report counts per example, what a line holds,
and the per-kind summary (dataset/chat_prepare.py, dataset/preference_prepare.py).

The prepared folder (`data.cache_dir`: `train/`, `validation/`, `report.json`) is rebuilt, atomically,
when anything it depends on changed: the sources (file sizes and modification times, or a dataset's
fingerprint), the tokenizer, the chat template, seq_len, the split, the seed and the kind's own settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import orjson
import zstandard
from jsonargparse.typing import NonNegativeInt, PositiveInt, restricted_number_type

from common.files import atomic_dir, write_atomic
from common.randomness import mix_seed, name_seed, seeded_permutation
from dataset.chat_sources import ChatSource, parse_sources
from dataset.chat_template import CHAT_TEMPLATE, ChatTokenizer
from dataset.held_out import HeldOutFraction, is_held_out
from dataset.mixing import check_weights

REPORT_FILE = "report.json"
SHARD_RECORDS = 4096  # examples per prepared shard
CHUNK = 512  # examples rendered per encode_batch call
SHUFFLE_BUCKETS = 16  # the two-pass shuffle holds about 1/16 of a source in memory at a time
MAX_EXAMPLES = 20  # malformed records listed per source in the report

SeqLen = restricted_number_type(None, int, (">=", 8))


@dataclass
class PreparedDataConfig:
    """What instruction data and preference pairs share: the sources, the tokenizer, the rows and batches,
    the held-out split and where the prepared data goes (the `data:` section; the kinds add their own)."""

    files: list[str] = field(default_factory=list)
    """Sources: files, globs or folders (jsonl, JSON array, parquet; plain or compressed), NAME=PATTERN to
    name a source, or hf:DATASET[@CONFIG][:SPLIT] for a Hugging Face dataset. One value alone is fine."""
    tokenizer: str = ""
    """Tokenizer folder; empty = the tokenizer of the --init model."""
    mixture: dict[str, float] = field(default_factory=dict)
    """Token share per source name (the file name without suffixes, or NAME of NAME=PATTERN), e.g.
    {alpaca: 1, chat: 2}; a source weighted 0 is left out. Empty = all sources in their natural proportion."""
    seq_len: SeqLen = 2048
    """Tokens per row. Longer conversations are truncated (oldest turns first, see docs)."""
    batch_size: PositiveInt = 8
    """Rows per batch on each device (the micro-batch)."""
    packing: Literal["best_fit", "pad"] = "best_fit"
    """best_fit: several conversations (or pairs) per row (positions restart and attention stays inside
    each); pad: one per row, each batch padded to its longest row. Both give the same loss."""
    pack_block: PositiveInt = 1024
    """Conversations (or pairs) arranged together: best-fit packs (or pad groups by length) within a block."""
    seed: int = 0
    """Seed of the shuffles (preparation, order, packing)."""
    validation_files: list[str] = field(default_factory=list)
    """Held-out sources (same forms as files) for the validation loss and metrics."""
    validation_fraction: HeldOutFraction = 0.0
    """Hold out this fraction of the conversations (or pairs), chosen by a hash of each, instead; used when
    validation_files is empty."""
    cache_dir: str = ""
    """Where the prepared data goes; empty = <train.output_dir>/data."""
    num_workers: NonNegativeInt = 0
    """Processes that read prepared shards (0 = in the main process; reading is cheap). Does not change
    the data."""
    pin_memory: bool = False
    """Return batches in pinned memory (faster copies to a GPU)."""

    def __post_init__(self) -> None:
        self.mixture = check_weights(self.mixture)


# ---------------------------------------------------------------------------------------------------
# Writing shards


def trained_spans(trained: Sequence[bool]) -> list[list[int]]:
    """[start, end) runs of True: the trained tokens of a prepared line."""
    spans, start = [], None
    for i, flag in enumerate([*trained, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append([start, i])
            start = None
    return spans


class ShardWriter:
    """Lines into `part-<source>-<k>.jsonl.zst` files of SHARD_RECORDS lines each."""

    def __init__(self, folder: Path, source: str):
        self.folder, self.source = folder, source
        self.index, self.lines = 0, []

    def add(self, line: bytes) -> None:
        self.lines.append(line)
        if len(self.lines) == SHARD_RECORDS:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            self.folder.mkdir(parents=True, exist_ok=True)
            data = zstandard.ZstdCompressor(level=3).compress(b"\n".join(self.lines) + b"\n")
            (self.folder / f"part-{self.source}-{self.index:05d}.jsonl.zst").write_bytes(data)
            self.index, self.lines = self.index + 1, []


class Shuffler:
    """A seeded uniform shuffle of lines in bounded memory: each line goes to a random bucket file, then
    every bucket is read back and permuted (the classic two-pass external shuffle)."""

    def __init__(self, folder: Path, seed: int):
        folder.mkdir(parents=True)
        self.seed = seed
        self.count = 0
        self.paths = [folder / f"bucket-{i}" for i in range(SHUFFLE_BUCKETS)]
        self.files = [open(p, "wb") for p in self.paths]  # noqa: SIM115 - closed in drain()

    def add(self, line: bytes) -> None:
        self.files[mix_seed(self.seed, self.count) % SHUFFLE_BUCKETS].write(line + b"\n")
        self.count += 1

    def drain(self) -> Iterator[bytes]:
        for f in self.files:
            f.close()
        for index, path in enumerate(self.paths):
            lines = path.read_bytes().splitlines()
            path.unlink()
            for j in seeded_permutation(len(lines), self.seed, index):
                yield lines[j]


# ---------------------------------------------------------------------------------------------------
# The hooks of a kind of data


@dataclass
class SourceReport:
    """What preparing one source found; the numbers of the data report (each kind adds its own counts)."""

    spec: str
    records: int = 0
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)


@dataclass
class Record:
    """A record of a source: its example, or the report's count it adds to (`problem`) and why."""

    origin: str
    example: Any = None
    problem: str = ""
    why: str = ""


class Preparation(ABC):
    """One kind of prepared data: the hooks `prepare` calls. One instance prepares one folder."""

    what: ClassVar[str]
    """The data's name in messages and the report: "instruction data"."""
    unit: ClassVar[str]
    """One example, in the message when none is usable: "conversation"."""
    items: ClassVar[str]
    """What the lines hold, in the report: "conversations"."""
    version: ClassVar[int]
    """The format of the lines; a new one rebuilds every prepared folder."""
    report_class: ClassVar[type[SourceReport]]
    counted: ClassVar[tuple[tuple[str, str], ...]]
    """(report field, words) of the counts a source's summary names when they are not 0."""
    row_note: ClassVar[str] = ""
    """Said of the rows in the report's first line."""

    def __init__(self, config: PreparedDataConfig, tokenizer: ChatTokenizer):
        self.config, self.tokenizer = config, tokenizer

    @classmethod
    def prepare(
        cls,
        config: PreparedDataConfig,
        tokenizer: ChatTokenizer,
        tokenizer_dir: str | Path,
        cache_dir: str | Path,
        *,
        max_records: int = 0,
        log: Any = print,
    ) -> PreparedData:
        """Prepare `config`'s sources into `cache_dir` (module docstring), or reuse it when up to date.

        `max_records` > 0 reads only that many records of each source (the preview of a large data set).
        Call it on one process at a time (the stage script: the main process first, then the others).
        """
        return _prepare(cls(config, tokenizer), Path(tokenizer_dir), Path(cache_dir), max_records, log)

    def settings(self) -> dict[str, Any]:
        """The kind's own settings the prepared data depends on (part of its fingerprint)."""
        return {}

    @abstractmethod
    def read(self, source: ChatSource) -> Iterator[Record]:
        """The records of `source` in order, each an example or a problem."""

    @abstractmethod
    def held_out_key(self, example: Any) -> str:
        """The text whose hash puts an example in the held-out fraction or not."""

    @abstractmethod
    def fit(self, examples: list[Any], num_threads: int) -> list[Any]:
        """Each example rendered to ids and fitted to seq_len; None for one that nothing is left of."""

    @abstractmethod
    def tally(self, report: Any, fitted: Any, held_out: bool) -> bool:
        """Count a fitted example (None: nothing left) in the source's report; whether to write it."""

    @abstractmethod
    def payload(self, fitted: Any, origin: str) -> bytes:
        """What is kept of a written example until its line is written (through the shuffle)."""

    def line(self, payload: bytes) -> bytes:
        """The prepared line, made when it is written (in the order of the shards)."""
        return payload

    def report_extras(self) -> dict[str, Any]:
        """Entries of the kind's own at the end of the report."""
        return {}

    @classmethod
    def sizes(cls, source: dict[str, Any]) -> list[str]:
        """The end of a source's summary: its tokens and lengths."""
        return []

    @classmethod
    def totals(cls, sources: dict[str, dict[str, Any]]) -> list[str]:
        """Lines about all training sources together."""
        return []

    @classmethod
    def summary(cls, source: dict[str, Any]) -> str:
        """One source's report as a phrase: records, kept, each non-zero count, sizes."""
        parts = [f"{source['records']:,} records", f"{source['kept']:,} kept"]
        parts += [f"{source[key]:,} {words}" for key, words in cls.counted if source.get(key)]
        return ", ".join(parts + cls.sizes(source))

    @classmethod
    def format_report(cls, report: dict[str, Any]) -> str:
        """The data report as lines: per source what was read, kept, truncated, dropped, and why records
        were malformed (the first few, with file:line)."""
        lines = [f"{cls.what} (seq_len {report['seq_len']}{cls.row_note}):"]
        for name, source in report["sources"].items():
            lines.append(f"  {name} ({source['spec']}): {cls.summary(source)}")
            lines.extend(f"    malformed: {example}" for example in source["malformed_examples"])
            if source["malformed"] > len(source["malformed_examples"]):
                lines.append(f"    ... and {source['malformed'] - len(source['malformed_examples']):,} more")
        lines.extend(cls.totals(report["sources"]))
        for name, source in report["validation"].items():
            summary = cls.summary(source) if "records" in source else f"{source['kept']:,} {cls.items}"
            lines.append(f"  held out {name} ({source['spec']}): {summary}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Preparing


@dataclass
class PreparedData:
    """A prepared folder: its shards and its report."""

    path: Path
    report: dict[str, Any]

    @property
    def train_shards(self) -> list[str]:
        return [str(self.path / "train" / "*.jsonl.zst")]

    @property
    def validation_shards(self) -> list[str]:
        return [str(self.path / "validation" / "*.jsonl.zst")] if self.has_validation else []

    @property
    def has_validation(self) -> bool:
        return any(s["kept"] for s in self.report["validation"].values())

    @property
    def fingerprint(self) -> str:
        return self.report["fingerprint"]


def _prepare(
    kind: Preparation, tokenizer_dir: Path, cache_dir: Path, max_records: int, log: Any
) -> PreparedData:
    config = kind.config
    sources = parse_sources(config.files)
    if not sources:
        raise ValueError(f"no {kind.what}: set data.files")
    validation = parse_sources(config.validation_files) if config.validation_files else []
    fingerprint = prepared_fingerprint(
        sources,
        validation,
        tokenizer_dir,
        version=kind.version,
        seq_len=config.seq_len,
        validation_fraction=config.validation_fraction,
        seed=config.seed,
        max_records=max_records,
        **kind.settings(),
    )
    existing = read_report(cache_dir)
    if existing is not None and existing.get("fingerprint") == fingerprint:
        log(f"prepared {kind.what} is up to date: {cache_dir}")
        return PreparedData(cache_dir, existing)
    for leftover in cache_dir.parent.glob(f".{cache_dir.name}.tmp-*"):  # from a preparation killed midway
        shutil.rmtree(leftover, ignore_errors=True)
    with atomic_dir(cache_dir) as tmp:
        fraction = 0.0 if validation else config.validation_fraction
        report: dict[str, Any] = {
            "version": kind.version,
            "fingerprint": fingerprint,
            "seq_len": config.seq_len,
        }
        report["sources"] = {
            s.name: _prepare_source(kind, s, tmp, fraction, max_records, log) for s in sources
        }
        report["validation"] = {
            s.name: _prepare_source(kind, s, tmp, None, max_records, log) for s in validation
        }
        if fraction:
            report["validation"] = {
                name: {"spec": f"{fraction:.1%} of {name}", "kept": src["held_out"]}
                for name, src in report["sources"].items()
            }
        report.update(kind.report_extras())
        if not any(s["kept"] for s in report["sources"].values()):
            raise ValueError(f"no usable {kind.unit} in {config.files}:\n{kind.format_report(report)}")
        write_atomic(tmp / REPORT_FILE, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return PreparedData(cache_dir, report)


def _prepare_source(
    kind: Preparation,
    source: ChatSource,
    tmp: Path,
    held_out_fraction: float | None,
    max_records: int,
    log: Any,
) -> dict[str, Any]:
    """Read, fit and write one source; its report. `held_out_fraction` None: a validation source (kept
    whole, in file order); else its held-out part goes to the validation shards."""
    report = kind.report_class(source.spec)
    seed = mix_seed(kind.config.seed, name_seed(source.name))
    shuffler = None if held_out_fraction is None else Shuffler(tmp / f".shuffle-{source.name}", seed)
    held_out = ShardWriter(tmp / "validation", source.name)
    threads = max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    chunk: list[Record] = []

    def flush_chunk() -> None:
        for record, fitted in zip(chunk, kind.fit([r.example for r in chunk], threads)):
            held = bool(held_out_fraction) and is_held_out(
                kind.held_out_key(record.example), held_out_fraction
            )
            if kind.tally(report, fitted, held):
                payload = kind.payload(fitted, record.origin)
                if held or shuffler is None:
                    held_out.add(kind.line(payload))
                else:
                    shuffler.add(payload)
        chunk.clear()

    for record in kind.read(source):
        if max_records and report.records >= max_records:
            break
        report.records += 1
        if record.problem:
            setattr(report, record.problem, getattr(report, record.problem) + 1)
            if record.problem == "malformed" and len(report.malformed_examples) < MAX_EXAMPLES:
                report.malformed_examples.append(f"{record.origin}: {record.why}")
            continue
        chunk.append(record)
        if len(chunk) == CHUNK:
            flush_chunk()
    if chunk:
        flush_chunk()
    held_out.flush()
    if shuffler is not None:
        writer = ShardWriter(tmp / "train", source.name)
        for payload in shuffler.drain():
            writer.add(kind.line(payload))
        writer.flush()
        shutil.rmtree(tmp / f".shuffle-{source.name}")
    summary = asdict(report)
    log(f"prepared {source.name}: {kind.summary(summary)}")
    return summary


def prepared_fingerprint(
    sources: list[ChatSource], validation: list[ChatSource], tokenizer_dir: Path, **settings: Any
) -> str:
    """What a prepared folder depends on: its sources' identities, the tokenizer model, the chat template
    and the kind's `settings`, hashed."""
    model_file = tokenizer_dir / "tokenizer.model"
    inputs = {
        **settings,
        "sources": {s.name: s.identity() for s in sources},
        "validation": {s.name: s.identity() for s in validation},
        "tokenizer": hashlib.sha256(model_file.read_bytes()).hexdigest() if model_file.is_file() else "",
        "template": hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest(),
    }
    return hashlib.sha256(orjson.dumps(inputs, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def read_report(cache_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((cache_dir / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return None
