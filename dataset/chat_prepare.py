"""Instruction data, prepared once: sources -> conversations -> ids and loss masks -> shuffled shards.

The skeleton (reading every source once, the held-out split, the shuffled shards, the report, the rebuild
when an input changes) is dataset/prepare.py's; here is what makes it instruction data. Each record
becomes a conversation (dataset/chat_sources.py, any of `data.format`'s forms), is rendered through the
chat template (dataset/chat_template.py) and fitted to `seq_len` (the truncation policy below), and is
written one conversation a line: `{"ids": [...], "train": [[start, end], ...], "origin": "file:line"}`
(the trained spans are half-open token ranges). The held-out split hashes each conversation's messages.

Truncation (never silent; every case is counted in the report):
1. A conversation that fits in `seq_len` tokens is kept whole.
2. Otherwise its oldest exchanges (a user turn and the answers after it) are dropped, as few as needed,
   keeping `<s>` and the system message: the latest turns are what the answer depends on.
3. If the last exchange alone is still too long, the conversation is cut at `seq_len` tokens from the
   start (the end of the answer is lost, and with it that turn's `<|end|>`).
4. A conversation left with no trained token is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from dataset.chat_sources import FORMATS, ChatSource, Messages, iter_source
from dataset.chat_template import RenderedChat, render_chats
from dataset.prepare import (
    SHARD_RECORDS,
    Preparation,
    PreparedDataConfig,
    Record,
    SourceReport,
    trained_spans,
)


@dataclass
class ChatDataConfig(PreparedDataConfig):
    """Instruction data and how it becomes batches (the `data:` section of an instruction-tuning run)."""

    format: Literal[FORMATS] = "auto"  # type: ignore[valid-type]
    """Record format: auto (told apart by the keys of each record), alpaca, sharegpt, messages or completion
    (prompt/completion)."""


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


# ---------------------------------------------------------------------------------------------------
# Preparing


@dataclass
class ChatSourceReport(SourceReport):
    """What preparing one source of conversations found (the order of the keys in report.json)."""

    held_out: int = 0
    kept: int = 0
    oldest_turns_dropped: int = 0
    cut_at_seq_len: int = 0
    dropped_nothing_trained: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0


class ChatPreparation(Preparation):
    """Conversations: the hooks of dataset/prepare.py."""

    what = "instruction data"
    unit = "conversation"
    items = "conversations"
    version = 1
    report_class = ChatSourceReport
    counted = (
        ("malformed", "malformed"),
        ("held_out", "held out"),
        ("oldest_turns_dropped", "lost their oldest turns"),
        ("cut_at_seq_len", "cut at seq_len"),
        ("dropped_nothing_trained", "dropped (nothing trained left)"),
    )
    config: ChatDataConfig

    def settings(self) -> dict[str, Any]:
        return {"format": self.config.format, "shard_records": SHARD_RECORDS}

    def read(self, source: ChatSource) -> Iterator[Record]:
        for record in iter_source(source, self.config.format):
            if record.messages is None:
                yield Record(record.origin, problem="malformed", why=str(record.error))
            else:
                yield Record(record.origin, record.messages)

    def held_out_key(self, example: Messages) -> str:
        return orjson.dumps(example, option=orjson.OPT_SORT_KEYS).decode()

    def fit(self, examples: list[Messages], num_threads: int) -> list[Fitted | None]:
        rendered = render_chats(self.tokenizer, examples, num_threads=num_threads)
        return [fit_to_length(chat, self.config.seq_len) for chat in rendered]

    def tally(self, report: ChatSourceReport, fitted: Fitted | None, held_out: bool) -> bool:
        if held_out:  # the report counts the held-out conversations that are evaluated, no others
            report.held_out += fitted is not None
            return fitted is not None
        if fitted is None:
            report.dropped_nothing_trained += 1
            return False
        report.oldest_turns_dropped += bool(fitted.dropped_messages)
        report.cut_at_seq_len += fitted.cut
        report.kept += 1
        report.tokens += len(fitted.ids)
        report.trained_tokens += sum(fitted.trained)
        report.longest = max(report.longest, len(fitted.ids))
        return True

    def payload(self, fitted: Fitted, origin: str) -> bytes:
        return orjson.dumps({"ids": fitted.ids, "train": trained_spans(fitted.trained), "origin": origin})

    @classmethod
    def sizes(cls, source: dict[str, Any]) -> list[str]:
        if not source.get("tokens"):
            return []
        trained = source["trained_tokens"] / source["tokens"]
        return [f"{source['tokens']:,} tokens ({trained:.0%} trained), longest {source['longest']:,}"]


prepare_chat_data = ChatPreparation.prepare
format_report = ChatPreparation.format_report
