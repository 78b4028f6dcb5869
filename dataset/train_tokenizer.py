"""Train Open-Llama's SentencePiece BPE tokenizer from jsonl.zst shards and export it for Hugging Face.

    python dataset/train_tokenizer.py --input 'shards/*.jsonl.zst' --vocab_size 8000 --output_dir tokenizer

(`--help` lists every option; `--vocab-size` and the other dash spellings are aliases of the `_` keys.)

Memory is bounded by the sample, not the corpus: one streaming pass over the shards keeps a seeded,
uniformly random sample of documents (at most --sample_bytes of UTF-8 text and --sample_documents
documents), and SentencePiece trains on that sample through a sentence iterator. A seeded fraction of
documents (--heldout_fraction) never enters the sample; the tokenizer's compression is measured on them,
per script (Latin / Han). The output folder is written to a temporary folder and renamed into place.

SentencePiece options (Open-Llama's): BPE, byte fallback, digits split, pieces split by Unicode script,
whitespace-only pieces allowed, whitespace kept as it is, no dummy prefix and identity normalisation so
that decode(encode(x)) == x; control symbols <s> </s> <pad> and the chat role tokens.
"""

from __future__ import annotations

import heapq
import io
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import orjson
import sentencepiece as spm
from jsonargparse.typing import PositiveInt, restricted_number_type

from common.config import ConfigError, parse_config
from common.files import replace_dir
from common.memory import peak_rss_bytes
from common.progress import ticking
from data.shard_io import ShardError, expand_shard_paths, iter_shard_records
from dataset.held_out import HeldOutFraction
from dataset.tokenizer import (
    BOS,
    CONTROL_TOKENS,
    DEFAULT_MODEL_MAX_LENGTH,
    EOS,
    PAD,
    SP_MODEL_FILE,
    UNK,
    Tokenizer,
    write_hf_files,
)


