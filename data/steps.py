"""The sharder's own datatrove pipeline steps; data/pipeline.py puts them, and datatrove's, in order.

Each task of the "read" and "final" stages is one input file (the task's rank is the input's index), so
an input's documents keep their order and a task that is killed is simply run again from the start:
every file a step leaves is written whole or not at all (temporary file, then rename), and datatrove
marks a task complete only after its last step.

- `InputReader` reads one input with data/readers.py (every format, the bad-input policy) and yields
  normalised documents; `Curate` applies data/curation.py (PII, language, quality filters);
  `ExactDedupSignatures` is datatrove's exact-dedup signature step, passing the documents on;
  `WorkShardWriter` writes them into work shards.
- `SurvivorReader` reads an input's work shards back without its exact duplicates, for the MinHash
  signatures (`NearDedupSignatures`: datatrove's, with its shingles built in numpy).
- `Finalise` moves each work shard to its final name, rewritten without the duplicates found.
- `RemovedDocuments` keeps what a step removed, beside the reason (--keep-removed).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import xxhash
import zstandard
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import ExactDedupSignature, get_sig_dtype
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
from datatrove.utils.text import simplify_text

from common.files import write_atomic
from data.job import MAX_EXAMPLES, READ_REASONS, SOURCE_CHARS, Job, final_name, read_json
from data.readers import (
    FILE_FORMATS,
    NORMALISERS,
    InputError,
    MissingField,
    detect_format,
    fix_surrogates,
    iter_records,
    logical_stem,
)
from data.shard_io import iter_lines, iter_zstd_chunks

ZSTD_LEVEL = 3  # fixed, so that the same input always gives the same bytes
# Testing hook: seconds to sleep before each shard is renamed into place, so a test can kill -9 mid-run.
DELAY_ENV = "OPEN_LLAMA_SHARD_DELAY"


def testing_delay() -> None:
    if seconds := float(os.environ.get(DELAY_ENV, "0") or 0):
        time.sleep(seconds)


def derive_source(kind: str, path: str | Path) -> str:
    """'pile' and 'wudao' for those corpora, else the input's file name without suffixes."""
    if kind in ("pile", "wudao"):
        return kind
    return SOURCE_CHARS.sub("_", logical_stem(path)).strip("_.-") or "corpus"


def with_reason(line: bytes, reason: str, where: str) -> bytes:
    """A shard line with the reason its document was removed and where it was read, for --keep-removed."""
    return line[:-1] + b"," + orjson.dumps({"reason": reason, "where": where})[1:]


def encode_document(text: str, meta: dict) -> tuple[bytes, bool]:
    """The shard line of a document, and whether lone surrogates had to be replaced to write it."""
    try:
        return orjson.dumps({"text": text, "meta": meta}), False
    except TypeError:  # orjson refuses lone surrogates (possible from parquet/JSON escapes)
        text, fixed = fix_surrogates(text)
        meta = {k: fix_surrogates(v)[0] if isinstance(v, str) else v for k, v in meta.items()}
        return orjson.dumps({"text": text, "meta": meta}), fixed


# --- writing one zstd shard -------------------------------------------------------------------------


class _HashingFile:
    """A binary file wrapper that hashes and counts what zstd writes through it."""

    def __init__(self, fh) -> None:
        self.fh, self.sha256, self.size = fh, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


