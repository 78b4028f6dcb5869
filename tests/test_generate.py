"""Generation: the KV cache changes nothing, logits processing matches transformers' processors, batches with
left padding equal their prompts run alone, seeds reproduce, stop tokens stop."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from models.generate import generate, process_logits
from models.llama import Llama

VOCAB = 101


@pytest.fixture(scope="module")
def model(tiny_model_config) -> Llama:
    torch.manual_seed(0)
    config = tiny_model_config(vocab_size=VOCAB, stable_embedding=True, tie_embeddings=True)
    return Llama(config).eval()


def uncached_greedy(model: Llama, prompt: list[int], n: int) -> list[int]:
    """Reference: rerun the whole sequence every step, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_cached_greedy_equals_uncached_greedy(model):
    prompt = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    want = uncached_greedy(model, prompt, 30)
    assert generate(model, prompt, max_new_tokens=30) == want


def test_left_padded_batch_equals_prompts_alone(model):
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (8, 3, 5)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = generate(model, ids, attention_mask=mask, max_new_tokens=12)
    assert batch == [uncached_greedy(model, p, 12) for p in prompts]


def test_stop_tokens_end_generation_and_are_not_returned(model):
    prompt = [5, 6, 7]
    free = generate(model, prompt, max_new_tokens=20)
    stop = free[4]
    first = free.index(stop)
    assert generate(model, prompt, max_new_tokens=20, stop_token_ids=[stop]) == free[:first]


def test_sampling_is_reproducible_with_a_seed_and_varies_without(model):
    kwargs = {"max_new_tokens": 20, "temperature": 1.0, "top_k": 50, "top_p": 0.95}
    a = generate(model, [1, 2, 3], seed=7, **kwargs)
    assert a == generate(model, [1, 2, 3], seed=7, **kwargs)
    others = [generate(model, [1, 2, 3], seed=s, **kwargs) for s in range(8, 12)]
    assert any(o != a for o in others)
    assert all(0 <= t < VOCAB for t in a)
    # top_k=1 leaves one candidate: sampling becomes greedy.
    assert generate(model, [1, 2, 3], max_new_tokens=10, temperature=1.0, top_k=1, seed=0) == generate(
        model, [1, 2, 3], max_new_tokens=10
    )


def test_logits_processing_matches_transformers():
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB) * 3
    history = torch.randint(0, VOCAB, (3, 12))
    seen = torch.zeros(3, VOCAB, dtype=torch.bool).scatter_(1, history, True)
    ours = process_logits(logits, seen, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        theirs = warper(history, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(ours)
    assert torch.allclose(ours[finite], theirs[finite], atol=1e-5)


def test_repetition_penalty_discourages_repeats(model):
    plain = generate(model, [4, 4, 4, 4], max_new_tokens=24)
    penalised = generate(model, [4, 4, 4, 4], max_new_tokens=24, repetition_penalty=5.0)
    assert len(set(penalised)) > len(set(plain))


def test_bad_inputs_are_clear_errors(model):
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [], max_new_tokens=3)
    with pytest.raises(ValueError, match="left padding"):
        generate(model, torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 0]]))