def parse_size(text: str) -> int:
    """'512M', '2G', '100k', '1000' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 500M, 2G)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** "_kmgt".index(unit or "_"))


# Peak memory is about 80 MiB + 12 MiB per MB sampled (docs/tokenizer.md): ~3 GiB for the default.
DEFAULT_SAMPLE_SIZE = "256M"
DEFAULT_HELDOUT_SIZE = "8M"
DEFAULT_SAMPLE_BYTES = parse_size(DEFAULT_SAMPLE_SIZE)
DEFAULT_HELDOUT_BYTES = parse_size(DEFAULT_HELDOUT_SIZE)
MAX_SENTENCE_BYTES = 16384
SUMMARY_FILE = "training_summary.json"
PROGRESS_SECONDS = 10.0

# Character classes for the per-script compression report.
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")


@dataclass
class Sample:
    """Result of the sampling pass: documents as UTF-8 bytes, in random order, and what was read."""

    train: list[bytes]
    heldout: list[bytes]
    files: int = 0
    documents_read: int = 0
    bytes_read: int = 0
    bad_shards: list[str] = field(default_factory=list)


class BoundedSample:
    """A uniform random sample of items under a byte and a count budget, in O(budget) memory.

    Every item gets a random key; the sample is the items with the smallest keys that fit the budgets
    (the "bottom-k" form of reservoir sampling, which also works for a byte budget): a max-heap on the key
    drops the largest key whenever a budget is exceeded. Sorting by key gives a random order.
    """

    def __init__(self, max_bytes: int, max_items: int | None = None):
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.bytes = 0
        self._heap: list[tuple[float, int, bytes]] = []  # (-key, sequence number, item)
        self._seq = 0

    def offer(self, key: float, item: bytes) -> None:
        heapq.heappush(self._heap, (-key, self._seq, item))
        self._seq += 1
        self.bytes += len(item)
        while self._heap and (
            self.bytes > self.max_bytes or (self.max_items is not None and len(self._heap) > self.max_items)
        ):
            self.bytes -= len(heapq.heappop(self._heap)[2])

    def __len__(self) -> int:
        return len(self._heap)

    def items(self) -> list[bytes]:
        """The sampled items in random (key) order; empties the sample."""
        heap, self._heap, self.bytes = self._heap, [], 0
        heap.sort(key=lambda entry: -entry[0])
        return [item for _, _, item in heap]


def draw_sample(
    paths: Iterable[Path],
    *,
    sample_bytes: int,
    sample_documents: int | None,
    heldout_fraction: float,
    heldout_bytes: int,
    seed: int,
    log=None,
) -> Sample:
    """One pass over the shards: a seeded random sample for training and a held-out one for evaluation.

    A shard that cannot be read to the end (truncated, malformed line) is reported with its file and line,
    counted in `bad_shards`, and the documents read before the error are kept.
    """
    rng = random.Random(seed)
    train = BoundedSample(sample_bytes, sample_documents)
    heldout = BoundedSample(heldout_bytes)
    stats = Sample(train=[], heldout=[])
    last_report = time.monotonic()
    for path in paths:
        stats.files += 1
        try:
            for record in iter_shard_records(path):
                text = record["text"]
                if not text:
                    continue
                data = text.encode("utf-8", errors="surrogatepass")
                stats.documents_read += 1
                stats.bytes_read += len(data)
                # Two draws per document whatever happens, so the sample depends on the seed only.
                is_heldout, key = rng.random() < heldout_fraction, rng.random()
                (heldout if is_heldout else train).offer(key, data)
                if log and time.monotonic() - last_report > PROGRESS_SECONDS:
                    last_report = time.monotonic()
                    log(
                        f"sampling: {stats.files} files, {stats.documents_read:,} documents, "
                        f"{stats.bytes_read / 1e6:,.1f} MB read; sample {len(train):,} documents, "
                        f"{train.bytes / 1e6:,.1f} MB"
                    )
        except ShardError as exc:
            stats.bad_shards.append(str(exc))
            if log:
                log(f"warning: skipping the rest of a bad shard: {exc}")
    stats.train, stats.heldout = train.items(), heldout.items()
    return stats


def iter_sentences(documents: list[bytes], max_bytes: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Training sentences for SentencePiece: each document in pieces of at most `max_bytes` bytes.

    Documents are cut at line ends (newlines stay in the text, so pieces such as "\\n\\n" are learned),
    a longer line at a character boundary. The list is emptied as it goes, so the sample's memory is
    handed over to SentencePiece instead of being held twice.
    """
    documents.reverse()  # pop() from the end keeps the sample's (random) order
    while documents:
        data = documents.pop()
        start = 0
        while start < len(data):
            end = start + max_bytes
            if end < len(data):
                newline = data.rfind(b"\n", start, end)
                if newline >= start:
                    end = newline + 1
                else:
                    while end > start and data[end] & 0xC0 == 0x80:  # inside a UTF-8 sequence
                        end -= 1
            yield data[start:end].decode("utf-8", errors="surrogatepass")
            start = end


def script_of(text: str) -> str:
    """'han' or 'latin' by which of the two letter classes the text has more of; 'other' if neither."""
    han, latin = len(_HAN.findall(text)), len(_LATIN.findall(text))
    if han == latin == 0:
        return "other"
    return "han" if han > latin else "latin"


def compression_report(tokenizer: Tokenizer, documents: list[bytes]) -> dict[str, dict[str, float]]:
    """Bytes and characters per token on held-out documents, per script and overall."""
    totals: dict[str, list[int]] = {}
    for data in documents:
        text = data.decode("utf-8", errors="surrogatepass")
        n_tokens = len(tokenizer.encode(text))
        for script in (script_of(text), "all"):
            entry = totals.setdefault(script, [0, 0, 0, 0])
            entry[0] += 1
            entry[1] += len(data)
            entry[2] += len(text)
            entry[3] += n_tokens
    return {
        script: {
            "documents": docs,
            "bytes": nbytes,
            "tokens": tokens,
            "bytes_per_token": round(nbytes / max(tokens, 1), 3),
            "chars_per_token": round(chars / max(tokens, 1), 3),
        }
        for script, (docs, nbytes, chars, tokens) in sorted(totals.items())
    }


