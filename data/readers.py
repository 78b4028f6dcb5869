"""Reading raw corpora: decompression, format detection, and records normalised to `{"text", "meta"}`.

Every reader streams: memory stays flat whatever the input size (JSON arrays are parsed incrementally
with ijson, parquet batch by batch, everything else line by line).

Compression is recognised by its magic bytes (zstd, gzip, bz2, xz), so a misnamed file still reads.
A truncated or corrupt compressed file raises `InputError` naming the file, and never yields a partial
last record: the zstd path checks the frame end (`data.shard_io.iter_zstd_chunks`), and gzip/bz2/xz
raise `EOFError`/`OSError`, turned into `InputError` here.

Invalid UTF-8 policy (one for every format): invalid byte sequences and lone surrogate escapes
(`"\\ud800"`) become U+FFFD; the document is kept and counted as `invalid_utf8`.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import json
import lzma
import re
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from data.shard_io import ShardError, iter_lines, iter_zstd_chunks

CHUNK_BYTES = 1 << 20
FORMATS = ("auto", "pile", "wudao", "jsonl", "json", "parquet", "text")
TEXT_UNITS = ("line", "paragraph", "file")

_MAGIC = {
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x1f\x8b": "gzip",
    b"BZh": "bz2",
    b"\xfd7zXZ\x00": "xz",
}
_COMPRESSION_SUFFIXES = {".zst", ".zstd", ".gz", ".gzip", ".bz2", ".xz"}
_OPENERS: dict[str, Callable] = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}
# Suffixes (after any compression suffix) that name a data file; folders are searched for these.
DATA_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": None, ".parquet": "parquet", ".txt": "text"}
_SURROGATE = re.compile("[\ud800-\udfff]")


class InputError(Exception):
    """A problem with one input file (unreadable, truncated, corrupt); the message names the file."""


@dataclass(slots=True)
class Record:
    """One raw unit of an input: a parsed object, or the reason it could not be parsed."""

    line: int  # line number (jsonl, text), or item/row number (JSON array, parquet), from 1
    value: dict | None  # the parsed object; None when `error` is set
    nbytes: int  # uncompressed bytes this record took in the input (for throughput figures)
    invalid_utf8: bool = False
    error: str | None = None  # "malformed" message, already naming file and line


def compression_of(path: str | Path) -> str | None:
    """'zstd', 'gzip', 'bz2', 'xz' from the file's magic bytes, or None for an uncompressed file."""
    with open(path, "rb") as fh:
        head = fh.read(6)
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    return None


