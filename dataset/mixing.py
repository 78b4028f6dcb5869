"""Mixing: which group (source) the next document comes from.

The endless training stream chooses, before each document, the group furthest below its share (tokens
taken / weight smallest, ties to the first), so with weights 1:1 the token counts of the sources stay
equal however long their documents are, within one document's length. This is deterministic; the
randomness comes from the order inside each group (dataset/document_order.py). The finite held-out stream
reads its groups one after another, each once.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from dataset.document_order import Document, GroupStream, Ref


def check_weights(mixture: Mapping[Any, Any]) -> dict[str, float]:
    """A config's `mixture` as {source: weight}: each weight a finite number >= 0, not all of them 0."""
    weights = {}
    for source, weight in mixture.items():
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"mixture weight of {source!r} must be a number, got {weight!r}") from None
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"mixture weight of {source!r} must be finite and >= 0, got {weight}")
        weights[str(source)] = weight
    if weights and not any(weights.values()):
        raise ValueError("every mixture weight is 0: nothing to train on")
    return weights


class Mixer:
    """Documents from several groups: by token share (endless), or group after group, once (`finite`)."""

    def __init__(self, streams: Sequence[GroupStream], weights: Sequence[float], *, finite: bool):
        if len(streams) != len(weights):
            raise ValueError(f"{len(streams)} streams but {len(weights)} weights")
        self.streams = list(streams)
        self.weights = list(weights)
        self.finite = finite
        self.reset()

    def reset(self) -> None:
        for stream in self.streams:
            stream.reset()
        self.group_tokens = [0] * len(self.streams)  # tokens of the documents taken, per group
        self.exhausted = [False] * len(self.streams)

    def state_dict(self) -> dict[str, Any]:
        return {
            "groups": {s.group.name: s.state_dict() for s in self.streams},
            "group_tokens": list(self.group_tokens),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        names = [s.group.name for s in self.streams]
        if sorted(state["groups"]) != sorted(names):
            raise ValueError(
                f"data state has sources {sorted(state['groups'])}, this stream has {sorted(names)}"
            )
        for stream in self.streams:
            stream.load_state_dict(state["groups"][stream.group.name])
        self.group_tokens = [int(t) for t in state["group_tokens"]]

    def choose(self) -> int:
        """The group furthest below its token share (ties: the first)."""
        return min(range(len(self.streams)), key=lambda g: (self.group_tokens[g] / self.weights[g], g))

    def next_document(self) -> tuple[int, Document] | None:
        """(group index, document); None when a finite stream is over."""
        if self.finite:
            for group, stream in enumerate(self.streams):
                if self.exhausted[group]:
                    continue
                document = stream.next_document(finite=True)
                if document is not None:
                    break
                self.exhausted[group] = True
            else:
                return None
        else:
            group = self.choose()
            document = self.streams[group].next_document(finite=False)
            assert document is not None
        self.group_tokens[group] += len(document.tokens)
        return group, document

    def document_at(self, group: int, ref: Ref) -> Document:
        """A document of a group found again by its `ref` (to restore a document cut by a checkpoint)."""
        return self.streams[group].document_at(ref)

    def upcoming(self) -> list[Hashable]:
        """The units the groups need next, in turns: the next group's most urgent first."""
        lists = [s.upcoming() for s in self.streams]
        if not self.finite and len(lists) > 1:
            first = self.choose()
            lists = [lists[first], *lists[:first], *lists[first + 1 :]]
        longest = max(map(len, lists), default=0)
        return [group[i] for i in range(longest) for group in lists if i < len(group)]
