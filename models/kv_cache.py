"""The static key/value cache of generation and serving (gpt-fast's design).

models/generate.py decodes a batch of prompts through one cache; the chat server's engine
(serve/engine.py) gives each row (slot) to one request. The model only calls `begin` (positions and the
attention mask of a forward), `update` (each layer's keys and values) and `end`, so the cache lives
here, beside the attention backends whose masks it builds, and not inside the model file.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch

from models.attention import AttentionBackend, DenseMask, PackageBackend, PackedMask, SdpaBackend


class CacheShape(Protocol):
    """What the cache needs of a model's config (models.llama.ModelConfig has it; llama.py imports this
    module, so this one does not import it back)."""

    n_layers: int
    n_kv_heads: int
    head_dim: int


class KVCache:
    """Static key/value cache (gpt-fast's design): buffers allocated once for `batch_size` rows of `max_len`
    positions and written in place at each row's current position, so a decoding step always sees the same
    buffers.

    Every row keeps its own length (`lengths`, on the host: shapes and slices are read from it without a
    device sync). generate() keeps the rows of a batch level; the chat server's engine (serve/engine.py)
    gives each row (slot) to one request, so rows are at different positions, and a row is reset for a new
    request by setting its length to 0 while the others carry on. `rows(start, stop)` is a view of some rows
    sharing the buffers (one request's prefill into its slot).

    The cache also remembers every cached position's document id, so left-padded prompts (padding = its own
    document) and packed prompts stay masked correctly while decoding.
    """

    def __init__(
        self,
        config: CacheShape,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.document_ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long)
        self.max_len = max_len
        # Where the forward in progress writes: every row from column `_start` (rows level), or per row at
        # `_columns` (B, T); and how many columns its attention reads.
        self._start = 0
        self._columns: torch.Tensor | None = None
        self._kv_len = 0

    def rows(self, start: int, stop: int) -> KVCache:
        """A view of rows [start, stop): writes through it (and its length updates) land in this cache."""
        view = copy.copy(self)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.document_ids, view.lengths = self.document_ids[start:stop], self.lengths[start:stop]
        return view

    def select(self, rows: torch.Tensor) -> KVCache:
        """A new cache whose row i is a copy of row `rows[i]` of this one (keys, values, documents, length):
        continuations of one shared prefix each go on from their own copy (evaluation/loglikelihood.py)."""
        chosen = copy.copy(self)
        chosen.k, chosen.v = self.k[:, rows], self.v[:, rows]
        chosen.document_ids, chosen.lengths = self.document_ids[rows], self.lengths[rows.cpu()]
        return chosen

    @property
    def length(self) -> int:
        """The rows' common length (generate()'s batches keep their rows level)."""
        if not bool((self.lengths == self.lengths[0]).all()):
            raise ValueError(f"the rows have different lengths {self.lengths.tolist()}")
        return int(self.lengths[0])

    def begin(
        self, position_ids: torch.Tensor | None, t: int, backend: AttentionBackend, device: torch.device
    ) -> tuple[torch.Tensor, Any]:
        """Start a forward of `t` new positions per row, each row after its own length: record their documents
        (a new one wherever the position restarts at 0, or a row starts empty) and return the position ids
        (default: continuing each row) and the attention mask over the cache."""
        lengths = self.lengths
        longest = int(lengths.max())
        if longest + t > self.max_len:
            raise ValueError(f"KV cache full: {longest} + {t} positions > max_len {self.max_len}")
        self._kv_len = longest + t
        level = bool((lengths == longest).all())
        row_lengths = lengths.to(device)
        columns = row_lengths[:, None] + torch.arange(t, device=device)
        if position_ids is None:
            position_ids = columns
        starts = position_ids == 0
        starts[:, 0] |= row_lengths == 0
        last = self.document_ids.gather(1, (row_lengths - 1).clamp(min=0)[:, None])
        new_documents = torch.where(row_lengths[:, None] > 0, last, 0) + starts.long().cumsum(dim=1)
        documents = self.document_ids[:, : self._kv_len]
        if level:  # plain slices, and a mask from the backend itself (flex builds block masks)
            self._start, self._columns = longest, None
            self.document_ids[:, longest : self._kv_len] = new_documents
            mask = backend.prepare(q_len=t, kv_len=self._kv_len, document_ids=documents, device=device)
            return position_ids, mask
        self._columns = columns
        self.document_ids.scatter_(1, columns, new_documents)
        allowed = torch.arange(self._kv_len, device=device) <= columns[:, :, None]  # causal, per row
        query_documents = documents.gather(1, columns)
        allowed &= query_documents[:, :, None] == documents[:, None, :]
        return position_ids, rows_mask(backend, allowed[:, None])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values for `layer`; return all cached ones so far (this step included)."""
        if self._columns is None:
            end = self._start + k.shape[2]
            self.k[layer, :, :, self._start : end] = k
            self.v[layer, :, :, self._start : end] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[layer][rows, :, self._columns] = k.transpose(1, 2)
            self.v[layer][rows, :, self._columns] = v.transpose(1, 2)
        return self.k[layer, :, :, : self._kv_len], self.v[layer, :, :, : self._kv_len]

    def end(self, t: int) -> None:
        """Finish the forward: every row is `t` positions longer."""
        self.lengths += t


def rows_mask(backend: AttentionBackend, allowed: torch.Tensor) -> Any:
    """The mask for rows at different cache positions, an explicit (B, 1, Tq, Tk) boolean mask: the backends
    that take one (sdpa, eager, and the package kernels, which decode through sdpa anyway)."""
    dense = DenseMask(allowed, is_causal=False)
    if isinstance(backend, SdpaBackend):
        return dense
    if isinstance(backend, PackageBackend):
        return PackedMask(None, None, 0, fallback=dense)
    raise ValueError(
        f"attention backend {backend.name!r} cannot attend from rows at different cache positions; "
        "use sdpa or eager (the chat server does)"
    )