class ShardWriter:
    """Writes one zstd shard to a temporary file; `finish` renames it into place and returns its stats."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self._fh = open(self.tmp, "wb")  # noqa: SIM115 (closed by finish/abort; lives across calls)
        self._hashing = _HashingFile(self._fh)
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
        self._writer = compressor.stream_writer(self._hashing, closefd=False)
        self.lines = 0

    def write(self, line: bytes) -> None:
        """One JSON line, without its newline."""
        self._writer.write(line + b"\n")
        self.lines += 1

    def finish(self) -> dict:
        self._writer.flush(zstandard.FLUSH_FRAME)
        self._writer.close()
        self._fh.close()
        testing_delay()
        os.replace(self.tmp, self.path)
        return {"lines": self.lines, "bytes": self._hashing.size, "sha256": self._hashing.sha256.hexdigest()}

    def abort(self) -> None:
        self._fh.close()
        self.tmp.unlink(missing_ok=True)


class RemovedDocuments:
    """--keep-removed: the documents one task removed, one zstd file per reason
    (`<reason>/<source>-<input>.jsonl.zst`), each line the document's shard line plus `reason` and `where`
    (file:line of the input). Files appear when the task finishes."""

    def __init__(self, job: Job, index: int) -> None:
        self.root = Path(job.keep_removed) if job.keep_removed else None
        self.index = index
        self._writers: dict[str, ShardWriter] = {}

    def add(self, reason: str, doc: Document) -> None:
        if self.root is None:
            return
        if reason not in self._writers:
            name = f"{doc.metadata['source']}-{self.index:05d}.jsonl.zst"
            self._writers[reason] = ShardWriter(self.root / reason / name)
        line, _ = encode_document(doc.text, doc.metadata)
        self._writers[reason].write(with_reason(line, reason, doc.id))

    def finish(self) -> None:
        for writer in self._writers.values():
            writer.finish()


class JobStep(PipelineStep):
    """A pipeline step of the sharding job: it reads the job's options and writes into its state folder."""

    def __init__(self, job: Job) -> None:
        super().__init__()
        self.job = job


# --- stage "read": one input -> its work shards -------------------------------------------------------


def _where(path: str, file_format: str | None, number: int) -> str:
    """'file:line' for line-based files, 'file: item N' / 'file: row N' for JSON arrays and parquet."""
    if file_format == "json":
        return f"{path}: item {number}"
    if file_format == "parquet":
        return f"{path}: row {number}"
    return f"{path}:{number}"


class InputReader(JobStep):
    """Reads input file number `rank` of the job; yields one normalised document per record kept.

    Counts what it read and left out (saved as counts/reader/<input>.json when the input is read to its
    end or to an input error): records, input bytes, malformed lines and records without the text field
    (the first few named by file:line; fatal under --strict), empty, too short and too long documents,
    invalid UTF-8 repaired. A truncated or corrupt file keeps the documents before the damage and marks
    the input failed; an input none of whose records has the text field is failed too (a wrong
    --text-field or --format, not a few bad records).
    """

    name = "📖 input file"
    type = "📖 - READER"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        opts, path = self.job.options, self.job.inputs[rank]
        counts = dict.fromkeys(("records", "bytes_in", "invalid_utf8", *READ_REASONS), 0)
        state = {
            "index": rank,
            "path": path,
            "format": None,
            "status": "ok",
            "error": None,
            "source": opts.source,
        }
        examples: list[str] = []
        first_missing: str | None = None

        def problem(reason: str, message: str) -> None:
            counts[reason] += 1
            if opts.strict:
                raise InputError(message)
            if len(examples) < MAX_EXAMPLES:
                examples.append(message)

        normalise = NORMALISERS[opts.fmt]
        try:
            file_format = "text" if opts.fmt == "text" else FILE_FORMATS.get(opts.fmt) or detect_format(path)
            state["format"] = file_format
            records = iter_records(path, file_format, text_unit=opts.text_unit, tmp_dir=self.job.state_dir)
            for record in records:
                counts["records"] += 1
                counts["bytes_in"] += record.nbytes
                if record.error is not None:
                    problem("malformed", record.error)
                    continue
                try:
                    text, meta, kind = normalise(record.value, opts.text_field)
                except MissingField as exc:
                    first_missing = first_missing or str(exc)
                    problem("missing_text", f"{_where(path, file_format, record.line)}: {exc}")
                    continue
                counts["invalid_utf8"] += record.invalid_utf8
                if reason := self._left_out(text):
                    counts[reason] += 1
                    continue
                if state["source"] is None:
                    state["source"] = derive_source(kind, path)
                meta["source"] = state["source"]
                self.stat_update("documents")
                yield Document(text=text, id=_where(path, file_format, record.line), metadata=meta)
        except InputError as exc:
            if opts.strict:
                raise
            # The documents read before the error are complete records (never a partial last one):
            # they are kept, and the input is reported as failed.
            state["status"] = "error"
            state["error"] = f"{exc} (the {counts['records']:,} records before it were read and kept)"
        usable = counts["records"] - counts["malformed"]
        if state["status"] == "ok" and usable and counts["missing_text"] == usable:
            state["status"] = "error"
            state["error"] = (
                f"{path}: none of its {usable:,} records has the text field (first: {first_missing}); "
                "name the field with --text-field or the corpus with --format"
            )
        state["source"] = state["source"] or derive_source("generic", path)
        self.job.save_counts("reader", rank, state | {"counts": counts, "examples": examples})

    def _left_out(self, text: str) -> str | None:
        """Why a document is left out by the length checks ('empty', 'too_short', 'too_long'), or None."""
        opts = self.job.options
        if not text or text.isspace():
            return "empty"
        if len(text) < opts.min_chars:
            return "too_short"
        if opts.max_chars is not None and len(text) > opts.max_chars:
            return "too_long"
        return None


