"""Preference pairs made from instruction data, so preference tuning can run on data anyone can fetch.

    python dataset/preference_pairs.py chats.jsonl alpaca.json --output pairs.jsonl --seed 0
    python dataset/preference_pairs.py --files chats.jsonl --output pairs.jsonl

Every usable conversation of the sources (any form instruction tuning reads: alpaca, ShareGPT, messages,
prompt/completion; files or hf:DATASET) gives one pair: the prompt is the conversation up to its last
assistant message, `chosen` is that real answer, and `rejected` is made from it by one rule, drawn per
record with the seed among those that apply:

- echo: the last user message repeated back (a chat model must answer, not parrot);
- other: the real answer to a different prompt of the same source (fluent, but off the question);
- shuffled: the answer's words in a random order (its sentences' words, or its characters when it has
  fewer than four words: Chinese has no spaces);
- truncated: the answer's first third (at least one word or character fewer; it also loses its end).

A rule that would give the chosen text back (a one-word answer shuffled, an echo equal to the answer) is
not drawn for that record. The pairs are written as JSON Lines, `{"prompt": [messages], "chosen": str,
"rejected": str, "rule": name, "origin": "file:line"}`, atomically; a summary counts the pairs per rule
and the records skipped (malformed, with where and why).
"""

from __future__ import annotations

import random
import sys
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import orjson

from common.config import ConfigError, parse_config
from common.files import write_atomic
from common.randomness import mix_seed
from dataset.chat_sources import Messages, iter_source, parse_sources

Rule = Literal["echo", "other", "shuffled", "truncated"]
RULES: tuple[Rule, ...] = typing.get_args(Rule)
MAX_EXAMPLES = 10


@dataclass
class PairsConfig:
    """Make preference pairs (prompt, chosen, rejected) from instruction data.

    Per usable conversation, its last answer is chosen and a worse one made from it by a rule (echo, other,
    shuffled, truncated) is rejected.
    """

    files: list[str] = field(default_factory=list)
    """Instruction data (required): files, globs, folders, NAME=PATTERN or hf:DATASET (as instruction
    tuning's data.files), after --files or without --."""
    output: str = ""
    """The pairs file to write (JSON Lines; required)."""
    seed: int = 0
    """Seed of the rule drawn per record and of the 'other' and 'shuffled' rules."""
    rules: list[Rule] = field(default_factory=lambda: list(RULES))
    """Rules to draw from: echo, other, shuffled, truncated."""

    def __post_init__(self) -> None:
        if not self.files or not self.output:
            raise ValueError("give the instruction data and the file to write: FILE... --output PAIRS.jsonl")
        if not self.rules:
            raise ValueError(f"rules must name at least one of {', '.join(RULES)}")


def _units(text: str) -> tuple[list[str], str]:
    """The answer's words (joined back with spaces), or its characters when it has fewer than four words."""
    words = text.split()
    return (words, " ") if len(words) >= 4 else (list(text.strip()), "")


def shuffled(text: str, rng: random.Random) -> str:
    units, joiner = _units(text)
    order = units[:]
    rng.shuffle(order)
    return joiner.join(order)


def truncated(text: str) -> str:
    units, joiner = _units(text)
    keep = min(len(units) - 1, max(1, len(units) // 3))
    return joiner.join(units[:keep])


def make_rejected(rule: str, prompt: Messages, chosen: str, other: str, rng: random.Random) -> str:
    """The rejected answer by `rule` (module docstring); `other` is a different prompt's answer."""
    if rule == "echo":
        return prompt[-1]["content"]
    if rule == "other":
        return other
    if rule == "shuffled":
        return shuffled(chosen, rng)
    return truncated(chosen)


def build_pairs(config: PairsConfig, log=print) -> dict:
    """Write the pairs of `config.files` to `config.output`; returns the counts (per rule, skipped)."""
    if not config.output:
        raise ValueError("no output file: pass --output PAIRS.jsonl")
    lines: list[bytes] = []
    counts: Counter[str] = Counter()
    examples: list[str] = []
    for source_index, source in enumerate(parse_sources(config.files)):
        records = []
        for record in iter_source(source):
            if record.messages is None:
                counts["malformed"] += 1
                if len(examples) < MAX_EXAMPLES:
                    examples.append(f"{record.origin}: {record.error}")
                continue
            last = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
            prompt = record.messages[:last]
            if not prompt or prompt[-1]["role"] != "user":
                counts["no user turn before the answer"] += 1
                continue
            records.append((record.origin, prompt, record.messages[last]["content"]))
        rng = random.Random(mix_seed(config.seed, source_index))
        # 'other' takes the answer of the record this permutation assigns (a different one when it can).
        partner = list(range(len(records)))
        rng.shuffle(partner)
        for index, (origin, prompt, chosen) in enumerate(records):
            other_index = partner[index] if partner[index] != index else partner[(index + 1) % len(records)]
            other = records[other_index][2]
            candidates = [
                rule
                for rule in config.rules
                if (rule != "echo" or prompt[-1]["content"].strip() != chosen.strip())
                and (rule != "other" or other.strip() != chosen.strip())
                and (rule not in ("shuffled", "truncated") or len(_units(chosen)[0]) >= 2)
            ]
            if not candidates:
                counts["no rule applies"] += 1
                continue
            rule = rng.choice(candidates)
            rejected = make_rejected(rule, prompt, chosen, other, rng)
            if rejected.strip() == chosen.strip() or not rejected.strip():
                counts["no rule applies"] += 1
                continue
            counts[rule] += 1
            lines.append(
                orjson.dumps(
                    {"prompt": prompt, "chosen": chosen, "rejected": rejected, "rule": rule, "origin": origin}
                )
            )
    if not lines:
        raise ValueError(f"no pair could be made from {config.files} ({dict(counts)})")
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, b"\n".join(lines) + b"\n")
    made = {rule: counts[rule] for rule in RULES if counts[rule]}
    skipped = {k: v for k, v in counts.items() if k not in RULES}
    log(
        f"wrote {len(lines):,} pairs to {output} (rejected by rule: "
        + ", ".join(f"{rule} {n:,}" for rule, n in made.items())
        + (f"; skipped: {', '.join(f'{k} {v:,}' for k, v in skipped.items())}" if skipped else "")
        + ")"
    )
    for example in examples:
        log(f"  malformed: {example}")
    return {"pairs": len(lines), "rules": made, "skipped": skipped}


PROG = "dataset/preference_pairs.py"


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(PairsConfig, argv, prog=PROG, positional="files")
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        build_pairs(config)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
