"""See what instruction tuning will train on before spending GPU hours (any `--data.key value` overrides the
run config's `data:` section):

    python dataset/chat_preview.py --config configs/sft/demo.yaml --show.samples 3

prints the data report (malformed records with file:line, truncation, tokens), conversations with their
trained tokens marked (⟦...⟧, or green on a terminal), and how the first batches are packed. The data is
prepared (dataset/chat_prepare.py) into `data.cache_dir`, or a temporary folder, and streamed as training
will stream it (dataset/chat_stream.py). dataset/preference_preview.py is the same for preference pairs.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse.typing import NonNegativeInt

import common.config
from common import IGNORE_INDEX
from common.config import ConfigError
from common.run_folder import find_tokenizer
from data.shard_io import ShardError
from dataset.chat_prepare import ChatDataConfig, format_report, prepare_chat_data
from dataset.chat_stream import ChatLoader, ChatStream, build_chat_loaders
from dataset.chat_template import show_trained
from dataset.prepare import PreparedDataConfig
from dataset.tokenizer import Tokenizer


@dataclass
class ShowConfig:
    """What the preview prints (the `show:` options of `python dataset/chat_preview.py`)."""

    samples: NonNegativeInt = 3
    """Conversations printed in full with their trained tokens marked."""
    batches: NonNegativeInt = 2
    """Batches whose packing is summarised (rows, conversations, fill, trained tokens)."""
    validation: bool = False
    """Preview the held-out stream instead of the training stream."""
    max_records: NonNegativeInt = 0
    """Prepare only the first N records of each source (0: all); a quick look at a large data set."""
    color: bool | None = None
    """Mark trained tokens in green (None: when printing to a terminal) instead of ⟦...⟧."""


@dataclass
class PreviewConfig:
    """The data section of an instruction-tuning config (and its --init, for the tokenizer)."""

    data: ChatDataConfig
    show: ShowConfig = field(default_factory=ShowConfig)
    init: str = ""
    """The model the run starts from; its tokenizer is used unless data.tokenizer is set."""


def preview(config: PreviewConfig) -> None:
    """Prepare the data and print what training will see."""
    options = config.show
    with preview_loaders(
        config.data, config.init, options.max_records, prepare_chat_data, format_report, build_chat_loaders
    ) as (tokenizer, train, held_out):
        loader = held_out if options.validation else train
        if loader is None:
            raise ValueError("no held-out stream: set data.validation_files or data.validation_fraction")
        _print_rows(loader, tokenizer, options)


def _print_rows(loader: ChatLoader, tokenizer: Tokenizer, options: ShowConfig) -> None:
    """The first batches: per row its conversations (source and length), and the first `options.samples`
    conversations in full with their trained tokens marked."""
    stream = loader.stream
    assert isinstance(stream, ChatStream)
    shown = 0
    for b in range(options.batches):
        rows = [row for row in (stream.next_row() for _ in range(loader.batch_size)) if row is not None]
        if not rows:
            break
        batch = loader.rows_to_batch(rows)
        width = batch["input_ids"].shape[1]
        filled = sum(seg.length for row in rows for seg in row.segments)
        trained = int((batch["labels"] != IGNORE_INDEX).sum())
        conversations = sum(len(row.segments) for row in rows)
        print(
            f"\nbatch {b}: {len(rows)} rows x {width} tokens, {conversations} conversations, "
            f"{filled / (len(rows) * width):.0%} filled, {trained:,} trained tokens"
        )
        for r, row in enumerate(rows):
            parts = ", ".join(f"{seg.source} {seg.length}" for seg in row.segments)
            print(f"  row {r}: {len(row.segments)} conversation(s) of tokens: {parts}")
        for row in rows:
            for seg in row.segments:
                if shown == options.samples:
                    break
                shown += 1
                ids = row.tokens[seg.start : seg.start + seg.length].tolist()
                labels = row.labels[seg.start : seg.start + seg.length].tolist()
                learned = sum(label != IGNORE_INDEX for label in labels)
                print(f"\n--- a conversation from {seg.source}: {len(ids)} tokens, {learned} trained ---")
                print(show_trained(tokenizer, ids, labels, color=options.color))


# ---------------------------------------------------------------------------------------------------
# What both previews share


@contextmanager
def preview_loaders(
    data: PreparedDataConfig,
    init: str,
    max_records: int,
    prepare: Callable[..., Any],
    report: Callable[[dict[str, Any]], str],
    build_loaders: Callable[..., tuple[Any, Any]],
) -> Iterator[tuple[Tokenizer, Any, Any]]:
    """The tokenizer and the training and held-out loaders of `data`, prepared by `prepare` into
    data.cache_dir (or a temporary folder, removed afterwards) with its `report` printed; the loaders are
    closed afterwards."""
    tokenizer_dir = find_tokenizer(data.tokenizer, init)
    tokenizer = Tokenizer.load(tokenizer_dir)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(data.cache_dir or Path(tmp) / "data")
        prepared = prepare(data, tokenizer, tokenizer_dir, cache, max_records=max_records)
        print(report(prepared.report))
        train, held_out = build_loaders(data, prepared, tokenizer.pad_id)
        try:
            yield tokenizer, train, held_out
        finally:
            for opened in (train, held_out):
                if opened is not None:
                    opened.close()


def run_preview(config_class: type, preview: Callable[[Any], None], prog: str, argv: list[str] | None) -> int:
    """A preview command: parse the run config's sections it reads, preview; an error is one line, exit 2."""
    try:
        preview(common.config.parse_config(config_class, argv, prog=prog, allow_extra_sections=True))
    except (ValueError, OSError, ShardError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_preview(PreviewConfig, preview, "dataset/chat_preview.py", argv)


if __name__ == "__main__":
    sys.exit(main())