class Curate(JobStep):
    """data/curation.py's decision on each document: PII replaced, then language ID and each filter; a
    document removed is counted under its reason (counts/curate/<input>.json) and kept aside under
    --keep-removed."""

    name = "🔻 curation"
    type = "🔻 - FILTER"

    def __init__(self, job: Job, curation) -> None:
        super().__init__(job)
        self.curation = curation

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        removed = RemovedDocuments(self.job, rank)
        counts = dict.fromkeys(self.curation.reasons, 0)
        for doc in data:
            reason = self.curation(doc)
            if reason is None:
                yield doc
                continue
            counts[reason] += 1
            self.stat_update(f"dropped_{reason}")
            removed.add(reason, doc)
        removed.finish()
        self.job.save_counts("curate", rank, counts)


def document_text(doc: Document) -> str:
    """What exact dedup compares: the whole text."""
    return doc.text


class ExactDedupSignatures(ExactDedupSignature):
    """datatrove's exact-dedup signatures (a 64-bit xxhash of each text, sorted, one file per input),
    collected in numpy arrays (14 bytes a document, only for the input at hand) while the documents are
    passed on to the writer. A document's id in the signatures is its position among the input's
    documents written, which `Finalise` maps back to a shard and a line."""

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        dtype = get_sig_dtype(self.config.hash_config)
        priority = 65535 - rank  # an earlier input wins a tie: the first copy in input order is kept
        chunks, hashes = [], []
        count = 0
        for doc in data:
            hashes.append(self.hash_fc(doc.text))
            if len(hashes) == 65536:
                chunks.append(np.array(hashes, dtype=dtype["hash"]))
                hashes = []
            count += 1
            yield doc
        chunks.append(np.array(hashes, dtype=dtype["hash"]))
        signatures = np.empty(count, dtype=dtype)
        signatures["hash"] = np.concatenate(chunks)
        signatures["priority"] = priority
        signatures["doc"] = np.arange(count, dtype=dtype["doc"])
        self.save_hashes(rank, signatures)


class WorkShardWriter(JobStep):
    """Writes an input's documents into work shards of --lines-per-shard lines; records them in
    counts/writer/<input>.json."""

    name = "💽 work shards"
    type = "💽 - WRITER"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        per_shard = self.job.options.lines_per_shard
        shards: list[dict] = []
        writer: ShardWriter | None = None
        repaired = 0
        try:
            for doc in data:
                if writer is None:
                    writer = ShardWriter(self.job.work_shard(rank, len(shards)))
                line, fixed = encode_document(doc.text, doc.metadata)
                repaired += fixed
                writer.write(line)
                if writer.lines == per_shard:
                    shards.append(writer.finish())
                    writer = None
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            shards.append(writer.finish())
        self.job.save_counts("writer", rank, {"shards": shards, "invalid_utf8": repaired})
        return
        yield  # a generator, like every step: the executor drains it