def logical_suffix(path: str | Path) -> str:
    """The data suffix under any compression suffix: 'x.jsonl.zst' -> '.jsonl', 'x.json' -> '.json'."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def logical_stem(path: str | Path) -> str:
    """The file name without its data and compression suffixes: '00.jsonl.zst' -> '00'."""
    name = Path(path).name
    suffix = logical_suffix(path)
    for ending in sorted(_COMPRESSION_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(ending):
            name = name[: -len(ending)]
            break
    if suffix and name.lower().endswith(suffix):
        name = name[: -len(suffix)]
    return name


def iter_decompressed(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The uncompressed bytes of a plain, zstd, gzip, bz2 or xz file, in chunks.

    Raises InputError naming the file when it cannot be read, is truncated or is corrupt.
    """
    try:
        kind = compression_of(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if kind == "zstd":
        try:
            yield from iter_zstd_chunks(path, chunk_bytes)
        except ShardError as exc:
            raise InputError(str(exc)) from exc
        return
    opener = _OPENERS.get(kind, open)
    try:
        with opener(path, "rb") as fh:
            while chunk := fh.read(chunk_bytes):
                yield chunk
    except EOFError as exc:
        raise InputError(f"{path}: truncated {kind} stream ({exc})") from exc
    except (OSError, lzma.LZMAError, zlib.error) as exc:
        what = f"corrupt {kind} data" if kind else "cannot read"
        raise InputError(f"{path}: {what} ({exc})") from exc


def detect_format(path: str | Path) -> str:
    """'jsonl', 'json', 'parquet' or 'text' for `--format auto`, from the suffix, else from the content.

    `.json` holds a JSON array (WuDao) or, when it starts with '{', JSON Lines. Without a known suffix
    the first bytes decide: 'PAR1' parquet, '[' JSON array, '{' JSON Lines, anything else text.
    """
    suffix = logical_suffix(path)
    known = DATA_SUFFIXES.get(suffix)
    if known:
        return known
    head = b""
    for chunk in iter_decompressed(path, 1 << 16):
        head += chunk
        if head.lstrip() or len(head) > 1 << 20:
            break
    if head.startswith(b"PAR1"):
        return "parquet"
    first = head.lstrip()[:1]
    if first == b"[":
        return "json"
    if first == b"{":
        return "jsonl"
    if suffix == ".json":  # an empty or whitespace-only .json file: nothing to read either way
        return "jsonl"
    return "text"


def _decode_text(raw: bytes) -> tuple[str, bool]:
    """UTF-8 text and whether invalid sequences had to be replaced with U+FFFD."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), True


def parse_json_line(line: bytes) -> tuple[object, bool]:
    """A JSON value from one line and whether its UTF-8 needed repair; raises ValueError if malformed."""
    try:
        return orjson.loads(line), False
    except orjson.JSONDecodeError as first_error:
        text, replaced = _decode_text(line)
        if replaced:
            try:
                return orjson.loads(text), True
            except orjson.JSONDecodeError:
                pass
        # orjson refuses lone surrogate escapes ("\ud800"); the stdlib parser accepts them.
        try:
            value = json.loads(text)
        except ValueError:
            raise ValueError(str(first_error)) from None
        return orjson.loads(_SURROGATE.sub("\ufffd", json.dumps(value, ensure_ascii=False))), True


def iter_jsonl(path: str | Path, skip: int = 0) -> Iterator[Record]:
    """Records of a JSON Lines file; blank lines are skipped, malformed lines come back as errors."""
    for number, line in enumerate(iter_lines(iter_decompressed(path)), start=1):
        if number <= skip or not line.strip():
            continue
        try:
            value, bad_utf8 = parse_json_line(line)
        except ValueError as exc:
            yield Record(number, None, len(line) + 1, error=f"{path}:{number}: malformed JSON ({exc})")
            continue
        if not isinstance(value, dict):
            message = f"{path}:{number}: expected a JSON object, found {type(value).__name__}"
            yield Record(number, None, len(line) + 1, error=message)
            continue
        yield Record(number, value, len(line) + 1, bad_utf8)


class _SanitisedStream:
    """A file-like view of decompressed bytes with invalid UTF-8 replaced by U+FFFD (for ijson).

    `replacements` counts the invalid sequences met so far, so a caller can tell which item they hit.
    """

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.replacements = 0
        self.bytes_read = 0
        self._buffer = b""
        self._offset = 0
        self._final = False

    def _decode(self, chunk: bytes, final: bool = False) -> bytes:
        try:
            return self._decoder.decode(chunk, final).encode("utf-8")
        except UnicodeDecodeError:
            # Rare path: redo this chunk with replacement, counting the bad sequences.
            pending, _ = self._decoder.getstate()
            self._decoder.reset()
            data = pending + chunk
            text = codecs.getincrementaldecoder("utf-8")("replace").decode(data, final)
            good = codecs.getincrementaldecoder("utf-8")("ignore").decode(data, final)
            self.replacements += max(1, len(text) - len(good))
            return text.encode("utf-8")

    def read(self, size: int = -1) -> bytes:
        # Serve from one decoded chunk at a time by offset: no re-copying of the rest per read.
        while self._offset >= len(self._buffer):
            chunk = next(self._chunks, None)
            if chunk is None:
                if self._final:
                    return b""
                self._final = True
                self._buffer, self._offset = self._decode(b"", final=True), 0
                continue
            self.bytes_read += len(chunk)
            self._buffer, self._offset = self._decode(chunk), 0
        end = len(self._buffer) if size < 0 else self._offset + size
        out = self._buffer[self._offset : end]
        self._offset += len(out)
        return out


def iter_json_array(path: str | Path, skip: int = 0) -> Iterator[Record]:
    """Records of a file holding one JSON array of objects (WuDao's format), parsed incrementally.

    A malformed array cannot be resynchronised, so it raises InputError naming the item reached;
    the items before it have been yielded.
    """
    import ijson  # imported here: only JSON arrays need it

    stream = _SanitisedStream(iter_decompressed(path))
    number = 0
    seen_replacements = 0
    consumed = 0
    try:
        for number, value in enumerate(ijson.items(stream, "item", use_float=True), start=1):
            nbytes, consumed = stream.bytes_read - consumed, stream.bytes_read
            if number <= skip:
                continue
            bad_utf8 = stream.replacements > seen_replacements
            seen_replacements = stream.replacements
            if not isinstance(value, dict):
                message = f"{path}: item {number}: expected a JSON object, found {type(value).__name__}"
                yield Record(number, None, nbytes, error=message)
                continue
            yield Record(number, value, nbytes, bad_utf8)
    except ijson.JSONError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if number <= 1 and "trailing garbage" in detail:  # `{...}` then more: one object per line
            hint = "; one JSON object per line is JSON Lines: use --format jsonl (or pile)"
        raise InputError(f"{path}: malformed JSON array after item {number} ({detail}){hint}") from exc


def iter_parquet(path: str | Path, skip: int = 0, tmp_dir: str | Path | None = None) -> Iterator[Record]:
    """Records (rows as dicts) of a parquet file, read batch by batch.

    Parquet compresses internally; an outer zstd/gzip/... layer is undone into a temporary file first
    because parquet readers need to seek.
    """
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
        source = Path(path)
        if compression_of(path):
            source = Path(tmp) / "input.parquet"
            with open(source, "wb") as out:
                for chunk in iter_decompressed(path):
                    out.write(chunk)
        try:
            parquet = pq.ParquetFile(source)
            row_groups = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
            # Skip whole row groups on resume without decoding them.
            first_group, number = 0, 0
            while first_group < len(row_groups) and number + row_groups[first_group] <= skip:
                number += row_groups[first_group]
                first_group += 1
            groups = list(range(first_group, len(row_groups)))
            for batch in parquet.iter_batches(batch_size=1024, row_groups=groups):
                per_row = max(1, batch.nbytes // max(1, batch.num_rows))
                for row in batch.to_pylist():
                    number += 1
                    if number <= skip:
                        continue
                    yield Record(number, row, per_row)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid/ArrowIOError derive from these
            raise InputError(f"{path}: cannot read parquet ({exc})") from exc


def iter_text(path: str | Path, skip: int = 0, unit: str = "line") -> Iterator[Record]:
    """Plain text as documents: one per line, per blank-line-separated paragraph, or the whole file.

    `file` holds the whole file in memory (one document cannot be streamed); use it for files of
    reasonable size such as books or source files.
    """
    if unit == "file":
        raw = b"".join(iter_decompressed(path))
        if skip < 1:
            text, bad = _decode_text(raw)
            yield Record(1, {"text": text}, len(raw), bad)
        return
    if unit not in TEXT_UNITS:
        raise ValueError(f"unknown text unit {unit!r}; expected one of {', '.join(TEXT_UNITS)}")
    paragraph: list[bytes] = []
    start = 0
    for number, line in enumerate(iter_lines(iter_decompressed(path)), start=1):
        line = line.removesuffix(b"\r")
        if unit == "line":
            if number > skip:
                text, bad = _decode_text(line)
                yield Record(number, {"text": text}, len(line) + 1, bad)
            continue
        if line.strip():
            if not paragraph:
                start = number
            paragraph.append(line)
            continue
        if paragraph and start > skip:
            raw = b"\n".join(paragraph)
            text, bad = _decode_text(raw)
            yield Record(start, {"text": text}, len(raw) + len(paragraph), bad)
        paragraph = []
    if paragraph and start > skip:
        raw = b"\n".join(paragraph)
        text, bad = _decode_text(raw)
        yield Record(start, {"text": text}, len(raw) + len(paragraph), bad)


def iter_records(
    path: str | Path, fmt: str, *, skip: int = 0, text_unit: str = "line", tmp_dir: str | Path | None = None
) -> Iterator[Record]:
    """Records of one input in its file format ('jsonl', 'json', 'parquet', 'text'), after `skip` units."""
    if fmt == "jsonl":
        return iter_jsonl(path, skip)
    if fmt == "json":
        return iter_json_array(path, skip)
    if fmt == "parquet":
        return iter_parquet(path, skip, tmp_dir)
    if fmt == "text":
        return iter_text(path, skip, text_unit)
    raise ValueError(f"unknown file format {fmt!r}")


# --- normalisation -------------------------------------------------------------------------------


class MissingField(ValueError):
    """A record without the field(s) its format needs; the message names the fields found."""


def _scalar_fields(record: dict, exclude: set[str]) -> dict:
    return {
        k: v
        for k, v in record.items()
        if k not in exclude and (v is None or isinstance(v, str | int | float | bool))
    }


def normalise_pile(record: dict, text_field: str = "text") -> tuple[str, dict, str]:
    """The Pile: `text`, and `meta` kept as it is (it holds `pile_set_name`). Returns text, meta, kind."""
    text = record.get(text_field)
    if not isinstance(text, str):
        raise MissingField(_missing(record, text_field))
    meta = record.get("meta")
    return text, dict(meta) if isinstance(meta, dict) else {}, "pile"


def normalise_wudao(record: dict, text_field: str = "text") -> tuple[str, dict, str]:
    """WuDao: `title` + newline + `content` (just `content` when the title is empty); `dataType` kept."""
    content = record.get("content")
    if not isinstance(content, str):
        raise MissingField(_missing(record, "content"))
    title = record.get("title")
    text = f"{title}\n{content}" if isinstance(title, str) and title.strip() else content
    meta = {"dataType": record["dataType"]} if "dataType" in record else {}
    return text, meta, "wudao"


def normalise_generic(record: dict, text_field: str = "text") -> tuple[str, dict, str]:
    """Any corpus: the text field, a `meta` object if present, and other scalar fields added to meta."""
    text = record.get(text_field)
    if not isinstance(text, str):
        raise MissingField(_missing(record, text_field))
    meta = dict(record["meta"]) if isinstance(record.get("meta"), dict) else {}
    meta.update(_scalar_fields(record, {text_field, "meta"}))
    kind = "pile" if "pile_set_name" in meta else "generic"
    return text, meta, kind


def normalise_auto(record: dict, text_field: str = "text") -> tuple[str, dict, str]:
    """The text field when present (The Pile and most corpora), else WuDao's title/content."""
    if text_field not in record and "content" in record:
        return normalise_wudao(record, text_field)
    return normalise_generic(record, text_field)


def _missing(record: dict, field: str) -> str:
    if field in record:
        return f"field {field!r} is {type(record[field]).__name__}, not a string"
    found = ", ".join(sorted(map(str, record))) or "none"
    return f"no {field!r} field (fields found: {found})"


NORMALISERS: dict[str, Callable[[dict, str], tuple[str, dict, str]]] = {
    "pile": normalise_pile,
    "wudao": normalise_wudao,
    "jsonl": normalise_generic,
    "json": normalise_generic,
    "parquet": normalise_generic,
    "text": normalise_generic,
    "auto": normalise_auto,
}
# The file format each --format reads ("auto" detects it per file).
FILE_FORMATS = {"pile": "jsonl", "wudao": "json", "jsonl": "jsonl", "json": "json", "parquet": "parquet"}


def fix_surrogates(text: str) -> tuple[str, bool]:
    """Lone surrogates (from parquet or JSON escapes) replaced by U+FFFD, and whether any were found."""
    if _SURROGATE.search(text):
        return _SURROGATE.sub("\ufffd", text), True
    return text, False
