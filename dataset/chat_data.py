"""Instruction data, prepared once: sources -> conversations -> ids and loss masks -> shuffled shards.

Before training (and for the preview) every source is read once (dataset/chat_sources.py), each
conversation is rendered through the chat template (dataset/chat_template.py) and fitted to `seq_len`
(the truncation policy below), and the result is written as shards of the pipeline's own kind,
`part-<source>-<k>.jsonl.zst`, one conversation a line: `{"ids": [...], "train": [[start, end], ...],
"origin": "file:line"}` (the trained spans are half-open token ranges). The training stream then reads
those shards with the shared parts (dataset/shards.py, document_order.py, mixing.py) and never tokenizes.

Why once, before training: everything a user must know before spending GPU hours is known then, and
printed: how many records were malformed (with `file:line` and why), how many conversations lost turns or
were dropped by truncation, how many tokens are trained. It also makes tokenization parallel
(SentencePiece threads over a chunk of conversations) and the data the same on every rank.

Truncation (never silent; every case is counted in the report):
1. A conversation that fits in `seq_len` tokens is kept whole.
2. Otherwise its oldest exchanges (a user turn and the answers after it) are dropped, as few as needed,
   keeping `<s>` and the system message: the latest turns are what the answer depends on.
3. If the last exchange alone is still too long, the conversation is cut at `seq_len` tokens from the
   start (the end of the answer is lost, and with it that turn's `<|end|>`).
4. A conversation left with no trained token is dropped.

The held-out split (`validation_fraction`) is chosen by a hash of each conversation's messages, the same on
every machine, or comes from separate `validation_files`. Training shards are written in a seeded random
order (a two-pass shuffle through bucket files, so memory stays bounded whatever the data size); the
stream reshuffles every epoch on top of that.

The prepared folder (`data.cache_dir`) is rebuilt, atomically, when anything it depends on changed: the
sources (file sizes and modification times, or a dataset's fingerprint), the tokenizer, the template,
seq_len, the split and the seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import zstandard

from common.files import replace_dir, write_atomic
from common.randomness import mix_seed, name_seed, seeded_permutation
from dataset.chat_sources import FORMATS, ChatRecord, ChatSource, iter_source, parse_sources
from dataset.chat_template import CHAT_TEMPLATE, ChatTokenizer, RenderedChat, render_chats
from dataset.mixing import check_weights
from dataset.text_units import is_held_out

PREPARED_VERSION = 1
REPORT_FILE = "report.json"
SHARD_RECORDS = 4096  # conversations per prepared shard
CHUNK = 512  # conversations rendered per encode_batch call
SHUFFLE_BUCKETS = 16  # the two-pass shuffle holds about 1/16 of a source in memory at a time
MAX_EXAMPLES = 20  # malformed records listed per source in the report


@dataclass
class ChatDataConfig:
    """Instruction data and how it becomes batches (the `data:` section of an instruction-tuning run)."""

    files: list[str] = field(default_factory=list)
    """Sources: files, globs or folders (jsonl, JSON array, parquet; plain or compressed), NAME=PATTERN to
    name a source, or hf:DATASET[@CONFIG][:SPLIT] for a Hugging Face dataset. One value alone is fine."""
    tokenizer: str = ""
    """Tokenizer folder; empty = the tokenizer of the --init model."""
    format: str = "auto"
    """Record format: auto (told apart by the keys of each record), alpaca, sharegpt, messages or completion
    (prompt/completion)."""
    mixture: dict[str, float] = field(default_factory=dict)
    """Token share per source name (the file name without suffixes, or NAME of NAME=PATTERN), e.g.
    {alpaca: 1, chat: 2}; a source weighted 0 is left out. Empty = all sources in their natural proportion."""
    seq_len: int = 2048
    """Tokens per row. Longer conversations are truncated (oldest turns first, see docs)."""
    batch_size: int = 8
    """Rows per batch on each device (the micro-batch)."""
    packing: str = "best_fit"
    """best_fit: several conversations per row (positions restart and attention stays inside each); pad:
    one conversation per row, each batch padded to its longest row. Both give the same loss."""
    pack_block: int = 1024
    """Conversations arranged together: best-fit packs (or pad groups by length) within a block."""
    seed: int = 0
    """Seed of the shuffles (preparation, order, packing)."""
    validation_files: list[str] = field(default_factory=list)
    """Held-out sources (same forms as files) for the validation loss."""
    validation_fraction: float = 0.0
    """Hold out this fraction of the conversations (chosen by a hash of their messages) instead; used when
    validation_files is empty."""
    cache_dir: str = ""
    """Where the prepared data goes; empty = <train.output_dir>/data."""
    num_workers: int = 0
    """Processes that read prepared shards (0 = in the main process; reading is cheap). Does not change
    the data."""
    pin_memory: bool = False
    """Return batches in pinned memory (faster copies to a GPU)."""

    def __post_init__(self) -> None:
        for name in ("files", "validation_files"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        checks = [
            (self.format in FORMATS, f"format must be one of {', '.join(FORMATS)}"),
            (self.packing in ("best_fit", "pad"), "packing must be best_fit or pad"),
            (self.seq_len >= 8, "seq_len must be >= 8"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.pack_block >= 1, "pack_block must be >= 1"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (0.0 <= self.validation_fraction < 1.0, "validation_fraction must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.mixture = check_weights(self.mixture)


# ---------------------------------------------------------------------------------------------------
# Truncation


@dataclass
class Fitted:
    """A conversation fitted to the row length."""

    ids: list[int]
    trained: list[bool]
    dropped_messages: int
    """Messages of the oldest exchanges dropped (0: none)."""
    cut: bool
    """True when the end was cut off at the row length."""


def fit_to_length(chat: RenderedChat, max_tokens: int) -> Fitted | None:
    """`chat` within `max_tokens` tokens by the truncation policy (module docstring); None when nothing
    trained would be left."""
    ids, trained = chat.ids, chat.trained
    if len(ids) <= max_tokens:
        return Fitted(ids, trained, 0, False)
    first = 1 if chat.roles[0] == "system" else 0  # the message after the system prompt
    keep_head = chat.starts[first] if first < len(chat.starts) else len(ids)  # <s> and the system prompt
    # An exchange starts at a user message that follows a non-user one; dropping stops at the last
    # exchange that still holds a trained token.
    cuts = [
        m
        for m in range(first + 1, len(chat.roles))
        if chat.roles[m] == "user" and chat.roles[m - 1] != "user" and any(trained[chat.starts[m] :])
    ]
    dropped_to = first
    for m in cuts:
        dropped_to = m
        if keep_head + len(ids) - chat.starts[m] <= max_tokens:
            break
    if dropped_to != first:
        cut_from = chat.starts[dropped_to]
        ids = ids[:keep_head] + ids[cut_from:]
        trained = trained[:keep_head] + trained[cut_from:]
    was_cut = len(ids) > max_tokens
    ids, trained = ids[:max_tokens], trained[:max_tokens]
    if not any(trained):
        return None
    return Fitted(ids, trained, dropped_to - first, was_cut)


def trained_spans(trained: Sequence[bool]) -> list[list[int]]:
    """[start, end) runs of True."""
    spans, start = [], None
    for i, flag in enumerate([*trained, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append([start, i])
            start = None
    return spans


# ---------------------------------------------------------------------------------------------------
# Writing shards


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
# Preparing


@dataclass
class SourceReport:
    """What preparing one source found; the numbers of the data report."""

    spec: str
    records: int = 0
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)
    held_out: int = 0
    kept: int = 0
    oldest_turns_dropped: int = 0
    cut_at_seq_len: int = 0
    dropped_nothing_trained: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0


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


def prepare_chat_data(
    config: ChatDataConfig,
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
    cache_dir = Path(cache_dir)
    sources = parse_sources(config.files)
    if not sources:
        raise ValueError("no instruction data: set data.files")
    validation = parse_sources(config.validation_files) if config.validation_files else []
    fingerprint = _fingerprint(config, sources, validation, Path(tokenizer_dir), max_records)

    def build(tmp: Path) -> dict[str, Any]:
        fraction = 0.0 if validation else config.validation_fraction
        report: dict[str, Any] = {
            "version": PREPARED_VERSION,
            "fingerprint": fingerprint,
            "seq_len": config.seq_len,
        }
        report["sources"] = {
            s.name: asdict(_prepare_source(s, config, tokenizer, tmp, fraction, max_records, log))
            for s in sources
        }
        report["validation"] = {
            s.name: asdict(_prepare_source(s, config, tokenizer, tmp, None, max_records, log))
            for s in validation
        }
        if fraction:
            report["validation"] = {
                name: {"spec": f"{fraction:.1%} of {name}", "kept": src["held_out"]}
                for name, src in report["sources"].items()
            }
        if not any(s["kept"] for s in report["sources"].values()):
            raise ValueError(f"no usable conversation in {config.files}:\n{format_report(report)}")
        return report

    return prepare_folder(cache_dir, fingerprint, build, what="instruction data", log=log)


def prepare_folder(
    cache_dir: Path, fingerprint: str, build: Callable[[Path], dict[str, Any]], *, what: str, log: Any
) -> PreparedData:
    """The prepared folder at `cache_dir` when its report has `fingerprint`; otherwise `build(tmp)` writes
    the shards into a temporary folder beside it and returns the report (with the fingerprint), which is
    saved there before the folder atomically replaces `cache_dir`."""
    existing = read_report(cache_dir)
    if existing is not None and existing.get("fingerprint") == fingerprint:
        log(f"prepared {what} is up to date: {cache_dir}")
        return PreparedData(cache_dir, existing)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    for leftover in cache_dir.parent.glob(f".{cache_dir.name}.tmp-*"):  # from a preparation killed midway
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    try:
        report = build(tmp)
        write_atomic(tmp / REPORT_FILE, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        replace_dir(tmp, cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PreparedData(cache_dir, report)


def _prepare_source(
    source: ChatSource,
    config: ChatDataConfig,
    tokenizer: ChatTokenizer,
    tmp: Path,
    held_out_fraction: float | None,
    max_records: int,
    log: Any,
) -> SourceReport:
    """Read, render, fit and write one source. `held_out_fraction` None: a validation source (kept whole,
    in file order); else its held-out part goes to the validation shards."""
    report = SourceReport(source.spec)
    is_validation = held_out_fraction is None
    seed = mix_seed(config.seed, name_seed(source.name))
    shuffler = None if is_validation else Shuffler(tmp / f".shuffle-{source.name}", seed)
    held_out = ShardWriter(tmp / "validation", source.name)
    threads = max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    chunk: list[ChatRecord] = []

    def flush_chunk() -> None:
        rendered = render_chats(tokenizer, [r.messages or [] for r in chunk], num_threads=threads)
        for record, chat in zip(chunk, rendered):
            fitted = fit_to_length(chat, config.seq_len)
            if held_out_fraction:
                key = orjson.dumps(record.messages, option=orjson.OPT_SORT_KEYS).decode()
                if is_held_out(key, held_out_fraction):
                    if fitted is not None:
                        report.held_out += 1
                        held_out.add(_line(fitted, record.origin))
                    continue
            report.oldest_turns_dropped += bool(fitted is not None and fitted.dropped_messages)
            report.cut_at_seq_len += bool(fitted is not None and fitted.cut)
            if fitted is None:
                report.dropped_nothing_trained += 1
                continue
            report.kept += 1
            report.tokens += len(fitted.ids)
            report.trained_tokens += sum(fitted.trained)
            report.longest = max(report.longest, len(fitted.ids))
            if shuffler is None:
                held_out.add(_line(fitted, record.origin))
            else:
                shuffler.add(_line(fitted, record.origin))
        chunk.clear()

    for record in iter_source(source, config.format):
        if max_records and report.records >= max_records:
            break
        report.records += 1
        if record.messages is None:
            report.malformed += 1
            if len(report.malformed_examples) < MAX_EXAMPLES:
                report.malformed_examples.append(f"{record.origin}: {record.error}")
            continue
        chunk.append(record)
        if len(chunk) == CHUNK:
            flush_chunk()
    if chunk:
        flush_chunk()
    held_out.flush()
    if shuffler is not None:
        writer = ShardWriter(tmp / "train", source.name)
        for line in shuffler.drain():
            writer.add(line)
        writer.flush()
        shutil.rmtree(tmp / f".shuffle-{source.name}")
    log(f"prepared {source.name}: {_summary(asdict(report))}")
    return report


def _line(fitted: Fitted, origin: str) -> bytes:
    return orjson.dumps({"ids": fitted.ids, "train": trained_spans(fitted.trained), "origin": origin})


def _fingerprint(
    config: ChatDataConfig,
    sources: list[ChatSource],
    validation: list[ChatSource],
    tokenizer_dir: Path,
    max_records: int,
) -> str:
    return prepared_fingerprint(
        sources,
        validation,
        tokenizer_dir,
        version=PREPARED_VERSION,
        format=config.format,
        seq_len=config.seq_len,
        validation_fraction=config.validation_fraction,
        seed=config.seed,
        max_records=max_records,
        shard_records=SHARD_RECORDS,
    )


def prepared_fingerprint(
    sources: list[ChatSource], validation: list[ChatSource], tokenizer_dir: Path, **settings: Any
) -> str:
    """What a prepared folder depends on: its sources' identities, the tokenizer model, the chat template
    and the stage's `settings`, hashed."""
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


