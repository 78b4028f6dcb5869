"""Log-likelihood of continuations after contexts, batched, each distinct context run once.

A request is (context ids, continuation ids); its score is the sum of log p(continuation token | everything
before it). Requests that share a context (a multiple-choice question's choices) share one run of it:

1. the distinct contexts are sorted longest first and cut into batches of at most `batch_size` continuation
   rows (a context's continuations stay together: a batch holds at least one context, however many);
2. prefill: the batch's contexts, left-padded to the longest (the padding is a document of its own, so it is
   never attended to), run once into a KV cache (models/kv_cache.py); the last position's logits give every
   continuation's first token;
3. the cache's rows are copied once per continuation (`KVCache.select`), and the continuations, right-padded,
   run on top of their context in one forward that returns each target's log-probability.

A context longer than the model's window loses its oldest tokens (as OLMo and lm-eval truncate): it keeps
`max_len - longest continuation of that context` of them. A continuation that does not fit the window at
all is scored in pieces (`window_pieces`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from common import IGNORE_INDEX
from models.kv_cache import KVCache
from models.llama import Llama


@dataclass(frozen=True)
class Request:
    """A continuation to score after a context, both as token ids (the context starts with <s> if any)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@torch.inference_mode()
def loglikelihoods(model: Llama, requests: Sequence[Request], *, batch_size: int = 16) -> list[float]:
    """The log-likelihood (natural log, summed over tokens) of each request's continuation, in order."""
    max_len = model.config.max_seq_len
    pieces: list[Request] = []
    owners: list[int] = []
    for index, request in enumerate(requests):
        if not request.context or not request.continuation:
            raise ValueError(f"request {index}: an empty context or continuation cannot be scored")
        for piece in window_pieces(request, max_len):
            pieces.append(piece)
            owners.append(index)
    by_context: dict[tuple[int, ...], list[int]] = {}
    for index, piece in enumerate(pieces):
        by_context.setdefault(piece.context, []).append(index)
    contexts = []
    for context, indices in by_context.items():
        longest = max(len(pieces[i].continuation) for i in indices)
        contexts.append((context[-(max_len - longest) :], indices))
    # Longest first: the batch that needs the most memory runs first; ties in file order (a stable sort).
    contexts.sort(key=lambda item: -(len(item[0]) + max(len(pieces[i].continuation) for i in item[1])))
    piece_scores = [0.0] * len(pieces)
    batch: list[tuple[tuple[int, ...], list[int]]] = []
    rows = 0
    for context, indices in contexts:
        if batch and rows + len(indices) > batch_size:
            _score_batch(model, batch, pieces, piece_scores)
            batch, rows = [], 0
        batch.append((context, indices))
        rows += len(indices)
    if batch:
        _score_batch(model, batch, pieces, piece_scores)
    scores = [0.0] * len(requests)
    for owner, score in zip(owners, piece_scores):
        scores[owner] += score
    return scores


def window_pieces(request: Request, max_len: int) -> list[Request]:
    """The request itself when its continuation fits the window with at least one context token; else its
    continuation cut into pieces of max_len - 1 tokens, each after as much of what precedes it as fits (as
    lm-eval's rolling log-likelihood), so every continuation token is scored once."""
    if len(request.continuation) < max_len:
        return [request]
    sequence = request.context + request.continuation
    pieces = []
    for start in range(len(request.context), len(sequence), max_len - 1):
        stop = min(start + max_len - 1, len(sequence))
        pieces.append(Request(sequence[max(0, stop - max_len) : start], sequence[start:stop]))
    return pieces


def _score_batch(
    model: Llama,
    batch: list[tuple[tuple[int, ...], list[int]]],
    requests: Sequence[Request],
    scores: list[float],
) -> None:
    device = model.lm_head.weight.device
    lengths = [len(context) for context, _ in batch]
    width = max(lengths)
    continuations = [[requests[i].continuation for i in indices] for _, indices in batch]
    longest = max(len(c) for row in continuations for c in row)
    cache = KVCache(
        model.config, len(batch), width + longest, dtype=model.lm_head.weight.dtype, device=device
    )

    # Prefill: left padding restarts its positions at 0, so it is a document of its own that no token sees.
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    positions = torch.zeros(len(batch), width, dtype=torch.long)
    for row, (context, _) in enumerate(batch):
        pad = width - len(context)
        ids[row, pad:] = torch.tensor(context)
        positions[row, :pad] = torch.arange(pad)
        positions[row, pad:] = torch.arange(len(context))
    out = model(ids.to(device), position_ids=positions.to(device), kv_cache=cache, logits_to_keep=1)
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)

    owners = [row for row, conts in enumerate(continuations) for _ in conts]
    flat = [c for conts in continuations for c in conts]
    totals = [float(first[row, c[0]]) for row, c in zip(owners, flat)]
    if longest > 1:
        # Each continuation on top of its context's cache: position t predicts token t + 1; the padding
        # after a continuation is causal, so it changes nothing before it.
        inputs = torch.zeros(len(flat), longest, dtype=torch.long)
        labels = torch.full((len(flat), longest), IGNORE_INDEX, dtype=torch.long)
        for row, tokens in enumerate(flat):
            inputs[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, : len(tokens)] = torch.tensor(tokens)
        context_lengths = torch.tensor([lengths[row] for row in owners])
        positions = context_lengths[:, None] + torch.arange(longest)
        rows_cache = cache.select(torch.tensor(owners, device=device))
        out = model(
            inputs.to(device),
            labels=labels.to(device),
            position_ids=positions.to(device),
            kv_cache=rows_cache,
            return_token_logprobs=True,
        )
        rest = out.token_logprobs.double().sum(dim=1).tolist()
        totals = [a + b for a, b in zip(totals, rest)]
    for index, total in zip((i for _, indices in batch for i in indices), totals):
        scores[index] = total
