"""Text generation with a static KV cache: greedy or sampled (temperature, top-k, top-p), repetition penalty,
stop tokens, a seed, batches of left-padded prompts, and a streaming iterator for servers.

The prompt is run once (prefill) into a KV cache allocated for prompt + max_new_tokens positions; every later
step feeds only the newest token. Left padding is handled as a document of its own (see Llama.forward): the
padding never attends to, or is attended by, the prompt, and the prompt's positions start at 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from models.llama import KVCache, Llama


def process_logits(
    logits: torch.Tensor,
    seen: torch.Tensor | None,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
) -> torch.Tensor:
    """Next-token scores (B, V) after repetition penalty, temperature, top-k and top-p, in that order."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        # CTRL (Keskar et al. 2019): make every token already in the row less likely, whatever its sign.
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature > 0:
        logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) > top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


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


def stream_generate(
    model: Llama,
    input_ids: torch.Tensor | Sequence[int],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_token_ids: Iterable[int] = (),
    seed: int | None = None,
) -> Iterator[int]:
    """Yield new token ids of one prompt as they are produced; stops after a stop token (not yielded)."""
    ids, single = _as_batch(input_ids)
    if not single and ids.shape[0] != 1:
        raise ValueError("stream_generate takes one prompt; use generate() for a batch")
    stops = set(stop_token_ids)
    steps = _decode(
        model,
        ids,
        None,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    for token in steps:
        token_id = int(token[0])
        if token_id in stops:
            return
        yield token_id


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
) -> list[int] | list[list[int]]:
    """The new token ids (stop token excluded) for one prompt (1-D) or a left-padded batch (2-D).

    temperature 0 is greedy; otherwise tokens are sampled after top_k / top_p filtering, reproducibly for a
    given seed. attention_mask (B, T) marks real tokens with 1 and left padding with 0.
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
        if all(finished):
            break
    return outputs[0] if single else outputs
