"""Generative tasks (`gsm8k:generate`): the model writes its answer, greedily, and the final number is matched
exactly against the gold answer.

- **Prompt**: the request's context (GSM8K: eight solved problems as `Question: ...\\nAnswer: ... So the
  answer is N.` and then the problem, ending in `Answer:`). For a tokenizer with a chat template the whole
  context is the user's turn, rendered by the template with the assistant's turn opened; otherwise it is
  `<s>` + the context, as the log-likelihood requests are encoded. The prompt keeps its last
  `max_len - max_new_tokens` tokens, `max_new_tokens` being the task's `max_gen_toks` (512) but at most half
  the model's window.
- **Generation**: greedy (models/generate.py), in batches of `--batch-size` prompts sorted longest first;
  it ends at a stop id (`TextEncoder.stop_ids`: `</s>`, the chat end-of-turn token) or at the first of the
  task's stop sequences (GSM8K: `Question:`, `</s>`, `<|im_end|>`, a blank line), where the text is cut.
- **Answer** (`final_answer`): the number after the last `#### ` when the text has one (GSM8K's own answer
  line, lm-evaluation-harness's strict match), else the last number in the text, with commas between digits
  removed (oe-eval's GSM8K `_extract_answer`, the rule behind OLMES's GSM8K figures); the whole text when it
  has no number.
- **Exact match** (`exact_match`): the answer and the gold (the request's label, "18") are equal after the
  task's `regexes_to_ignore` are deleted from both (GSM8K: commas, `$`, anything up to `#### `, a final `.`),
  as lm-evaluation-harness's and oe-eval's `exact_match` do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from evaluation.encoding import TextEncoder
from evaluation.tasks import Generation
from models.generate import generate
from models.llama import Llama

NUMBER = re.compile(r"[-+]?(?:\d*\.\d+|\d+)")
r"""A number: a decimal (`.5`, `3.25`) or an integer, optionally signed (oe-eval's `[-+]?\d*\.\d+|\d+` signs
decimals only, so it reads "-12" as "12" and never matches a negative integer answer)."""
ANSWER_LINE = "#### "


def final_answer(text: str) -> str:
    """The answer a generation gives (module docstring): after the last `#### `, else its last number."""
    if ANSWER_LINE in text:
        text = text.rsplit(ANSWER_LINE, 1)[1]
        numbers = NUMBER.findall(re.sub(r"(\d),(\d)", r"\1\2", text))
        return numbers[0] if numbers else text.strip()
    text = re.sub(r"(\d),(\d)", r"\1\2", text)
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else text.strip()


def exact_match(answer: str, gold: str, regexes_to_ignore: Sequence[str]) -> bool:
    """Whether `answer` equals `gold` once every regex of `regexes_to_ignore` is deleted from both."""
    for pattern in regexes_to_ignore:
        answer, gold = re.sub(pattern, "", answer), re.sub(pattern, "", gold)
    return answer.strip() == gold.strip()


def cut_at_stop(text: str, stop_sequences: Sequence[str]) -> str:
    """`text` up to the first of `stop_sequences` it contains."""
    cut = min((i for i in (text.find(s) for s in stop_sequences if s) if i >= 0), default=len(text))
    return text[:cut]


@torch.inference_mode()
def generate_texts(
    model: Llama,
    encoder: TextEncoder,
    contexts: Sequence[str],
    generation: Generation,
    *,
    batch_size: int = 16,
) -> list[str]:
    """Each context's greedy generation as text, cut at the first stop sequence (module docstring)."""
    max_len = model.config.max_seq_len
    max_new = max(1, min(generation.max_new_tokens, max_len // 2))
    prompts = [encoder.prompt(context)[-(max_len - max_new) :] for context in contexts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # stable: ties in task order
    stops = generation.stop_sequences

    def stopped(ids: list[int]) -> bool:
        text = encoder.decode(ids)
        return any(s and s in text for s in stops)

    texts = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for row, index in enumerate(rows):
            prompt = prompts[index]
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        outputs = generate(
            model,
            ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            temperature=0.0,
            stop_token_ids=encoder.stop_ids,
            stop=stopped if stops else None,
        )
        for index, new_ids in zip(rows, outputs):
            texts[index] = cut_at_stop(encoder.decode(new_ids), stops)
    return texts
