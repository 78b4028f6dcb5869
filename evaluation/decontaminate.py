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

Speed. Every n-gram becomes a 64-bit hash with numpy, never a Python object, in a few passes over a batch of
documents joined into one UTF-8 byte string (between two documents a word of one 0xFF byte, which UTF-8 never
contains, so that no n-gram across two documents is a task n-gram). `bytes.translate` lower-cases, deletes
punctuation and turns ASCII whitespace into spaces in one C pass; words are the runs of non-space bytes; a
word's hash mixes (splitmix64's finaliser) its length and its bytes, read 8 at a time by unaligned 64-bit
loads at its start and masked to the word, as many loads as the longest task word needs: a longer training
word is hashed by its length and first 8 bytes, which is enough to tell it from every task word. A 13-gram's
hash is a polynomial over its words' hashes, taken from one prefix sum (times the inverse power of the base,
which exists modulo 2**64 for an odd base). The task side's hashes are held sorted behind a bitmap of their
top bits (packed, at most 2 MB, so that it stays in cache): a training n-gram costs one bit look-up and only
the rare bitmap hits (about 1 in 64) a binary search. Per-word Python objects (`str.split`, a tokenizer's
pre-tokenizer) cost more than all of these passes together, and Bloom-filter libraries (rbloom, pybloom)
answer one Python call per item, so no library fits the index better than a sorted array. Hash collisions:
with a million task n-grams and 10**10 training n-grams the expected number of false matches is about
10**16 / 2**64, under 0.001.

Memory. The training side is streamed: shards are read record by record (`data.shard_io`) in batches of
about BATCH_CHARS characters, a document longer than PIECE_CHARS in overlapping pieces (an n-gram longer than
OVERLAP_CHARS characters across a piece edge is missed), and only the matched task hashes are kept. The
shards are spread over worker processes (`dataset.worker_pool.WorkerPool`, one shard per request; with one
worker this process reads them); each returns its matches and counts.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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
# Between two texts of a batch: a word of one 0xFF byte, which UTF-8 never contains.
_SEPARATOR = b" \xff "
# A-Z to a-z, the ASCII whitespace str.split() splits on to a space; punctuation and NUL are deleted.
_NORMALISE = bytes.maketrans(
    (string.ascii_uppercase + "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f").encode(),
    (string.ascii_lowercase + " " * 9).encode(),
)
_DELETE = (string.punctuation + "\x00").encode()
# Lead bytes of the multi-byte characters str.split() treats as whitespace (U+0085, U+00A0, U+1680,
# U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000).
_LEADS = np.zeros(256, dtype=bool)
_LEADS[[0xC2, 0xE1, 0xE2, 0xE3]] = True
_MASKS = np.array([0] + [(1 << (8 * size)) - 1 for size in range(1, 9)], dtype=_U64)
"""The low `size` bytes of a 64-bit little-endian load: a word's bytes without the ones after it."""
_LENGTH_FACTOR = _U64(0xD6E8FEB86659FD93)
_CHUNK_FACTOR = _U64(0x9E3779B97F4A7C15)
_NGRAM_BASE = 0x100000001B3  # odd, so invertible modulo 2**64

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


def _words(data: bytes) -> tuple[bytes, np.ndarray, np.ndarray]:
    """`data` normalised (then 7 spaces, so that a 64-bit load at any word start stays inside), its words'
    start offsets and lengths in bytes."""
    normal = data.translate(_NORMALISE, _DELETE) + b" " * 7
    size = len(normal)
    text = np.frombuffer(normal, dtype=np.uint8)
    inside = np.zeros(size + 2, dtype=bool)
    np.not_equal(text, 32, out=inside[1:-1])
    # Multi-byte whitespace is outside words too. Only ASCII bytes were deleted, and no ASCII byte occurs
    # inside a multi-byte character, so each lead byte is still followed by its continuation bytes.
    high = np.flatnonzero(text >= 0xC2)
    lead = high[_LEADS[text[high]]]
    if len(lead):
        b0, b1, b2 = text[lead], text[lead + 1], text[lead + 2]
        two = (b0 == 0xC2) & ((b1 == 0x85) | (b1 == 0xA0))
        three = (
            ((b0 == 0xE1) & (b1 == 0x9A) & (b2 == 0x80))
            | ((b0 == 0xE2) & (b1 == 0x80) & ((b2 <= 0x8A) | (b2 == 0xA8) | (b2 == 0xA9) | (b2 == 0xAF)))
            | ((b0 == 0xE2) & (b1 == 0x81) & (b2 == 0x9F))
            | ((b0 == 0xE3) & (b1 == 0x80) & (b2 == 0x80))
        )
        for width, found in ((2, two), (3, three)):
            for offset in range(1, width + 1):
                inside[lead[found] + offset] = False
    # Words: the runs of bytes inside, [start, start + length).
    edges = np.flatnonzero(inside[1:] != inside[:-1])
    starts = edges[0::2]
    return normal, starts, edges[1::2] - starts