# ---------------------------------------------------------------------------------------------------
# The report as text


def _summary(source: dict[str, Any]) -> str:
    parts = [f"{source['records']:,} records", f"{source['kept']:,} kept"]
    for key, what in [
        ("malformed", "malformed"),
        ("held_out", "held out"),
        ("oldest_turns_dropped", "lost their oldest turns"),
        ("cut_at_seq_len", "cut at seq_len"),
        ("dropped_nothing_trained", "dropped (nothing trained left)"),
    ]:
        if source.get(key):
            parts.append(f"{source[key]:,} {what}")
    if source.get("tokens"):
        parts.append(
            f"{source['tokens']:,} tokens ({source['trained_tokens'] / source['tokens']:.0%} trained), "
            f"longest {source['longest']:,}"
        )
    return ", ".join(parts)


def format_report(report: dict[str, Any]) -> str:
    """The data report as lines: per source what was read, kept, truncated, dropped, and why records were
    malformed (the first few, with file:line)."""
    lines = [f"instruction data (seq_len {report['seq_len']}):"]
    for name, source in report["sources"].items():
        lines.append(f"  {name} ({source['spec']}): {_summary(source)}")
        lines.extend(f"    malformed: {example}" for example in source["malformed_examples"])
        if source["malformed"] > len(source["malformed_examples"]):
            lines.append(f"    ... and {source['malformed'] - len(source['malformed_examples']):,} more")
    for name, source in report["validation"].items():
        summary = _summary(source) if "records" in source else f"{source['kept']:,} conversations"
        lines.append(f"  held out {name} ({source['spec']}): {summary}")
    return "\n".join(lines)