def sentencepiece_options(
    vocab_size: int, *, normalization: str, character_coverage: float, num_threads: int
) -> dict:
    """Open-Llama's SentencePiece trainer options (see docs/tokenizer.md for each choice)."""
    return {
        "model_type": "bpe",
        "vocab_size": vocab_size,
        "character_coverage": character_coverage,
        "byte_fallback": True,
        "split_digits": True,
        "split_by_unicode_script": True,
        "split_by_whitespace": True,
        "allow_whitespace_only_pieces": True,
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": False,
        "normalization_rule_name": normalization,
        "max_sentence_length": MAX_SENTENCE_BYTES,
        # A corpus too small for the requested size yields a smaller vocabulary instead of an error.
        "hard_vocab_limit": False,
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": 3,
        "unk_piece": UNK,
        "bos_piece": BOS,
        "eos_piece": EOS,
        "pad_piece": PAD,
        # Control symbols are never matched in input text, unlike user_defined_symbols.
        "control_symbols": CONTROL_TOKENS[3:],
        "input_sentence_size": 0,  # the sample is already bounded and shuffled
        "num_threads": num_threads,
    }


def train_tokenizer(
    input_patterns: list[str] | str,
    vocab_size: int,
    output_dir: str | Path,
    *,
    sample_bytes: int = DEFAULT_SAMPLE_BYTES,
    sample_documents: int | None = None,
    heldout_fraction: float = 0.01,
    heldout_bytes: int = DEFAULT_HELDOUT_BYTES,
    seed: int = 0,
    normalization: str = "identity",
    character_coverage: float = 0.9995,
    num_threads: int | None = None,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    verbose: bool = False,
    log=None,
    progress: bool = False,
) -> Path:
    """Train a tokenizer on a random sample of the shards and write the tokenizer folder `output_dir`.

    Returns `output_dir`. For tests: `train_tokenizer(paths, 500, tmp_path / "tok")` on a few hundred KB
    of text takes about a second. An existing `output_dir` is replaced only if it is a tokenizer folder.
    """
    if normalization not in ("identity", "nfkc"):
        raise ValueError(f"normalization must be 'identity' or 'nfkc', not {normalization!r}")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), not {heldout_fraction}")
    output_dir = Path(output_dir)
    _check_replaceable(output_dir)
    paths = expand_shard_paths(input_patterns)
    _check_writable(output_dir)
    started = time.perf_counter()

    sample = draw_sample(
        paths,
        sample_bytes=sample_bytes,
        sample_documents=sample_documents,
        heldout_fraction=heldout_fraction,
        heldout_bytes=heldout_bytes,
        seed=seed,
        log=log,
    )
    if not sample.train:
        raise ValueError(
            f"no text to train on in {len(paths)} shard file(s) matching {input_patterns!r}"
            + (f" ({len(sample.bad_shards)} bad shards)" if sample.bad_shards else "")
            + ("; documents are larger than --sample_bytes" if sample.documents_read else "")
        )
    sampled_documents, sampled_bytes = len(sample.train), sum(map(len, sample.train))
    sampled_seconds = time.perf_counter() - started
    if log:
        log(
            f"sampled {sampled_documents:,} documents, {sampled_bytes / 1e6:,.1f} MB "
            f"of {sample.documents_read:,} documents, {sample.bytes_read / 1e6:,.1f} MB "
            f"in {sampled_seconds:.1f} s; training SentencePiece (vocab {vocab_size:,})"
        )

    options = sentencepiece_options(
        vocab_size,
        normalization=normalization,
        character_coverage=character_coverage,
        num_threads=num_threads or os.cpu_count() or 1,
    )
    model = _train_sentencepiece(
        sample.train, options, seed=seed, verbose=verbose, progress=progress and not verbose
    )
    trained_seconds = time.perf_counter() - started - sampled_seconds

    tmp_dir = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    (tmp_dir / SP_MODEL_FILE).write_bytes(model)
    write_hf_files(tmp_dir, model_max_length=model_max_length)
    tokenizer = Tokenizer.load(tmp_dir)
    summary = {
        "inputs": [str(input_patterns)]
        if isinstance(input_patterns, str | Path)
        else list(map(str, input_patterns)),
        "files": sample.files,
        "bad_shards": sample.bad_shards,
        "documents_read": sample.documents_read,
        "bytes_read": sample.bytes_read,
        "documents_sampled": sampled_documents,
        "bytes_sampled": sampled_bytes,
        "heldout_documents": len(sample.heldout),
        "vocab_size_requested": vocab_size,
        "vocab_size": tokenizer.vocab_size,
        "sampling_seconds": round(sampled_seconds, 2),
        "training_seconds": round(trained_seconds, 2),
        "peak_rss_bytes": peak_rss_bytes(),
        "heldout_compression": compression_report(tokenizer, sample.heldout),
        "sentencepiece_options": options,
    }
    (tmp_dir / SUMMARY_FILE).write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    replace_dir(tmp_dir, output_dir)
    if log:
        log(format_summary(summary, output_dir))
    return output_dir