# --- stage "near": MinHash signatures of the documents exact dedup kept ------------------------------


def _sorted_positions(path: Path) -> np.ndarray:
    """The document positions in one of datatrove's duplicate lists (little-endian uint32), sorted; none
    when the file is absent (the stage did not run, or found nothing for this input)."""
    return np.sort(np.fromfile(path, dtype="<u4")) if path.exists() else np.empty(0, dtype=np.uint32)


def _exact_duplicates(job: Job, rank: int) -> np.ndarray:
    """Positions among input `rank`'s documents of its exact duplicates (ExactFindDedups' output)."""
    return _sorted_positions(job.state_dir / "exact" / "dups" / "00000" / f"{rank:05d}.c4_dup")


def _near_duplicates(job: Job, rank: int) -> np.ndarray:
    """Positions among input `rank`'s documents left after exact dedup of its near duplicates
    (MinhashDedupCluster's output)."""
    return _sorted_positions(job.state_dir / "near" / "remove" / f"{rank:06d}.remove")


def _shard_lines(path: Path) -> Iterator[bytes]:
    return iter_lines(iter_zstd_chunks(path))


class SurvivorReader(JobStep):
    """An input's work-shard documents in order, without its exact duplicates."""

    name = "📖 work shards"
    type = "📖 - READER"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        written = self.job.load_counts("writer", rank)
        duplicates = set(_exact_duplicates(self.job, rank).tolist())
        position = 0
        for shard in range(len(written["shards"])):
            for line in _shard_lines(self.job.work_shard(rank, shard)):
                if position not in duplicates:
                    yield Document(text=orjson.loads(line)["text"], id=str(position))
                position += 1


# A word for MinHash: a CJK ideograph alone (Chinese has no spaces; one character is about half a word),
# or a run of anything else that is not a space.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORDS = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_NGRAM_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: folding word hashes with it keeps all 64 bits in play


class NearDedupSignatures(MinhashDedupSignature):
    """datatrove's MinHash signatures, with shingles built in numpy.

    datatrove tokenizes each text with spaCy and hashes each n-gram's string in Python, which measured
    0.2 MB/s per worker on The Pile's text. Here the text is normalised the same way (datatrove's
    simplify_text: lower case, no punctuation, numbers folded), split into words by one regex (a Chinese
    ideograph counts as a word, so Chinese needs no segmenter), each word hashed once (xxhash) and each
    n-gram's hash folded from its words' hashes in numpy. Signatures, buckets and clusters stay datatrove's.
    """

    def get_shingles(self, text: str) -> np.ndarray:
        words = _WORDS.findall(simplify_text(text, self.config.norm_config))
        n = self.config.n_grams
        if len(words) < n:
            return np.empty((0, 1), dtype=np.uint64)
        hashes = np.fromiter(map(xxhash.xxh64_intdigest, words), dtype=np.uint64, count=len(words))
        count = len(words) - n + 1
        shingles = hashes[:count].copy()
        for k in range(1, n):
            shingles = shingles * _NGRAM_MIX + hashes[k : k + count]
        return shingles.reshape((-1, 1))


# --- stage "final": work shards -> final shards ------------------------------------------------------


