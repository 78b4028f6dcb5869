"""Preference pairs, prepared once: sources -> (prompt, chosen, rejected) -> ids -> shuffled shards.

A record is `{"prompt", "chosen", "rejected"}`:

- `prompt`: a string (one user message), or a conversation in messages form ending with a user message
  (`[{"role": "system" | "user" | "assistant", "content": ...}, ...]`);
- `chosen` / `rejected`: a string, an assistant message `{"role": "assistant", "content": ...}`, or a list
  of messages ending with one, the earlier ones being the prompt (TRL's conversational forms, e.g.
  UltraFeedback's).

Sources are those of instruction data (dataset/chat_sources.py): jsonl, JSON arrays or parquet, plain or
compressed, globs, folders, NAME=PATTERN, or hf:DATASET[@CONFIG][:SPLIT].

Each pair becomes two sequences that share the prompt: the prompt goes through the chat template once
(`<s>... <|assistant|>`, as for generation) and each answer is encoded on its own and closed with `<|end|>`;
the ids are joined, never re-tokenised as one string, so there is one `<s>` and one end token, and the
sequences are exactly what `render_chat(prompt + [answer])` gives. The trained tokens (whose
log-probabilities preference tuning sums) are the answer's tokens and its `<|end|>`; `<s>`, role tokens,
system and user text and earlier assistant turns never are.

A row holds whole pairs: the chosen sequence, then the rejected one, with positions restarting at each, so
neither attends to the other (several pairs per row with `packing: best_fit`, one with `pad`). So a pair
must fit in `seq_len` twice over its prompt; longer pairs are truncated (counted in the report):

1. the oldest exchanges of the prompt are dropped (keeping `<s>`, the system message and the last user
   turn), as few as needed;
2. then both answers are cut to share what room is left (the longer one first); a cut answer loses its
   `<|end|>`;
3. a pair left with no answer token, or with two identical answers, is dropped.

Before training every pair is checked and the report says, per source, how many were malformed (with
file:line and why), had an empty answer, had identical answers, or were truncated to nothing, and how long
chosen answers are against rejected ones (a length bias the loss may learn instead of quality).
The held-out split (`validation_fraction`) hashes each record. Everything else (shuffled shards, the
rebuild when an input changes) is the preparation skeleton's, dataset/prepare.py. A line holds both
sequences: `{"ids", "train", "split" (where the rejected one starts), "pair" (its id in the folder, the key
of cached reference log-probabilities), "origin"}`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from jsonargparse.typing import PositiveInt

from dataset.chat_sources import ChatSource, Messages, iter_raw_records
from dataset.chat_template import ChatTokenizer, RenderedChat, check_messages, render_chats
from dataset.prepare import (
    Preparation,
    PreparedDataConfig,
    Record,
    SeqLen,
    SourceReport,
    trained_spans,
)


@dataclass
class PreferenceDataConfig(PreparedDataConfig):
    """Preference pairs and how they become batches (the `data:` section of a preference-tuning run)."""

    seq_len: SeqLen = 1024
    """Tokens per row. A row holds whole pairs: prompt + chosen, then prompt + rejected."""
    batch_size: PositiveInt = 4
    """Rows per batch on each device (the micro-batch); a row holds one pair or more."""


# ---------------------------------------------------------------------------------------------------
# Records


class PairError(ValueError):
    """A record that cannot be trained on; `kind` is the report's column: malformed, empty or identical."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Pair:
    """A checked preference pair."""

    prompt: Messages
    chosen: str
    rejected: str


def _answer(record: Mapping[str, Any], key: str, prompt: Any) -> str:
    """The answer text of `record[key]`: a string, an assistant message, or a conversation whose last
    message is the assistant's answer and whose earlier messages are the prompt (TRL's implicit-prompt
    form, as in UltraFeedback)."""
    value = record.get(key)
    if isinstance(value, list) and value:
        *before, value = value
        if before:
            as_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            if [(m.get("role"), m.get("content")) for m in before if isinstance(m, Mapping)] != [
                (m.get("role"), m.get("content")) for m in as_messages if isinstance(m, Mapping)
            ]:
                raise PairError("malformed", f"{key!r} is a conversation that does not start with the prompt")
    if isinstance(value, Mapping):
        if value.get("role") != "assistant":
            raise PairError(
                "malformed", f"{key!r} ends with role {value.get('role')!r}, not an assistant answer"
            )
        value = value.get("content")
    if not isinstance(value, str):
        what = "missing" if value is None else f"{type(value).__name__}"
        raise PairError(
            "malformed", f"{key!r} is {what}; expected a string or an assistant message {{role, content}}"
        )
    return value


