"""The pretraining stream's worker function: read a unit of plain-text records and tokenize it.

Every record `{"text": ...}` becomes `<s> text </s>` (`<s>` only with `add_bos`). A record with an empty
text is skipped (it would be a lone </s>), and so is a record on the wrong side of the held-out split
(dataset/held_out.py: a hash of its text puts it in `held_out_fraction` or not, the same on every machine).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from data.shard_io import ShardError
from dataset.document_order import Unit, UnitKey
from dataset.held_out import is_held_out


class TextTokenizer(Protocol):
    """What the stream needs from `dataset.tokenizer.Tokenizer`."""

    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = False, eos: bool = False
    ) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


@dataclass(frozen=True)
class TextUnitRequest:
    """Everything a worker needs to produce one unit of text documents; also the unit's identity."""

    key: UnitKey
    add_bos: bool
    held_out_fraction: float  # 0 = keep every record
    keep_held_out: bool  # True: keep only the held-out records (validation); False: only the others

    def __str__(self) -> str:
        return f"unit {self.key.index} ({self.key.unit_docs} records) of {self.key.part.path}"


def read_unit_texts(request: TextUnitRequest) -> list[str | None]:
    """The texts of the unit's records, in file order; None for a record this stream skips."""
    texts: list[str | None] = []
    path = request.key.part.path
    for line_number, obj in request.key.iter_records():
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise ShardError(f"{path}:{line_number}: expected an object with a 'text' string")
        if not text:
            texts.append(None)  # an empty document would be a lone </s>
        elif (
            request.held_out_fraction
            and is_held_out(text, request.held_out_fraction) != request.keep_held_out
        ):
            texts.append(None)
        else:
            texts.append(text)
    return texts


def tokenize_unit(request: TextUnitRequest, tokenizer: TextTokenizer) -> Unit:
    """Read, shuffle and tokenize one unit: `<s>`? ids `</s>` per kept record."""
    texts = request.key.shuffle(read_unit_texts(request))
    kept = [t for t in texts if t is not None]
    encoded = iter(tokenizer.encode_batch(kept, bos=request.add_bos, eos=True) if kept else [])
    return Unit.build([None if t is None else next(encoded) for t in texts])
