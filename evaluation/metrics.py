"""From continuation log-likelihoods to a task's figures: the prediction under the task's normalisation,
accuracy, centered accuracy, the gold answer's bits per byte, and the CORE aggregate.

- normalised score of a choice (evaluation/tasks.py METRICS): raw = its log-likelihood; per_token = / its
  tokens; per_char = / its characters (the leading space counted, as OLMES and OLMo's `len_norm`); uncond =
  minus its log-likelihood after the context-free prompt (OLMES `acc_uncond`). The prediction is the argmax
  (the first of equal scores);
- accuracy = the fraction of documents whose prediction is the gold; chance = the mean over documents of
  1 / their number of choices (what guessing scores); centered = (accuracy - chance) / (1 - chance), 0 for a
  guesser and 1 for a perfect model, so tasks with 2 and 5 choices average fairly (DCLM's and nanochat's
  CORE);
- bits per byte of the gold answer = -log-likelihood / (ln 2 * its UTF-8 bytes), the mean over documents
  (OLMo's `bpb`): it moves while accuracy is still at chance;
- CORE = the mean centered accuracy over the CORE tasks, when all of them were scored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass
class ChoiceScore:
    """One continuation's log-likelihood and its size (what the normalisations divide by)."""

    loglikelihood: float
    tokens: int
    chars: int
    bytes: int
    unconditional: float | None = None
    """Its log-likelihood after the context-free prompt (normalisation `uncond` only)."""


def normalised(choice: ChoiceScore, normalisation: str) -> float:
    """The score the argmax compares (module docstring)."""
    if normalisation in ("raw", "bpb"):
        return choice.loglikelihood
    if normalisation == "per_token":
        return choice.loglikelihood / choice.tokens
    if normalisation == "per_char":
        return choice.loglikelihood / max(choice.chars, 1)
    if normalisation == "uncond":
        assert choice.unconditional is not None
        return choice.loglikelihood - choice.unconditional
    raise ValueError(f"unknown normalisation {normalisation!r}")


def prediction(choices: Sequence[ChoiceScore], normalisation: str) -> int:
    """The index of the best choice (the first of equal ones)."""
    scores = [normalised(c, normalisation) for c in choices]
    return max(range(len(scores)), key=scores.__getitem__)


def gold_bits_per_byte(choice: ChoiceScore) -> float:
    """Bits per UTF-8 byte of a (gold) continuation."""
    return -choice.loglikelihood / (math.log(2) * max(choice.bytes, 1))


def task_figures(
    documents: Sequence[tuple[Sequence[ChoiceScore], int]], normalisation: str
) -> dict[str, float]:
    """A task's figures from its documents' (choices, gold): accuracy, chance and centered for a multiple-
    choice task, and for every task the gold answer's bits per byte and the number of documents `n`."""
    n = len(documents)
    bpb = sum(gold_bits_per_byte(choices[gold]) for choices, gold in documents) / n
    if normalisation == "bpb":
        return {"bpb": bpb, "n": n}
    accuracy = sum(prediction(choices, normalisation) == gold for choices, gold in documents) / n
    chance = sum(1 / len(choices) for choices, _ in documents) / n
    return {
        "accuracy": accuracy,
        "centered": centered(accuracy, chance),
        "chance": chance,
        "bpb": bpb,
        "n": n,
    }


def centered(accuracy: float, chance: float) -> float:
    """(accuracy - chance) / (1 - chance): 0 at chance, 1 when every answer is right."""
    return (accuracy - chance) / (1 - chance)


def core_score(tasks: Mapping[str, Mapping[str, float]], core: Sequence[str]) -> float | None:
    """The mean centered accuracy over the `core` tasks; None unless every one of them was scored."""
    if not all(name in tasks and "centered" in tasks[name] for name in core):
        return None
    return sum(tasks[name]["centered"] for name in core) / len(core)