def _train_sentencepiece(
    documents: list[bytes], options: dict, *, seed: int, verbose: bool, progress: bool
) -> bytes:
    """Run SentencePiece's trainer on the sampled `documents` (emptied as they are fed); returns the
    serialized model. With `progress`, an elapsed-time line runs meanwhile: below its verbose log level
    SentencePiece reports nothing of its own."""
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        with ticking(f"SentencePiece: training (vocab {options['vocab_size']:,})", progress):
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter_sentences(documents),
                model_writer=model,
                minloglevel=0 if verbose else 2,
                **options,
            )
    except RuntimeError as exc:
        hint = ""
        if needed := re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(exc)):
            # Every character kept by --character_coverage needs its own piece, plus the control symbols.
            hint = (
                f" (the sample has {needed[1]} pieces that must be in the vocabulary: raise --vocab_size "
                "above that, or lower --character_coverage to keep fewer rare characters)"
            )
        elif "vocab_size" in str(exc):
            hint = " (raise --vocab_size or lower --character_coverage, e.g. 0.99 for Chinese text)"
        raise ValueError(f"SentencePiece training failed: {exc}{hint}") from exc
    return model.getvalue()


def _check_replaceable(output_dir: Path) -> None:
    if output_dir.exists() and not (
        output_dir.is_dir() and ((output_dir / SP_MODEL_FILE).is_file() or not any(output_dir.iterdir()))
    ):
        raise FileExistsError(
            f"{output_dir} exists and is not a tokenizer folder; choose another --output_dir"
        )


def _check_writable(output_dir: Path) -> None:
    """Fail in a second, not after hours of training, when the tokenizer folder cannot be written."""
    probe = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    try:
        probe.mkdir(parents=True, exist_ok=True)
        probe.rmdir()
    except OSError as exc:
        raise OSError(f"cannot write --output_dir {output_dir}: {exc.strerror or exc}") from None


def format_summary(summary: dict, output_dir: Path) -> str:
    lines = [
        f"wrote {output_dir}: vocab {summary['vocab_size']:,}",
        *(
            [
                f"  warning: the sample only supports {summary['vocab_size']:,} pieces of the "
                f"{summary['vocab_size_requested']:,} asked for; train on more text (--sample_bytes, "
                "or a larger corpus) or lower --vocab_size"
            ]
            if summary["vocab_size"] < summary["vocab_size_requested"]
            else []
        ),
        f"  sample: {summary['documents_sampled']:,} documents, {summary['bytes_sampled'] / 1e6:,.1f} MB "
        f"(of {summary['documents_read']:,} documents, {summary['bytes_read'] / 1e6:,.1f} MB in "
        f"{summary['files']} files{', ' + str(len(summary['bad_shards'])) + ' bad' if summary['bad_shards'] else ''})",
        f"  time: sampling {summary['sampling_seconds']:.1f} s, training {summary['training_seconds']:.1f} s; "
        f"peak RSS {summary['peak_rss_bytes'] / 2**20:,.0f} MiB",
    ]
    for script, row in summary["heldout_compression"].items():
        lines.append(
            f"  held-out {script:>5}: {row['documents']:,} documents, {row['bytes_per_token']:.2f} bytes/token, "
            f"{row['chars_per_token']:.2f} chars/token"
        )
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------

