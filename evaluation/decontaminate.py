"""Which task documents the training shards contain: 13-gram overlap, as GPT-3 and The Pile measured it.

A task document is *contaminated* when one of its word 13-grams also occurs in a training document; a task
reports how many of its documents are, and their ids (the ids `--log-samples` writes, `Document.id`).

Words. Both sides are normalised alike, the way EleutherAI's lm-evaluation-harness Janitor
(`lm_eval/decontamination/janitor.py`) did for The Pile's contamination study: ASCII letters lower-cased,
ASCII punctuation (`string.punctuation`) deleted (so "don't" is "dont"), then split on whitespace as
`str.split()` does (ASCII and Unicode whitespace). GPT-3 (Brown et al. 2020, appendix C) filtered its
training data on 13-gram overlaps the same way, "ignoring all punctuation, whitespace, and casing". Non-ASCII
letters keep their case and text without spaces (Chinese) is one long word per run, as in the Janitor. NUL
characters are deleted too. A document shorter than 13 words has no 13-gram and is never contaminated; the
report counts such documents (`short`) so that a reader knows which could not be checked.

A task document's text: its own prompt plus its gold continuation (GPT-3 checked the whole example; the
wrong choices are not part of any text a model trains on). The few-shot examples are not its own: they are
the prefix every context of the task shares, up to its last blank line, and are dropped; so are OLMES's
prompt labels ("Question:", "Answer:", "Goal:") at the start of a line, which would otherwise sit inside
every n-gram that spans them.

Speed. Every n-gram becomes a 64-bit hash with numpy, never a Python object: the text of a batch of
documents is one UTF-8 byte array; a 256-entry table lower-cases and deletes punctuation; each word's hash
is a polynomial over its bytes taken from one prefix sum (and the inverse powers of the base, which exist
modulo 2**64 for an odd base); each 13-gram's hash is the same over its words' hashes; both are mixed by
splitmix64's finaliser. The task side's hashes are held sorted in memory behind a bitmap of their top bits,
so a training hash costs one table look-up and only the rare bitmap hits a binary search. Bloom-filter
libraries (rbloom, pybloom) answer one Python call per item, which is the cost avoided here. Hash collisions:
with a million task n-grams and 10**10 training n-grams the expected number of false matches is about
10**16 / 2**64, under 0.001.

Memory. The training side is streamed: shards are read record by record (`data.shard_io`) in batches of
about BATCH_CHARS characters, a document longer than PIECE_CHARS in overlapping pieces (an n-gram longer than
OVERLAP_CHARS characters across a piece edge is missed), and only the matched task hashes are kept. The
shards are spread over worker processes (`dataset.worker_pool.WorkerPool`, one shard per request); each
returns its matches and counts.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.shard_io import expand_shard_paths, iter_shard_records
from dataset.worker_pool import WorkerPool
from evaluation.tasks import Task

NGRAM = 13
BATCH_CHARS = 1 << 20
PIECE_CHARS = 1 << 20
OVERLAP_CHARS = 1 << 16
PROMPT_LABELS = re.compile(r"^(?:Question|Answer|Goal):", re.MULTILINE)

_U64 = np.uint64
_BYTE_BASE = 0x100000001B3  # odd, so invertible modulo 2**64
_WORD_BASE = 0x9E3779B97F4A7C15


def _byte_table() -> np.ndarray:
    """Byte -> normalised byte: A-Z to a-z, ASCII whitespace to a space, punctuation and NUL to 0 (deleted).
    Bytes >= 0x80 are parts of multi-byte characters and pass unchanged (no ASCII byte occurs inside one)."""
    table = np.arange(256, dtype=np.uint8)
    for letter in string.ascii_uppercase:
        table[ord(letter)] = ord(letter.lower())
    for char in "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f":  # what str.split() splits on below 0x80
        table[ord(char)] = ord(" ")
    for char in string.punctuation + "\x00":
        table[ord(char)] = 0
    return table


_TABLE = _byte_table()
_VALUES = np.arange(1, 257, dtype=np.uint64)
"""A byte's value in a word's hash: never 0, so that every byte counts."""
# Lead bytes of the multi-byte characters str.split() treats as whitespace (U+0085, U+00A0, U+1680,
# U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000).
_LEADS = np.zeros(256, dtype=bool)
_LEADS[[0xC2, 0xE1, 0xE2, 0xE3]] = True


_POWERS: dict[tuple[int, int], np.ndarray] = {}


def _powers(base: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """base**j and base**-j modulo 2**64 for j < length (cached per process, grown by doubling)."""
    cache = _POWERS
    have = cache.get((base, 1))
    if have is None or len(have) < length:
        size = 1 << max(16, (length - 1).bit_length())
        for key, value in ((1, base), (-1, pow(base, -1, 1 << 64))):
            powers = np.full(size, value, dtype=_U64)
            powers[0] = 1
            cache[(base, key)] = np.cumprod(powers, dtype=_U64)  # wraps modulo 2**64
    return cache[(base, 1)][:length], cache[(base, -1)][:length]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place: every input bit moves every output bit."""
    x ^= x >> _U64(30)
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return x


