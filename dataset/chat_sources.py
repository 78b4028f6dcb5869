"""Instruction data as conversations: files or Hugging Face datasets, in alpaca, ShareGPT or messages form.

A source is one entry of `data.files`:

    data/alpaca.json                 a file: jsonl, JSON array or parquet, plain or compressed (zstd, gzip,
                                     bz2, xz; recognised by their magic bytes, see data/readers.py)
    'data/chat/*.jsonl.zst'          a glob or a folder: every matching file is a source of its own
    chat=data/chat/                  NAME=PATTERN: all the files of the pattern form one source, NAME
    hf:tatsu-lab/alpaca              a Hugging Face dataset through `datasets.load_dataset` (split train)
    hf:HuggingFaceH4/ultrachat_200k@default:train_sft    ...with a configuration and a split

A source's name (the file name without its suffixes, the dataset's last path part, or NAME) is the key of
its mixing weight and of its rows in the data report.

Record formats (`data.format`; `auto` tells them apart per record by their keys):

- alpaca: {"instruction", "input" (may be empty or absent), "output", "system" (optional)}: one exchange,
  the user message being the instruction, then a blank line and the input when there is one;
- sharegpt: {"conversations": [{"from": "human" | "gpt" | "system", "value": ...}, ...], "system"
  (optional)}; "user" and "assistant" are accepted as `from` too;
- messages: {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]} (also under
  "conversations" when its items have role/content);
- completion: {"prompt", "completion", "system" (optional)}: one exchange (self-instruct, TRL's
  prompt-completion form).

A record that does not fit its format, or whose conversation breaks the rules of
`dataset.chat_template.check_messages`, is malformed: it is skipped and reported with where it is
(`file:line` for JSON Lines, `file: item N` for a JSON array, `file: row N` for parquet and Hugging Face
datasets) and why. A file that cannot be read at all (truncated, a broken JSON array) is an error naming it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.readers import InputError, Record, detect_format, iter_records, logical_stem, logical_suffix
from data.shard_io import match_patterns
from dataset.chat_template import check_messages

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "completion")
HF_PREFIX = "hf:"
CHAT_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
_NAME = re.compile(r"^[A-Za-z0-9_.]+$")
_NAMED = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)=(?P<pattern>.+)$")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class ChatSource:
    """One source of conversations: local files, or a Hugging Face dataset (`hf_name` set)."""

    name: str
    spec: str
    """The `data.files` entry it comes from, for messages."""
    paths: tuple[str, ...] = ()
    hf_name: str = ""
    hf_config: str | None = None
    hf_split: str = "train"

    def identity(self) -> dict[str, Any]:
        """What the prepared data depends on: each file's size and modification time, or the Hugging Face
        dataset's own fingerprint (a hash of its files and processing)."""
        if self.hf_name:
            return {"hf": [self.hf_name, self.hf_config, self.hf_split, load_hf_dataset(self)._fingerprint]}
        return {"files": [[p, Path(p).stat().st_size, Path(p).stat().st_mtime_ns] for p in self.paths]}


@dataclass
class ChatRecord:
    """One record of a source: its conversation, or why it was skipped."""

    origin: str
    """Where the record is: `file:line`, `file: item N`, `file: row N`."""
    messages: Messages | None = None
    error: str | None = None


# ---------------------------------------------------------------------------------------------------
# Which sources `data.files` names


def _chat_files_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and logical_suffix(p) in CHAT_SUFFIXES
    )


def parse_sources(specs: list[str]) -> list[ChatSource]:
    """The sources of `data.files` entries (see the module docstring), in order; raises ValueError or
    FileNotFoundError naming the entry that names nothing, and for two sources of the same name."""
    sources: list[ChatSource] = []
    for spec in specs:
        named = _NAMED.match(spec)
        name, pattern = (named["name"], named["pattern"]) if named else (None, spec)
        if pattern.startswith(HF_PREFIX):
            dataset, _, split = pattern[len(HF_PREFIX) :].partition(":")
            dataset, _, config = dataset.partition("@")
            if not dataset:
                raise ValueError(f"{spec!r}: no dataset name after 'hf:'")
            name = name or _clean_name(dataset.rstrip("/").split("/")[-1])
            sources.append(ChatSource(name, spec, (), dataset, config or None, split or "train"))
            continue
        files: list[Path] = []
        for _, matched in match_patterns(pattern, _chat_files_in):
            files.extend(matched)
        if not files:
            raise FileNotFoundError(
                f"no instruction data matches {pattern!r} (files: {', '.join(CHAT_SUFFIXES)}, "
                "optionally compressed; or hf:NAME for a Hugging Face dataset)"
            )
        if name:
            sources.append(ChatSource(name, spec, tuple(str(p) for p in sorted(set(files)))))
        else:
            sources.extend(
                ChatSource(_clean_name(logical_stem(p)), spec, (str(p),)) for p in sorted(set(files))
            )
    seen: dict[str, str] = {}
    for source in sources:
        if source.name in seen:
            raise ValueError(
                f"two sources are named {source.name!r} ({seen[source.name]!r} and {source.spec!r}); "
                "name them with NAME=PATTERN"
            )
        seen[source.name] = source.spec
    return sources