# Unnamed: jsonargparse names a range type by its bounds (int_ge300), and registering the same bounds again
# under another name would be an error.
VocabSize = restricted_number_type(None, int, (">=", 300))
"""At least 300: the 256 byte pieces, the control symbols and the sample's characters."""
Coverage = restricted_number_type(None, float, [(">", 0), ("<=", 1)])
"""A share in (0, 1]."""


@dataclass
class TokenizerTrainingConfig:
    """Train Open-Llama's SentencePiece BPE tokenizer on a sample of jsonl.zst shards, for Hugging Face."""

    input: list[str] = field(default_factory=list)
    """Shard files, globs or folders (*.jsonl.zst): after --input or without -- (required; several allowed)."""
    vocab_size: VocabSize | None = None
    """Vocabulary size (required, at least 300): e.g. 100000 for 7B, 2000-8000 for the demo."""
    output_dir: str = ""
    """Tokenizer folder to write (required)."""
    sample_bytes: str = DEFAULT_SAMPLE_SIZE
    """Text to train on (500M, 2G, ...; ~12 MiB of RAM per MB)."""
    sample_documents: PositiveInt | None = None
    """At most this many documents in the sample (default: no limit)."""
    heldout_fraction: HeldOutFraction = 0.01
    """Documents kept out of the sample to measure compression on."""
    heldout_bytes: str = DEFAULT_HELDOUT_SIZE
    """At most this much held-out text."""
    seed: int = 0
    """Sampling seed (same seed, same tokenizer)."""
    normalization: Literal["identity", "nfkc"] = "identity"
    """identity keeps decode(encode(x)) == x; nfkc folds compatibility characters (e.g. fullwidth)."""
    character_coverage: Coverage = 0.9995
    """Share of characters that get their own piece."""
    num_threads: PositiveInt | None = None
    """SentencePiece threads (default: all cores)."""
    model_max_length: PositiveInt = DEFAULT_MODEL_MAX_LENGTH
    """Written to tokenizer_config.json."""
    verbose: bool = False
    """Show SentencePiece's own log."""
    quiet: bool = False
    """Print nothing but errors."""

    def __post_init__(self) -> None:
        if not self.input or self.vocab_size is None or not self.output_dir:
            raise ValueError("give --input SHARDS, --vocab_size N and --output_dir DIR")
        for size in (self.sample_bytes, self.heldout_bytes):
            parse_size(size)


PROG = "dataset/train_tokenizer.py"
# Dash spellings of the keys, the usual style of command-line tools.
ALIASES = {
    "vocab-size": "vocab_size",
    "output-dir": "output_dir",
    "sample-bytes": "sample_bytes",
    "sample-documents": "sample_documents",
    "heldout-fraction": "heldout_fraction",
    "heldout-bytes": "heldout_bytes",
    "character-coverage": "character_coverage",
    "num-threads": "num_threads",
    "model-max-length": "model_max_length",
}


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(TokenizerTrainingConfig, argv, aliases=ALIASES, prog=PROG, positional="input")
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        train_tokenizer(
            config.input,
            config.vocab_size,
            config.output_dir,
            sample_bytes=parse_size(config.sample_bytes),
            sample_documents=config.sample_documents,
            heldout_fraction=config.heldout_fraction,
            heldout_bytes=parse_size(config.heldout_bytes),
            seed=config.seed,
            normalization=config.normalization,
            character_coverage=config.character_coverage,
            num_threads=config.num_threads,
            model_max_length=config.model_max_length,
            verbose=config.verbose,
            log=None if config.quiet else log,
            progress=not config.quiet,
        )
    except (OSError, ValueError) as exc:  # OSError covers FileNotFoundError and FileExistsError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written (run the same command again)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
