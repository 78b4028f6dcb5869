"""The preference-tuning stream: instruction tuning's (dataset/chat_stream.py), reading prepared pairs.

A pair is one document of the stream (the chosen sequence, then the rejected one), so packing, mixing, the
rank split and exact resume are instruction tuning's; the batch adds which tokens belong to which answer
(`sequence_ids`) and each pair's id (`pair_ids`, the key of cached reference log-probabilities).
"""

from __future__ import annotations

from typing import Any

import torch

from common import IGNORE_INDEX
from dataset.chat_stream import (
    ChatLoader,
    ChatStream,
    ChatUnitRequest,
    build_chat_loaders,
    read_prepared_unit,
)
from dataset.document_order import Unit
from dataset.preference_prepare import PreferenceDataConfig
from dataset.prepare import PreparedData


def load_pair_unit(request: ChatUnitRequest, _state: Any = None) -> Unit:
    """A unit of prepared pairs in the unit's order: both sequences as one document, labels the ids on the
    answers, and as meta (where the rejected sequence starts, the pair's id)."""
    return read_prepared_unit(request, "pair", lambda line: (int(line["split"]), int(line["pair"])))


class PreferenceLoader(ChatLoader):
    """Batches of whole pairs. Beside input_ids, labels and position_ids (restarting at every sequence):

    - `sequence_ids` (B, T): at every trained label, 2k for the chosen and 2k + 1 for the rejected answer
      of the batch's k-th pair; -1 elsewhere;
    - `pair_ids` (P,): each pair's id in the prepared folder (the key of cached reference log-probs).
    """

    def __init__(self, stream: ChatStream, *, packing: str, **kwargs: Any):
        super().__init__(stream, packing=packing, **kwargs)
        self.position_ids = True  # the rejected sequence restarts at 0 even in a row of one pair

    def rows_to_batch(self, rows: list) -> dict[str, torch.Tensor]:
        batch = super().rows_to_batch(rows)
        positions = batch["position_ids"].clone()
        sequence_ids = torch.full_like(positions, -1)
        pair_ids = []
        for r, row in enumerate(rows):
            for seg in row.segments:
                split, pair = seg.meta
                k, end = len(pair_ids), seg.start + seg.length
                pair_ids.append(pair)
                positions[r, seg.start + split : end] = torch.arange(seg.length - split)
                sequence_ids[r, seg.start : seg.start + split] = 2 * k
                sequence_ids[r, seg.start + split : end] = 2 * k + 1
        sequence_ids[batch["labels"] == IGNORE_INDEX] = -1
        batch["position_ids"] = positions
        batch["sequence_ids"] = sequence_ids
        batch["pair_ids"] = torch.tensor(pair_ids, dtype=torch.long)
        return batch


def build_preference_loaders(
    config: PreferenceDataConfig,
    prepared: PreparedData,
    pad_id: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    rows_per_step: int | None = None,
    eval_batches: int | None = None,
    every_pair: bool = False,
) -> tuple[PreferenceLoader, PreferenceLoader | None]:
    """This rank's endless training loader and its held-out loader (None when nothing is held out):
    instruction tuning's, reading pairs.

    `every_pair`: the training loader goes once over the training pairs in file order instead (the pass
    that caches the reference's log-probabilities)."""
    return build_chat_loaders(  # type: ignore[return-value]
        config,
        prepared,
        pad_id,
        rank=rank,
        world_size=world_size,
        rows_per_step=rows_per_step,
        eval_batches=eval_batches,
        once=every_pair,
        load_unit=load_pair_unit,
        item="pairs",
        loader_class=PreferenceLoader,
    )