def _clean_name(name: str) -> str:
    """A source name usable in shard file names and as a mixing-weight key."""
    cleaned = re.sub(r"[^A-Za-z0-9_.]+", "_", name).strip("_.") or "data"
    assert _NAME.match(cleaned)
    return cleaned


# ---------------------------------------------------------------------------------------------------
# Reading records


def iter_raw_records(source: ChatSource) -> Iterator[tuple[str, Any, str | None]]:
    """(origin, record, None) for every record of `source` in order, or (origin, None, why) for one that
    cannot be parsed: any container, any compression, or a Hugging Face dataset. Stages with records of
    their own form (preference pairs) read their sources through this too."""
    if source.hf_name:
        dataset = load_hf_dataset(source)
        where = f"{HF_PREFIX}{source.hf_name}:{source.hf_split}"
        for number, row in enumerate(dataset, start=1):
            yield f"{where}: row {number}", row, None
        return
    for path in source.paths:
        file_format = detect_format(path)
        if file_format == "text":
            raise InputError(f"{path}: not JSON Lines, a JSON array or parquet (the data must be records)")
        for record in iter_records(path, file_format):
            origin = _origin(path, file_format, record)
            if record.error is not None:
                yield origin, None, record.error.removeprefix(f"{origin}: ")
            else:
                yield origin, record.value, None


def iter_source(source: ChatSource, fmt: str = "auto") -> Iterator[ChatRecord]:
    """The records of `source` in order, each with its conversation or why it is malformed."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown instruction data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    for origin, record, error in iter_raw_records(source):
        yield ChatRecord(origin, error=error) if error is not None else _convert(origin, record, fmt)


def _origin(path: str, file_format: str, record: Record) -> str:
    if file_format == "jsonl":
        return f"{path}:{record.line}"
    return f"{path}: {'item' if file_format == 'json' else 'row'} {record.line}"


def load_hf_dataset(source: ChatSource) -> Any:
    """The Hugging Face dataset of a source (`datasets` caches it; offline it reads the local cache)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - it is in requirements.txt
        raise ImportError("Hugging Face datasets need the `datasets` package: pip install datasets") from None
    try:
        return datasets.load_dataset(source.hf_name, source.hf_config, split=source.hf_split)
    except Exception as exc:  # no network, no such dataset, split or configuration: say which source
        raise InputError(f"{source.spec}: cannot load the Hugging Face dataset ({exc})") from exc


def _convert(origin: str, record: Any, fmt: str) -> ChatRecord:
    try:
        return ChatRecord(origin, messages=to_messages(record, fmt))
    except ValueError as exc:
        return ChatRecord(origin, error=str(exc))


def to_messages(record: Any, fmt: str = "auto") -> Messages:
    """The conversation of one record in `fmt` (see the module docstring), checked; ValueError if malformed."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, found {type(record).__name__}")
    if fmt == "auto":
        fmt = _detect(record)
    if fmt == "alpaca":
        messages = _from_alpaca(record)
    elif fmt == "sharegpt":
        messages = _from_sharegpt(record)
    elif fmt == "completion":
        user, answer = _text(record, "prompt", required=True), _text(record, "completion", required=True)
        messages = _with_system(
            record, [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        )
    else:
        messages = record.get("messages", record.get("conversations"))
    return check_messages(messages)


def _detect(record: dict) -> str:
    if "messages" in record:
        return "messages"
    turns = record.get("conversations")
    if isinstance(turns, list):
        first = turns[0] if turns else None
        return "messages" if isinstance(first, dict) and "role" in first else "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "completion"
    found = ", ".join(sorted(map(str, record))) or "none"
    raise ValueError(
        "not alpaca (instruction/input/output), ShareGPT (conversations), messages or prompt/completion; "
        f"fields found: {found}"
    )


def _text(record: dict, key: str, *, required: bool) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        what = "missing" if value is None else f"{type(value).__name__}, not a string"
        raise ValueError(f"field {key!r} is {what}")
    return value


def _with_system(record: dict, messages: Messages) -> Messages:
    system = _text(record, "system", required=False)
    return [{"role": "system", "content": system}, *messages] if system.strip() else messages


def _from_alpaca(record: dict) -> Messages:
    instruction = _text(record, "instruction", required=True)
    extra = _text(record, "input", required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    output = _text(record, "output", required=True)
    return _with_system(record, [{"role": "user", "content": user}, {"role": "assistant", "content": output}])


def _from_sharegpt(record: dict) -> Messages:
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise ValueError("field 'conversations' is missing or not a list")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {index} is {type(turn).__name__}, not an object")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise ValueError(f"turn {index} is from {speaker!r}; expected human, gpt or system")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"turn {index} has a {type(value).__name__} value, not a string")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return _with_system(record, messages)