def to_pair(record: Any) -> Pair:
    """The pair of one record (module docstring), or a PairError saying what is wrong."""
    if not isinstance(record, Mapping):
        raise PairError("malformed", f"expected an object, found {type(record).__name__}")
    missing = [key for key in ("prompt", "chosen", "rejected") if key not in record]
    if missing:
        found = ", ".join(sorted(map(str, record))) or "none"
        raise PairError("malformed", f"missing {', '.join(missing)} (fields found: {found})")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    chosen, rejected = _answer(record, "chosen", prompt), _answer(record, "rejected", prompt)
    if not chosen.strip() or not rejected.strip():
        raise PairError("empty", f"the {'chosen' if not chosen.strip() else 'rejected'} answer is empty")
    if chosen == rejected:
        raise PairError("identical", "chosen and rejected are the same answer")
    if not isinstance(prompt, list):
        raise PairError("malformed", f"'prompt' is {type(prompt).__name__}; expected a string or messages")
    try:
        checked = check_messages([*prompt, {"role": "assistant", "content": chosen}])
    except ValueError as exc:
        raise PairError("malformed", f"prompt: {exc}") from None
    if len(checked) < 2 or checked[-2]["role"] != "user":
        raise PairError("malformed", "the prompt must end with a user message")
    return Pair(checked[:-1], chosen, rejected)


# ---------------------------------------------------------------------------------------------------
# Ids and truncation


@dataclass
class FittedPair:
    """A pair's two sequences within the row length, and what truncation did."""

    chosen: list[int]
    """<s>, the prompt, the chosen answer and its <|end|> (unless cut)."""
    rejected: list[int]
    prompt_length: int
    """Tokens of the (possibly shortened) prompt, the same at the start of both sequences."""
    prompt_turns_dropped: bool
    answers_cut: bool

    def line(self, pair_id: int, origin: str) -> bytes:
        """The prepared record: both sequences as one id list, the trained spans, where the rejected one
        starts, the pair's id in the prepared folder and where it came from."""
        ids = self.chosen + self.rejected
        trained = [i >= self.prompt_length for i in range(len(self.chosen))]
        trained += [i >= self.prompt_length for i in range(len(self.rejected))]
        return orjson.dumps(
            {
                "ids": ids,
                "train": trained_spans(trained),
                "split": len(self.chosen),
                "pair": pair_id,
                "origin": origin,
            }
        )


def fit_pair(prompt: RenderedChat, chosen: list[int], rejected: list[int], seq_len: int) -> FittedPair | None:
    """The pair's sequences (`prompt` rendered with the generation prompt; each answer's ids ending in
    <|end|>) within a row of `seq_len` by the truncation policy (module docstring); None when no answer
    token is left or the answers became identical."""
    ids = prompt.ids

    def need(prompt_length: int) -> int:
        return 2 * prompt_length + len(chosen) + len(rejected)

    dropped = False
    if need(len(ids)) > seq_len:
        first = 1 if prompt.roles[0] == "system" else 0
        keep_head = prompt.starts[first]  # <s> and the system prompt
        # An exchange starts at a user message after a non-user one; the last one always stays.
        cuts = [
            m
            for m in range(first + 1, len(prompt.roles))
            if prompt.roles[m] == "user" and prompt.roles[m - 1] != "user"
        ]
        for m in cuts:
            shortened = ids[:keep_head] + ids[prompt.starts[m] :]
            dropped = True
            if need(len(shortened)) <= seq_len or m == cuts[-1]:
                ids = shortened
                break
    room = seq_len - 2 * len(ids)
    cut = len(chosen) + len(rejected) > room
    if cut:
        if room < 2:
            return None
        half = room // 2
        if len(chosen) <= half:
            rejected = rejected[: room - len(chosen)]
        elif len(rejected) <= half:
            chosen = chosen[: room - len(rejected)]
        else:
            chosen, rejected = chosen[:half], rejected[: room - half]
        if chosen == rejected:
            return None
    return FittedPair(ids + chosen, ids + rejected, len(ids), dropped, cut)


def encode_pairs(tokenizer: ChatTokenizer, pairs: Sequence[Pair], *, num_threads: int = 1) -> list[tuple]:
    """(rendered prompt, chosen ids, rejected ids) of each pair: the prompt through the chat template with
    the generation prompt, each answer encoded alone and closed with <|end|>."""
    prompts = render_chats(
        tokenizer, [p.prompt for p in pairs], add_generation_prompt=True, num_threads=num_threads
    )
    answers = tokenizer.encode_batch(
        [text for p in pairs for text in (p.chosen, p.rejected)], num_threads=num_threads
    )
    end = tokenizer.role_ids["end"]
    return [(prompt, [*answers[2 * i], end], [*answers[2 * i + 1], end]) for i, prompt in enumerate(prompts)]