class Finalise(JobStep):
    """Moves input `rank`'s work shards to their final names, rewritten without the exact and near
    duplicates found across the corpus; records what it dropped in counts/final/<input>.json.

    Each shard's record (final/<name>.json) is written before its rename, and the documents it drops are
    kept in final/ too until the task ends, so a kill anywhere is resumed by running the task again.
    """

    name = "📦 final shards"
    type = "💽 - WRITER"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        job = self.job
        source = job.load_counts("reader", rank)["source"]
        written = job.load_counts("writer", rank)["shards"]
        exact = _exact_duplicates(job, rank)
        near = _near_duplicates(job, rank)
        final_dir = job.state_dir / "final"
        final_dir.mkdir(parents=True, exist_ok=True)
        shards, dropped = [], {"duplicate": 0, "near_duplicate": 0}
        start = survivors_before = 0  # positions of the shard's first document, overall and after exact dedup
        for shard, work in enumerate(written):
            name = final_name(source, rank, shard)
            end = start + work["lines"]
            exact_here = exact[np.searchsorted(exact, start) : np.searchsorted(exact, end)] - start
            survivors = work["lines"] - len(exact_here)
            near_here = near[
                np.searchsorted(near, survivors_before) : np.searchsorted(near, survivors_before + survivors)
            ]
            info = read_json(final_dir / f"{name}.json")
            if info is None:
                info = self._finalise_shard(rank, shard, name, work, exact_here, near_here - survivors_before)
            if info["lines"] and not (Path(job.output_dir) / name).exists():
                testing_delay()
                os.replace(
                    final_dir / f"{name}.building" if info["rewritten"] else job.work_shard(rank, shard),
                    Path(job.output_dir) / name,
                )
            dropped["duplicate"] += len(exact_here)
            dropped["near_duplicate"] += len(near_here)
            if info["lines"]:
                shards.append({"name": name, **{k: info[k] for k in ("lines", "bytes", "sha256")}})
            start, survivors_before = end, survivors_before + survivors
        self._keep_removed(rank, source, len(written))
        job.save_counts("final", rank, {"shards": shards, **dropped})
        return
        yield

    def _finalise_shard(
        self, rank: int, shard: int, name: str, written: dict, exact: np.ndarray, near: np.ndarray
    ) -> dict:
        """Write shard `name`'s record (and, when it drops documents, its rewritten copy and the documents
        it drops) into final/; the caller renames it into place. `written` is the work shard's record."""
        job, final_dir = self.job, self.job.state_dir / "final"
        if not len(exact) and not len(near):
            info = {k: written[k] for k in ("lines", "bytes", "sha256")} | {"rewritten": False}
            write_atomic(final_dir / f"{name}.json", orjson.dumps(info))
            return info
        exact_set, near_set = set(exact.tolist()), set(near.tolist())
        writer = ShardWriter(final_dir / f"{name}.building")
        removed: dict[str, ShardWriter] = {}
        survivor = 0
        for number, line in enumerate(_shard_lines(job.work_shard(rank, shard))):
            if number in exact_set:
                reason = "duplicate"
            else:
                reason = "near_duplicate" if survivor in near_set else None
                survivor += 1
            if reason is None:
                writer.write(line)
            elif job.keep_removed:
                if reason not in removed:
                    removed[reason] = ShardWriter(final_dir / f"{name}.{reason}")
                removed[reason].write(with_reason(line, reason, f"{name}:{number + 1}"))
        for part in removed.values():
            part.finish()
        if writer.lines:
            info = writer.finish() | {"rewritten": True}
        else:
            writer.abort()
            info = {"lines": 0, "bytes": 0, "sha256": None, "rewritten": True}
        write_atomic(final_dir / f"{name}.json", orjson.dumps(info))
        return info

    def _keep_removed(self, rank: int, source: str, shards: int) -> None:
        """--keep-removed: the duplicates each shard dropped, joined into one file per reason (zstd frames
        concatenate into a valid multi-frame file)."""
        if not self.job.keep_removed:
            return
        final_dir = self.job.state_dir / "final"
        for reason in ("duplicate", "near_duplicate"):
            parts = [final_dir / f"{final_name(source, rank, s)}.{reason}" for s in range(shards)]
            if not (parts := [p for p in parts if p.exists()]):
                continue
            dest = Path(self.job.keep_removed) / reason / f"{source}-{rank:05d}.jsonl.zst"
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, out)
            os.replace(tmp, dest)
