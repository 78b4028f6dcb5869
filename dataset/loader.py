"""The loader the training loop uses: batches of packed rows, with exact-resume state.

A batch is `{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}` plus `"position_ids"` (restarting
at every segment, dataset/packing.py) when `position_ids` is on. The loader takes its rows from a
`RowStream` (the pretraining stream is one) and adds what every stream needs: batching, the state
envelope (a format version, the settings the rows depend on, the batches handed out), the finite
held-out iteration, and closing the stream's worker processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from dataset.packing import PackedRow


class RowStream(Protocol):
    """What the loader needs from a stream of packed rows."""

    def reset(self) -> None: ...
    def prefetch(self) -> None: ...
    def next_row(self) -> PackedRow | None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def counters(self) -> dict[str, dict[str, int]]: ...
    def close(self) -> None: ...


class PackedLoader:
    """Batches of packed rows for one rank, with `state_dict()`/`load_state_dict()` for exact resume.

    Iterating continues from the current state; the training stream never ends. The state counts the
    batches handed out (not those prefetched), so a checkpoint taken between steps resumes at the next
    batch. `fingerprint` holds the settings the rows depend on: a state saved under other settings is
    refused. Do not wrap it in `accelerator.prepare`: it already reads only this rank's share.

    With `validation`, every iteration yields the same held-out batches from the start; with
    `max_batches`, exactly that many, starting over if the held-out rows are fewer, so every rank runs
    the same number.
    """

    STATE_VERSION: ClassVar[int] = 1
    """The format of the state this loader writes (a stream with a new format raises it)."""
    READS_VERSIONS: ClassVar[tuple[int, ...]] = (1,)
    """The formats it can continue from."""

    def __init__(
        self,
        stream: RowStream,
        *,
        batch_size: int,
        fingerprint: dict[str, Any],
        position_ids: bool = False,
        pin_memory: bool = False,
        validation: bool = False,
        max_batches: int | None = None,
        rank: int = 0,
    ):
        self.stream = stream
        self.batch_size = batch_size
        self.fingerprint = fingerprint
        self.position_ids = position_ids
        self.pin_memory = pin_memory
        self.validation = validation
        self.max_batches = max_batches
        self.rank = rank
        self.batches = 0

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream, JSON-serialisable; includes the stream's counters."""
        return {
            "version": self.STATE_VERSION,
            "fingerprint": self.fingerprint,
            "batches": self.batches,
            **self.stream.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken (any num_workers; same data settings)."""
        if state.get("version") not in self.READS_VERSIONS:
            raise ValueError(f"data state version {state.get('version')} is not one of {self.READS_VERSIONS}")
        saved = state["fingerprint"]
        changed = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"cannot resume the data stream exactly; settings changed ({details})")
        self.stream.load_state_dict(state)
        self.batches = int(state["batches"])

    def counters(self) -> dict[str, dict[str, int]]:
        """This rank's running counts for the training metrics, e.g. {"tokens_per_source": {...}}."""
        return self.stream.counters()

    def rows_to_batch(self, rows: list[PackedRow]) -> dict[str, torch.Tensor]:
        batch = {
            "input_ids": torch.from_numpy(np.stack([r.tokens for r in rows])),
            "labels": torch.from_numpy(np.stack([r.labels for r in rows])),
        }
        if self.position_ids:
            batch["position_ids"] = torch.from_numpy(np.stack([r.positions for r in rows]))
        if self.pin_memory and torch.cuda.is_available():
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def iter_rows(self) -> Iterator[PackedRow]:
        """The packed rows one by one (for inspection; the batches are these rows, batch_size at a time)."""
        while (row := self.stream.next_row()) is not None:
            yield row

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.validation:
            return self._iter_validation()
        return self._iter_training()

    def _iter_training(self) -> Iterator[dict[str, torch.Tensor]]:
        self.stream.prefetch()
        while True:
            rows = [self.stream.next_row() for _ in range(self.batch_size)]
            self.batches += 1
            yield self.rows_to_batch(rows)  # type: ignore[arg-type]

    def _iter_validation(self) -> Iterator[dict[str, torch.Tensor]]:
        try:
            yield from self._held_out_batches()
        finally:
            self.stream.close()  # validation is occasional: free the workers until the next round

    def _held_out_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        yielded = 0
        while self.max_batches is None or yielded < self.max_batches:
            self.stream.reset()
            self.stream.prefetch()
            produced = 0
            while self.max_batches is None or yielded < self.max_batches:
                rows = []
                for _ in range(self.batch_size):
                    row = self.stream.next_row()
                    if row is None:
                        break
                    rows.append(row)
                if not rows:
                    break
                produced += 1
                yielded += 1
                yield self.rows_to_batch(rows)
                if len(rows) < self.batch_size:
                    break
            if self.max_batches is None:
                return
            if produced == 0:
                raise ValueError(f"the held-out stream of rank {self.rank} has no documents")

    def close(self) -> None:
        """Stop the worker processes."""
        self.stream.close()

    def __enter__(self) -> PackedLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        stream = getattr(self, "stream", None)
        if stream is not None:
            stream.close()
