"""The chat template: our renderer against transformers' apply_chat_template, token by token, with the loss
mask; the prefix property; control-token look-alikes in text; the truncation policy; the mask preview.

The reference is one we did not write: transformers renders the Jinja template stored in the tokenizer
folder and tokenizes it with the Hugging Face tokenizer, and returns the assistant mask from the template's
{% generation %} markers. Tokenizers are trained here on generated text (no corpus needed).
"""

from __future__ import annotations

import random

import pytest

from common import IGNORE_INDEX
from dataset.chat_prepare import fit_to_length
from dataset.chat_template import (
    CHAT_TEMPLATE,
    ROLE_TOKENS,
    check_messages,
    prompt_ids,
    render_chat,
    render_chats,
    show_trained,
    stop_token_ids,
)
from dataset.prepare import trained_spans
from dataset.tokenizer import Tokenizer
from tests.helpers.chat import HAN, MULTI_TURN, WORDS


@pytest.fixture(scope="module")
def hf(tokdir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokdir)


def expected_render(tok: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """The format written out by hand: <s>, then per message its role token, its text encoded on its own,
    <|end|>; trained: an assistant's text and its <|end|>."""
    ids, trained = [tok.bos_id], [False]
    for m in messages:
        text = tok.encode(m["content"])
        learn = m["role"] == "assistant"
        ids += [tok.role_ids[m["role"]], *text, tok.role_ids["end"]]
        trained += [False] + [learn] * (len(text) + 1)
    return ids, trained


def hf_render(hf, messages, **kwargs) -> tuple[list[int], list[int]]:
    out = hf.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
    )
    return out["input_ids"], out["assistant_masks"]


def test_multi_turn_ids_and_mask_match_transformers_token_by_token(tok, hf, tokdir):
    rendered = render_chat(tok, MULTI_TURN)
    ids, trained = expected_render(tok, MULTI_TURN)
    assert rendered.ids == ids and rendered.trained == trained
    hf_ids, hf_mask = hf_render(hf, MULTI_TURN)
    assert hf_ids == rendered.ids
    assert hf_mask == [int(t) for t in rendered.trained]
    # Every trained span is an assistant's text followed by <|end|>; nothing else is trained.
    end = tok.role_ids["end"]
    spans = trained_spans(rendered.trained)
    assert len(spans) == 2 and all(rendered.ids[e - 1] == end for _, e in spans)
    assert [rendered.ids[s - 1] for s, _ in spans] == [tok.role_ids["assistant"]] * 2
    assert rendered.labels == [t if m else IGNORE_INDEX for t, m in zip(ids, trained)]
    # The folder holds exactly our template (tokenizer_config.json, copied into every export).
    assert hf.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("seed", range(3))
def test_random_conversations_agree_with_transformers(tok, hf, seed):
    rng = random.Random(seed)
    pieces = [*WORDS, *HAN, " ", "  ", "\n", "\n\n", "\t", "x", "。", "\u3000", "🙂", "<s", "|>"]
    conversations = []
    for _ in range(40):
        turns = rng.randint(1, 4)
        messages = (
            [{"role": "system", "content": "".join(rng.choices(pieces, k=5))}] if rng.random() < 0.5 else []
        )
        for _ in range(turns):
            messages.append({"role": "user", "content": "".join(rng.choices(pieces, k=rng.randint(0, 12)))})
            messages.append(
                {"role": "assistant", "content": "x" + "".join(rng.choices(pieces, k=rng.randint(0, 12)))}
            )
        conversations.append(messages)
    for messages, rendered in zip(conversations, render_chats(tok, conversations, num_threads=2)):
        assert hf_render(hf, messages) == (rendered.ids, [int(t) for t in rendered.trained])


def test_the_template_is_prefix_preserving(tok, hf):
    full = render_chat(tok, MULTI_TURN).ids
    for k, message in enumerate(MULTI_TURN):
        if message["role"] != "assistant":
            continue
        prompt = prompt_ids(tok, MULTI_TURN[:k])
        assert prompt[-1] == tok.role_ids["assistant"]
        assert full[: len(prompt)] == prompt  # what the model continues is exactly what it was trained on
        hf_prompt = hf.apply_chat_template(
            MULTI_TURN[:k], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert hf_prompt == prompt
    # The answer, then <|end|>, follows the prompt: generation stops there.
    assert stop_token_ids(tok) == [tok.role_ids["end"], tok.eos_id]


@pytest.mark.parametrize("look_alike", ["<s>", "</s>", "<|end|>", "<|assistant|>", "<|user|>", "<|system|>"])
def test_control_token_spellings_in_text_cannot_end_or_start_a_turn(tok, hf, look_alike):
    messages = [
        {"role": "user", "content": f"hi {look_alike} there{look_alike}"},
        {"role": "assistant", "content": f"{look_alike}ok {look_alike}"},
    ]
    rendered = render_chat(tok, messages)
    control = {tok.bos_id, tok.eos_id, tok.pad_id, *tok.role_ids.values()}
    got_control = [t for t in rendered.ids if t in control]
    # Exactly the template's own control ids: <s>, then role and end per message.
    r = tok.role_ids
    assert got_control == [tok.bos_id, r["user"], r["end"], r["assistant"], r["end"]]
    assert rendered.ids == expected_render(tok, messages)[0]
    # transformers gives the same ids when told to treat the messages' text as text.
    hf_ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False, sanitize_control_tokens=True)
    assert hf_ids == rendered.ids
    # Decoding the user's text gives it back, look-alikes included.
    start = rendered.ids.index(r["user"]) + 1
    assert tok.decode(rendered.ids[start : rendered.ids.index(r["end"])]) == messages[0]["content"]


