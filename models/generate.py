"""Text generation with a static KV cache: greedy or sampled (temperature, top-k, top-p), repetition penalty,
stop tokens, a seed, batches of left-padded prompts. Training samples text with it (training/evaluation.py);
the chat server decodes with its own loop over requests that come and go (serve/engine.py), sharing
`process_logits` and the KV cache (models/kv_cache.py).

The prompt is run once (prefill) into a KV cache allocated for prompt + max_new_tokens positions; every later
step feeds only the newest token. Left padding is handled as a document of its own (see Llama.forward): the
padding never attends to, or is attended by, the prompt, and the prompt's positions start at 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from models.kv_cache import KVCache
from models.llama import Llama


def process_logits(
    logits: torch.Tensor,
    seen: torch.Tensor | None,
    *,
    temperature: float | torch.Tensor,
    top_k: int | torch.Tensor | None,
    top_p: float | torch.Tensor | None,
    repetition_penalty: float | torch.Tensor,
) -> torch.Tensor:
    """Next-token scores (B, V) after repetition penalty, temperature, top-k and top-p, in that order.

    Each setting is one value for every row or a (B,) tensor of per-row values (the chat server decodes
    requests with different settings in one batch). Per row, temperature 0 (greedy: the caller takes the
    argmax, which no later step changes), top_k 0 or None and top_p 1 or None leave that step out.
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    penalty = _per_row(repetition_penalty, 1.0, logits)
    if seen is not None and bool((penalty != 1.0).any()):
        # CTRL (Keskar et al. 2019): make every token already in the row less likely, whatever its sign.
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    temperature = _per_row(temperature, 0.0, logits)
    if bool((temperature > 0).any()):
        logits = logits / torch.where(temperature > 0, temperature, 1.0)
    top_k = _per_row(top_k, 0, logits).long()
    filter_k = (top_k > 0) & (top_k < vocab)
    top_p = _per_row(top_p, 1.0, logits)
    filter_p = (top_p > 0) & (top_p < 1)
    if not bool((filter_k | filter_p).any()):
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    if bool(filter_k.any()):
        kth = sorted_logits.gather(-1, torch.where(filter_k, top_k, vocab) - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if bool(filter_p.any()):
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) > torch.where(filter_p, top_p, float("inf"))
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def _per_row(value: float | int | torch.Tensor | None, off: float, logits: torch.Tensor) -> torch.Tensor:
    """A setting as a (B, 1) column for `logits` (B, V): None means `off`."""
    if isinstance(value, torch.Tensor):
        return value.to(device=logits.device, dtype=torch.float32).reshape(-1, 1)
    return torch.full((logits.shape[0], 1), off if value is None else float(value), device=logits.device)


def _as_batch(input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> tuple[torch.Tensor, bool]:
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        return ids[None], True
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be 1-D (one prompt) or 2-D (batch), got shape {tuple(ids.shape)}")
    return ids, False


@torch.inference_mode()
def _decode(
    model: Llama,
    ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    seed: int | None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), max_new_tokens times (the caller stops early)."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    b, t = ids.shape
    if t == 0:
        raise ValueError("empty prompt: give at least one token (e.g. the BOS id)")
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    attention_mask = attention_mask.to(device).bool()
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()) or not bool(attention_mask[:, -1].all()):
        raise ValueError("attention_mask must be left padding: zeros first, then ones up to the last column")
    # Padding gets positions 0..p-1 and the prompt restarts at 0: two documents, so they never see each other.
    position_ids = torch.where(
        attention_mask, attention_mask.long().cumsum(dim=1) - 1, torch.arange(t, device=device).expand(b, t)
    )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(b, model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, attention_mask)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, b, t + max_new_tokens, dtype=dtype, device=device)

    logits = model(ids, position_ids=position_ids, kv_cache=cache, logits_to_keep=1).logits[:, -1]
    next_position = position_ids[:, -1:] + 1
    for step in range(max_new_tokens):
        scores = process_logits(
            logits,
            seen,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
        )
        if temperature > 0:
            token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]
        else:
            token = scores.argmax(dim=-1)
        yield token
        if step + 1 == max_new_tokens:
            return
        if seen is not None:
            seen[torch.arange(b, device=device), token] = True
        logits = model(token[:, None], position_ids=next_position, kv_cache=cache).logits[:, -1]
        next_position = next_position + 1


def generate(
    model: Llama,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_token_ids: Iterable[int] = (),
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    stop: Callable[[list[int]], bool] | None = None,
) -> list[int] | list[list[int]]:
    """The new token ids (stop token excluded) for one prompt (1-D) or a left-padded batch (2-D).

    temperature 0 is greedy; otherwise tokens are sampled after top_k / top_p filtering, reproducibly for a
    given seed. attention_mask (B, T) marks real tokens with 1 and left padding with 0. stop: a row also ends
    when stop(its new ids) is true (a stop string, which only the caller's tokenizer can see).
    """
    ids, single = _as_batch(input_ids)
    stops = set(stop_token_ids)
    outputs: list[list[int]] = [[] for _ in range(ids.shape[0])]
    finished = [False] * ids.shape[0]
    steps = _decode(
        model,
        ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    for tokens in steps:
        for row, token_id in enumerate(tokens.tolist()):
            if finished[row]:
                continue
            if token_id in stops:
                finished[row] = True
            else:
                outputs[row].append(token_id)
                finished[row] = stop is not None and stop(outputs[row])
        if all(finished):
            break
    return outputs[0] if single else outputs