# ---------------------------------------------------------------------------------------------------
# Preparing


@dataclass
class PairSourceReport(SourceReport):
    """What preparing one source of pairs found (the order of the keys in report.json)."""

    empty: int = 0
    identical: int = 0
    truncated_to_nothing: int = 0
    held_out: int = 0
    kept: int = 0
    prompt_turns_dropped: int = 0
    answers_cut: int = 0
    tokens: int = 0
    chosen_tokens: int = 0
    rejected_tokens: int = 0
    chosen_longer: int = 0
    longest: int = 0


class PreferencePreparation(Preparation):
    """Preference pairs: the hooks of dataset/prepare.py. Pairs are numbered as their lines are written
    (training pairs in their shuffled order)."""

    what = "preference data"
    unit = "preference pair"
    items = "pairs"
    version = 1
    report_class = PairSourceReport
    counted = (
        ("malformed", "malformed"),
        ("empty", "with an empty answer"),
        ("identical", "with identical answers"),
        ("truncated_to_nothing", "truncated to nothing"),
        ("held_out", "held out"),
        ("prompt_turns_dropped", "lost their oldest turns"),
        ("answers_cut", "had their answers cut"),
    )
    row_note = ", a pair's two sequences per row"

    def __init__(self, config: PreferenceDataConfig, tokenizer: ChatTokenizer):
        super().__init__(config, tokenizer)
        self.pairs = 0  # ids given so far: unique within the prepared folder

    def read(self, source: ChatSource) -> Iterator[Record]:
        for origin, raw, error in iter_raw_records(source):
            try:
                if error is not None:
                    raise PairError("malformed", error)
                pair = to_pair(raw)
            except PairError as exc:
                yield Record(origin, problem=exc.kind, why=str(exc))
                continue
            yield Record(origin, pair)

    def held_out_key(self, example: Pair) -> str:
        return orjson.dumps([example.prompt, example.chosen, example.rejected]).decode()

    def fit(self, examples: list[Pair], num_threads: int) -> list[FittedPair | None]:
        encoded = encode_pairs(self.tokenizer, examples, num_threads=num_threads)
        return [
            fit_pair(prompt, chosen, rejected, self.config.seq_len) for prompt, chosen, rejected in encoded
        ]

    def tally(self, report: PairSourceReport, fitted: FittedPair | None, held_out: bool) -> bool:
        if fitted is None:
            report.truncated_to_nothing += 1
            return False
        if held_out:
            report.held_out += 1
            return True
        chosen_answer = len(fitted.chosen) - fitted.prompt_length
        rejected_answer = len(fitted.rejected) - fitted.prompt_length
        report.kept += 1
        report.prompt_turns_dropped += fitted.prompt_turns_dropped
        report.answers_cut += fitted.answers_cut
        report.tokens += len(fitted.chosen) + len(fitted.rejected)
        report.chosen_tokens += chosen_answer
        report.rejected_tokens += rejected_answer
        report.chosen_longer += chosen_answer > rejected_answer
        report.longest = max(report.longest, len(fitted.chosen) + len(fitted.rejected))
        return True

    def payload(self, fitted: FittedPair, origin: str) -> bytes:
        return orjson.dumps({"origin": origin, "fitted": asdict(fitted)})

    def line(self, payload: bytes) -> bytes:
        kept = orjson.loads(payload)
        self.pairs += 1
        return FittedPair(**kept["fitted"]).line(self.pairs - 1, kept["origin"])

    def report_extras(self) -> dict[str, Any]:
        return {"pairs": self.pairs}

    @classmethod
    def sizes(cls, source: dict[str, Any]) -> list[str]:
        if not source.get("kept"):
            return []
        return [f"{source['tokens']:,} tokens, longest pair {source['longest']:,}", _length_bias(source)]

    @classmethod
    def totals(cls, sources: dict[str, dict[str, Any]]) -> list[str]:
        kept = [s for s in sources.values() if s.get("kept")]
        if len(kept) < 2:
            return []
        keys = ("chosen_tokens", "rejected_tokens", "chosen_longer", "kept")
        return [f"  all training pairs: {_length_bias({k: sum(s[k] for s in kept) for k in keys})}"]


def _length_bias(source: Mapping[str, Any]) -> str:
    ratio = source["chosen_tokens"] / max(source["rejected_tokens"], 1)
    longer = source["chosen_longer"] / max(source["kept"], 1)
    return f"chosen/rejected answer length {ratio:.2f} (chosen longer in {longer:.0%} of pairs)"


prepare_preference_data = PreferencePreparation.prepare
format_report = PreferencePreparation.format_report