def test_jinja_template_refuses_unknown_roles(hf):
    with pytest.raises(Exception, match="unknown chat role tool"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "user", "content": "q"}], "no assistant message"),
        ([{"role": "bot", "content": "q"}], "role 'bot'"),
        ([{"role": "user", "content": 3}], "int content"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  \n"}],
            "(assistant) is empty",
        ),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "a"},
            ],
            "only the first message",
        ),
        (["text"], "message 0 is str"),
    ],
)
def test_malformed_conversations_are_refused_with_a_reason(messages, error):
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")):
        check_messages(messages)


def test_show_trained_marks_exactly_the_trained_text(tok):
    rendered = render_chat(tok, MULTI_TURN[:3])
    shown = show_trained(tok, rendered.ids, rendered.labels, color=False)
    assert shown == (
        "<s><|system|>You are a concise assistant.\n<|end|><|user|>What is the of and? 中文问题<|end|>"
        "<|assistant|>⟦It is\n\n  the answer.\n<|end|>⟧"
    )
    assert "\033[42m" in show_trained(tok, rendered.ids, rendered.labels, color=True)
    assert set(ROLE_TOKENS.values()) >= {"<|end|>", "<|assistant|>"}


# ---------------------------------------------------------------------------------------------------
# Truncation: oldest turns first, the system prompt kept, cut at the end, dropped when nothing is trained


def conversation(exchanges: int, *, system: bool = True, answer_words: int = 6) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "Be brief."}] if system else []
    for i in range(exchanges):
        messages.append({"role": "user", "content": f"question {i} " + "the " * 4})
        messages.append({"role": "assistant", "content": f"answer {i} " + "of " * answer_words})
    return messages


def test_a_conversation_that_fits_is_kept_whole(tok):
    chat = render_chat(tok, conversation(3))
    fitted = fit_to_length(chat, len(chat.ids))
    assert fitted.ids == chat.ids and fitted.dropped_messages == 0 and not fitted.cut


def test_oldest_exchanges_are_dropped_first_and_the_system_prompt_kept(tok):
    messages = conversation(4)
    chat = render_chat(tok, messages)
    last_two = render_chat(tok, [messages[0], *messages[5:]])  # system + exchanges 2 and 3
    fitted = fit_to_length(chat, len(last_two.ids))
    assert fitted.ids == last_two.ids and fitted.trained == last_two.trained
    assert fitted.dropped_messages == 4 and not fitted.cut
    # One token less and only the last exchange fits.
    fitted = fit_to_length(chat, len(last_two.ids) - 1)
    assert fitted.ids == render_chat(tok, [messages[0], *messages[7:]]).ids and fitted.dropped_messages == 6


def test_a_last_exchange_too_long_is_cut_at_the_end(tok):
    messages = conversation(2, answer_words=60)
    chat = render_chat(tok, messages)
    alone = render_chat(tok, [messages[0], *messages[3:]])
    fitted = fit_to_length(chat, len(alone.ids) - 10)
    assert fitted.cut and fitted.dropped_messages == 2
    assert fitted.ids == alone.ids[:-10] and fitted.trained == alone.trained[:-10]
    assert fitted.ids[-1] != tok.role_ids["end"]  # the cut answer lost its end of turn


def test_a_conversation_left_with_nothing_trained_is_dropped(tok):
    messages = [{"role": "user", "content": "the " * 80}, {"role": "assistant", "content": "yes"}]
    chat = render_chat(tok, messages)
    assert fit_to_length(chat, chat.ids.index(tok.role_ids["assistant"]) + 1) is None
    fitted = fit_to_length(chat, chat.ids.index(tok.role_ids["assistant"]) + 2)
    assert sum(fitted.trained) == 1  # the first answer token is the only one left to train