def ngram_hashes(
    texts: Sequence[str], n: int = NGRAM, *, owners: bool = True
) -> tuple[np.ndarray, np.ndarray, int]:
    """The hash of every word n-gram of each text (none crosses from one text into the next), the index in
    `texts` of each (with `owners`, else an empty array), and the UTF-8 bytes read."""
    parts = [text.encode("utf-8", "surrogatepass") for text in texts]
    lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    data = np.frombuffer(b"\n".join(parts), dtype=np.uint8)
    nbytes = int(lengths.sum())
    empty = np.empty(0, dtype=_U64), np.empty(0, dtype=np.int64), nbytes
    if not len(data):
        return empty
    starts = np.zeros(len(parts), dtype=np.int64)
    np.cumsum(lengths[:-1] + 1, out=starts[1:])

    normal = _TABLE[data]
    deleted = np.flatnonzero(normal == 0)
    if len(deleted):
        normal = np.delete(normal, deleted)
        starts -= np.searchsorted(deleted, starts)  # where each text starts once deletions close up
    # Multi-byte whitespace to spaces. The text is valid UTF-8, so a lead byte's continuation bytes follow
    # it; only a two-byte character's lead at the very end has no third byte to look at (clipped).
    lead = np.flatnonzero(_LEADS[normal])
    if len(lead):
        last = len(normal) - 1
        b0, b1, b2 = normal[lead], normal[lead + 1], normal[np.minimum(lead + 2, last)]
        two = (b0 == 0xC2) & ((b1 == 0x85) | (b1 == 0xA0))
        three = (
            ((b0 == 0xE1) & (b1 == 0x9A) & (b2 == 0x80))
            | ((b0 == 0xE2) & (b1 == 0x80) & ((b2 <= 0x8A) | (b2 == 0xA8) | (b2 == 0xA9) | (b2 == 0xAF)))
            | ((b0 == 0xE2) & (b1 == 0x81) & (b2 == 0x9F))
            | ((b0 == 0xE3) & (b1 == 0x80) & (b2 == 0x80))
        )
        for width, found in ((2, two), (3, three)):
            for offset in range(width):
                normal[lead[found] + offset] = 32

    # Words: runs of non-space bytes, [word_start, word_end).
    inside = np.zeros(len(normal) + 2, dtype=bool)
    np.not_equal(normal, 32, out=inside[1:-1])
    edges = np.flatnonzero(inside[1:] != inside[:-1])
    word_start, word_end = edges[0::2], edges[1::2]
    words = len(word_start)
    if words < n:
        return empty

    power, inverse = _powers(_BYTE_BASE, len(normal))
    prefix = np.zeros(len(normal) + 1, dtype=_U64)
    values = _VALUES[normal]
    np.multiply(values, power, out=values)
    np.cumsum(values, out=prefix[1:])
    word_hash = _mix((prefix[word_end] - prefix[word_start]) * inverse[word_start])

    power, inverse = _powers(_WORD_BASE, words)
    prefix = np.zeros(words + 1, dtype=_U64)
    np.cumsum(word_hash * power, out=prefix[1:])
    count = words - n + 1
    hashes = _mix((prefix[n:] - prefix[:count]) * inverse[:count])
    # An n-gram lies within one text unless a text's first word is one of its words after the first: mark
    # those n-grams with +1 ... -1 around each text's first word and a running sum (cheaper than a search
    # per word).
    first_words = np.searchsorted(word_start, starts[1:])
    crossing = np.zeros(count + 1, dtype=np.int32)
    np.add.at(crossing, np.maximum(first_words - n + 1, 0), 1)
    np.add.at(crossing, np.minimum(first_words, count), -1)
    whole = np.cumsum(crossing[:count]) == 0
    if not owners:
        return hashes[whole], empty[1], nbytes
    return hashes[whole], np.searchsorted(starts, word_start[:count][whole], side="right") - 1, nbytes


# ---------------------------------------------------------------------------------------------------
# The task side


def document_texts(task: Task) -> list[tuple[str | int, str]]:
    """(id, text) of each of the task's documents: its own prompt, without the few-shot examples and the
    prompt labels, followed by its gold continuation."""
    contexts = [document.choices[document.gold].context for document in task.documents]
    shared = os.path.commonprefix(contexts)  # noqa: RUF071 (a character prefix is what is wanted)
    own_start = shared.rfind("\n\n") + 2 if "\n\n" in shared else 0
    return [
        (
            document.id,
            PROMPT_LABELS.sub("", context[own_start:]) + document.choices[document.gold].continuation,
        )
        for document, context in zip(task.documents, contexts, strict=True)
    ]