def _word_hashes(buffer: bytes, starts: np.ndarray, lengths: np.ndarray, chunks: int) -> np.ndarray:
    """A 64-bit hash of each word of at most `chunks` 8-byte chunks, of all its bytes and its length; a
    longer word's hash is of its first chunk and its length only, which still tells it from every shorter
    word."""
    loads = np.ndarray((len(buffer) - 7,), dtype="<u8", buffer=buffer, strides=(1,))  # unaligned 8-byte loads
    hashes = loads[starts]
    hashes &= _MASKS[np.minimum(lengths, 8)]
    hashes += lengths.view(_U64) * _LENGTH_FACTOR
    _mix(hashes)
    longer = np.flatnonzero((lengths > 8) & (lengths <= 8 * chunks))
    for chunk in range(1, chunks):
        if chunk > 1:
            longer = longer[lengths[longer] > 8 * chunk]
        if not len(longer):
            break
        value = loads[starts[longer] + 8 * chunk]
        value &= _MASKS[np.minimum(lengths[longer] - 8 * chunk, 8)]
        hashes[longer] = _mix(hashes[longer] * _CHUNK_FACTOR + value)
    return hashes


def _window_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """The hash of every run of n consecutive words, a polynomial over their hashes taken from one prefix
    sum (times the inverse power of the base, which exists modulo 2**64 for an odd base); overwrites
    `word_hashes`."""
    words = len(word_hashes)
    if words < n:
        return np.empty(0, dtype=_U64)
    power, inverse = _powers(_NGRAM_BASE, words)
    prefix = np.zeros(words + 1, dtype=_U64)
    np.multiply(word_hashes, power, out=word_hashes)
    np.cumsum(word_hashes, out=prefix[1:])
    count = words - n + 1
    hashes = prefix[n:] - prefix[:count]
    hashes *= inverse[:count]
    return hashes


class TextNgrams(NamedTuple):
    hashes: np.ndarray
    """The hash of every word n-gram of every text (none crosses from one text into the next)."""
    owners: np.ndarray
    """The index in the texts of each n-gram's text."""
    bytes: int
    """The texts' UTF-8 bytes."""
    longest_word: int
    """The longest normalised word's bytes."""


def ngram_hashes(texts: Sequence[str], n: int = NGRAM) -> TextNgrams:
    """Every word n-gram's hash and text in `texts`."""
    parts = [text.encode("utf-8", "surrogatepass") for text in texts]
    buffer, starts, lengths = _words(_SEPARATOR.join(parts))
    longest = int(lengths.max(initial=0))
    hashes = _window_hashes(_word_hashes(buffer, starts, lengths, (longest + 7) // 8), n)
    # Text k's words follow the k-th separator word; an n-gram that holds one spans two texts.
    separators = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum(np.frombuffer(buffer, dtype=np.uint8)[starts] == 0xFF, out=separators[1:])
    owners = separators[: len(hashes)]
    whole = separators[n : n + len(hashes)] == owners
    return TextNgrams(hashes[whole], owners[whole], sum(map(len, parts)), longest)


# ---------------------------------------------------------------------------------------------------
# The task side


def document_texts(task: Task) -> list[tuple[str | int, str]]:
    """(id, text) of each of the task's documents: its own prompt, without the few-shot examples and the
    prompt labels, followed by its gold continuation."""
    golds = [document.choices[document.gold] for document in task.documents]
    contexts = [gold.context for gold in golds]
    shared = os.path.commonprefix(contexts)  # noqa: RUF071 (a character prefix is what is wanted)
    own_start = shared.rfind("\n\n") + 2 if "\n\n" in shared else 0
    return [
        (document.id, PROMPT_LABELS.sub("", gold.context[own_start:]) + gold.continuation)
        for document, gold in zip(task.documents, golds, strict=True)
    ]


@dataclass
class TaskIndex:
    """The task documents' n-gram hashes, and the same sorted behind a bitmap of their top `bits` bits."""

    ngrams: TextNgrams
    """Every n-gram hash of every document and the document's number (across all tasks)."""
    hashes: np.ndarray
    """`ngrams.hashes` sorted."""
    bitmap: np.ndarray
    """2**bits bits, packed 8 to a byte, least significant first."""
    bits: int
    chunks: int
    """8-byte chunks of a word that its hash reads: enough for every task word."""

    @classmethod
    def build(cls, texts: Sequence[str], n: int) -> TaskIndex:
        ngrams = ngram_hashes(texts, n)
        hashes = np.sort(ngrams.hashes)
        # About 64 bitmap bits per n-gram, so that one training n-gram in 64 passes it, but at most 2**24
        # (2 MB): a bitmap that outgrows the cache costs more in misses than its searches save.
        bits = min(24, max(16, (64 * max(1, len(hashes)) - 1).bit_length()))
        slots = np.zeros(1 << bits, dtype=bool)
        slots[hashes >> _U64(64 - bits)] = True
        bitmap = np.packbits(slots, bitorder="little")
        return cls(ngrams, hashes, bitmap, bits, max(1, (ngrams.longest_word + 7) // 8))

    def matches(self, hashes: np.ndarray) -> np.ndarray:
        """The distinct entries of `hashes` that are task n-grams."""
        slots = hashes >> _U64(64 - self.bits)
        hit = self.bitmap[slots >> _U64(3)] >> (slots & _U64(7)).astype(np.uint8)
        candidates = hashes[(hit & 1).view(bool)]
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
    batch: list[bytes] = []
    size = documents = nbytes = 0

    def flush() -> None:
        # Words longer than any task word are hashed in part: no n-gram that holds one is a task n-gram. The
        # n-grams that span two texts hold a separator word, which no task n-gram does either.
        nonlocal size, nbytes
        buffer, starts, lengths = _words(_SEPARATOR.join(batch))
        hashes = _window_hashes(_word_hashes(buffer, starts, lengths, index.chunks), n)
        matches.append(index.matches(hashes))
        nbytes += sum(map(len, batch))
        batch.clear()
        size = 0

    for record in iter_shard_records(path):
        documents += 1
        text = record["text"]
        for piece in _pieces(text) if len(text) > PIECE_CHARS else (text,):
            batch.append(piece.encode("utf-8", "surrogatepass"))
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
    core, at most one per shard; 0 or 1 reads them in this process). `stats`, when given, receives the
    shards, documents and text bytes read.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    paths = [str(path) for path in expand_shard_paths(shard_paths)]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks to check for contamination")
    ids: list[str | int] = []
    texts: list[str] = []
    members: list[range] = []  # each task's documents' numbers
    for task in tasks:
        first = len(ids)
        for doc_id, text in document_texts(task):
            ids.append(doc_id)
            texts.append(text)
        members.append(range(first, len(ids)))
    index = TaskIndex.build(texts, n)
    workers = min(default_workers() if workers is None else workers, len(paths))

    matched: list[np.ndarray] = []
    documents = nbytes = 0
    # One worker process would only leave this one waiting: this one reads the shards then (as the sharder).
    with WorkerPool(_scan_request, (index, n), workers if workers > 1 else 0) as pool:
        for position, path in enumerate(paths):
            pool.prefetch(paths[position:])
            scan = pool.get(path)
            matched.append(scan.matches)
            documents += scan.documents
            nbytes += scan.bytes
    found = np.unique(np.concatenate(matched))
    contaminated = set(np.unique(index.ngrams.owners[np.isin(index.ngrams.hashes, found)]).tolist())
    checked = set(np.unique(index.ngrams.owners).tolist())
    if stats is not None:
        stats.update(shards=len(paths), documents=documents, bytes=nbytes)

    report: dict[str, dict] = {}
    for task, numbers in zip(tasks, members, strict=True):
        dirty = [ids[i] for i in numbers if i in contaminated]
        report[task.name] = {
            "docs": len(numbers),
            "contaminated": len(dirty),
            "short": sum(i not in checked for i in numbers),
            "ids": dirty,
        }
    return {"contamination": report}