@dataclass
class TaskIndex:
    """The task documents' n-gram hashes, sorted, behind a bitmap of their top `bits` bits."""

    hashes: np.ndarray
    """Every n-gram hash of every document (uint64), sorted."""
    documents: np.ndarray
    """The document (its number across all tasks) of each entry of `hashes`."""
    bitmap: np.ndarray
    bits: int

    @classmethod
    def build(cls, texts: Sequence[str], n: int) -> TaskIndex:
        hashes, documents, _ = ngram_hashes(texts, n)
        order = np.argsort(hashes, kind="stable")
        hashes, documents = hashes[order], documents[order]
        # About 16 bitmap bytes per n-gram (at most 2**27): one training n-gram in 16 passes the bitmap.
        bits = min(27, max(16, (16 * max(1, len(hashes)) - 1).bit_length()))
        bitmap = np.zeros(1 << bits, dtype=bool)
        bitmap[hashes >> _U64(64 - bits)] = True
        return cls(hashes, documents, bitmap, bits)

    def matches(self, hashes: np.ndarray) -> np.ndarray:
        """The distinct entries of `hashes` that are task n-grams."""
        candidates = hashes[self.bitmap[hashes >> _U64(64 - self.bits)]]
        if not len(candidates) or not len(self.hashes):
            return np.empty(0, dtype=_U64)
        found = np.minimum(np.searchsorted(self.hashes, candidates), len(self.hashes) - 1)
        return np.unique(candidates[self.hashes[found] == candidates])


# ---------------------------------------------------------------------------------------------------
# The training side


@dataclass
class ShardScan:
    """What one shard holds of the task n-grams."""

    matches: np.ndarray
    documents: int
    bytes: int


def _pieces(text: str) -> Iterator[str]:
    """`text` in pieces of at most PIECE_CHARS characters, cut at spaces where there are any, each piece
    repeating at least OVERLAP_CHARS characters of the one before, so no n-gram shorter than that is cut."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        end = start + PIECE_CHARS
        cut = text.rfind(" ", end - OVERLAP_CHARS, end)
        cut = end if cut < 0 else cut
        yield text[start:cut]
        space = text.rfind(" ", cut - 2 * OVERLAP_CHARS, cut - OVERLAP_CHARS)
        start = cut - OVERLAP_CHARS if space < 0 else space
    yield text[start:]


def scan_shard(path: str | Path, index: TaskIndex, n: int = NGRAM) -> ShardScan:
    """Stream one shard in batches and keep only the task n-grams it contains."""
    matches: list[np.ndarray] = []
    batch: list[str] = []
    size = documents = nbytes = 0

    def flush() -> None:
        nonlocal size, nbytes
        hashes, _, read = ngram_hashes(batch, n, owners=False)
        matches.append(index.matches(hashes))
        nbytes += read
        batch.clear()
        size = 0

    for record in iter_shard_records(path):
        documents += 1
        for piece in _pieces(record["text"]):
            batch.append(piece)
            size += len(piece)
            if size >= BATCH_CHARS:
                flush()
    if batch:
        flush()
    found = np.unique(np.concatenate(matches)) if matches else np.empty(0, dtype=_U64)
    return ShardScan(found, documents, nbytes)


def _scan_request(path: str, state: tuple[TaskIndex, int]) -> ShardScan:
    index, n = state
    return scan_shard(path, index, n)


def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decontaminate(
    shard_paths: str | Path | Iterable[str | Path],
    tasks: Iterable[Task],
    *,
    n: int = NGRAM,
    workers: int | None = None,
    stats: dict | None = None,
) -> dict:
    """For each task, how many of its documents share a word n-gram with the training shards, and which:
    `{"contamination": {task: {"docs": .., "contaminated": .., "short": .., "ids": [...]}}}` (`short`: the
    documents under n words, which cannot be checked; ids in request-file order).

    `shard_paths`: shard files, folders or globs (an empty glob is a FileNotFoundError naming it; a corrupt
    shard a ShardError naming its file, and line). `workers`: processes reading shards (default: one per
    core, at most one per shard; 0 reads them in this process). `stats`, when given, receives the shards,
    documents and text bytes read.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    paths = [str(path) for path in expand_shard_paths(shard_paths)]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks to check for contamination")
    ids: list[str | int] = []
    texts: list[str] = []
    task_of: list[int] = []
    for number, task in enumerate(tasks):
        for doc_id, text in document_texts(task):
            ids.append(doc_id)
            texts.append(text)
            task_of.append(number)
    index = TaskIndex.build(texts, n)
    workers = min(default_workers() if workers is None else workers, len(paths))

    matched: list[np.ndarray] = []
    documents = nbytes = 0
    with WorkerPool(_scan_request, (index, n), workers) as pool:
        for position, path in enumerate(paths):
            pool.prefetch(paths[position:])
            scan = pool.get(path)
            matched.append(scan.matches)
            documents += scan.documents
            nbytes += scan.bytes
    found = np.unique(np.concatenate(matched))
    contaminated = set(np.unique(index.documents[np.isin(index.hashes, found)]).tolist())
    checked = set(np.unique(index.documents).tolist())
    if stats is not None:
        stats.update(shards=len(paths), documents=documents, bytes=nbytes)

    report: dict[str, dict] = {}
    for number, task in enumerate(tasks):
        members = [i for i, owner in enumerate(task_of) if owner == number]
        dirty = [ids[i] for i in members if i in contaminated]
        report[task.name] = {
            "docs": len(members),
            "contaminated": len(dirty),
            "short": sum(i not in checked for i in members),
            "ids": dirty,
        }
    return {"contamination": report}
