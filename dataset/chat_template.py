"""The chat format, in one place: the role tokens, the Jinja template written into every tokenizer folder,
and our own renderer of a conversation into token ids and a loss mask in one pass.

A conversation is rendered as

    <s><|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{reply}<|end|><|user|>...

where `<s>`, `<|system|>`, `<|user|>`, `<|assistant|>` and `<|end|>` are control tokens: single ids that
text can never produce (`Tokenizer.encode` encodes their spellings as plain text). A prompt for generation
ends with `<|assistant|>`; the model answers and closes its turn with `<|end|>`, the stop token.

Why nothing (no newline) stands between a role token and its text: our renderer encodes every message's
text on its own, between control ids, while Hugging Face's `apply_chat_template` renders one string and
encodes the text between control tokens as a whole. A newline after `<|user|>` would be encoded together
with the text after it, and SentencePiece merges whitespace with what follows ("\\n" + " x" is not
"\\n" then " x": whitespace-only pieces exist), so the two renderers could differ, and a generation prompt
ending in "\\n" would not be a token prefix of the rendered answer. With the text alone between two control
tokens, both renderers encode exactly the same strings and agree token for token; the template is
prefix-preserving at the token level (the first k turns plus `<|assistant|>` are a prefix of the whole
conversation).

The loss mask: every assistant turn's text **and its `<|end|>`** are trained (a model that never learns
`<|end|>` never stops); `<s>`, role tokens, system and user text never are. In the Jinja template the
trained part sits inside `{% generation %}` ... `{% endgeneration %}`, so transformers'
`apply_chat_template(..., return_assistant_tokens_mask=True)` returns our mask.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from common import IGNORE_INDEX

# Role name (as in {"role": ..., "content": ...} messages) -> control token. "end" closes every turn.
ROLE_TOKENS: dict[str, str] = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end": "<|end|>",
}
ROLES = ("system", "user", "assistant")
END = ROLE_TOKENS["end"]


def _jinja_template() -> str:
    """The template, built from ROLE_TOKENS. Each role token is written as a literal (never assembled from
    the message's role), so `apply_chat_template(..., sanitize_control_tokens=True)` can tell the template's
    control tokens from look-alikes in the messages."""
    parts = ["{{ bos_token }}{% for message in messages %}"]
    for index, role in enumerate(ROLES):
        keyword = "if" if index == 0 else "elif"
        parts.append(f"{{% {keyword} message['role'] == '{role}' %}}{{{{ '{ROLE_TOKENS[role]}' }}}}")
        content = f"{{{{ message['content'] + '{END}' }}}}"
        # The assistant's text and its end token are what the model learns to produce.
        parts.append(f"{{% generation %}}{content}{{% endgeneration %}}" if role == "assistant" else content)
    parts.append(
        "{% else %}{{ raise_exception('unknown chat role ' ~ message['role'] ~ "
        "'; expected system, user or assistant') }}{% endif %}{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '{ROLE_TOKENS['assistant']}' }}}}{{% endif %}}"
    )
    return "".join(parts)


CHAT_TEMPLATE = _jinja_template()


class ChatTokenizer(Protocol):
    """What rendering needs from `dataset.tokenizer.Tokenizer`."""

    bos_id: int
    eos_id: int
    role_ids: dict[str, int]

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = False, eos: bool = False, num_threads: int = 1
    ) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def id_to_piece(self, token_id: int) -> str: ...


def check_messages(messages: Any) -> list[dict[str, str]]:
    """`messages` as a list of {"role", "content"} dicts, or a ValueError saying what is wrong.

    A conversation is a non-empty list of messages with a role of ROLES and string content; a system
    message may only come first; there is at least one assistant message (what is trained), and none is
    blank. Extra keys of a message are dropped.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation must be a non-empty list of messages")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {index} is {type(message).__name__}, not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {index} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {index} ({role}) has {type(content).__name__} content, not a string")
        if role == "system" and index:
            raise ValueError(f"message {index} is a system message; only the first message may be one")
        checked.append({"role": role, "content": content})
        if role == "assistant" and not content.strip():
            # An empty answer would teach the model to end its turn at once.
            raise ValueError(f"message {index} (assistant) is empty")
    if not any(m["role"] == "assistant" for m in checked):
        raise ValueError("no assistant message: nothing to train on")
    return checked


@dataclass
class RenderedChat:
    """A conversation as token ids with the loss mask, and where each message starts."""

    ids: list[int]
    trained: list[bool]
    """True on the tokens the model learns: assistant text and the `<|end|>` closing it."""
    roles: list[str]
    """The role of each message."""
    starts: list[int]
    """Index in `ids` of each message's role token (the generation prompt's is not listed)."""

    @property
    def labels(self) -> list[int]:
        """The token ids where trained, IGNORE_INDEX elsewhere (unshifted, the Hugging Face convention)."""
        return [t if keep else IGNORE_INDEX for t, keep in zip(self.ids, self.trained)]

    @property
    def num_trained(self) -> int:
        return sum(self.trained)


def render_chats(
    tokenizer: ChatTokenizer,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    *,
    add_generation_prompt: bool = False,
    num_threads: int = 1,
) -> list[RenderedChat]:
    """Render checked conversations (see `check_messages`) into ids and loss masks, segment by segment.

    Control ids come from here only; every message's text is encoded on its own as plain text (all texts
    of the batch in one `encode_batch` call, `num_threads` SentencePiece threads).
    """
    texts = [message["content"] for messages in conversations for message in messages]
    encoded = iter(tokenizer.encode_batch(texts, num_threads=num_threads) if texts else [])
    end_id = tokenizer.role_ids["end"]
    rendered = []
    for messages in conversations:
        ids, trained, roles, starts = [tokenizer.bos_id], [False], [], []
        for message in messages:
            role = message["role"]
            text_ids = next(encoded)
            learn = role == "assistant"
            roles.append(role)
            starts.append(len(ids))
            ids += [tokenizer.role_ids[role], *text_ids, end_id]
            trained += [False] + [learn] * (len(text_ids) + 1)
        if add_generation_prompt:
            ids.append(tokenizer.role_ids["assistant"])
            trained.append(False)
        rendered.append(RenderedChat(ids, trained, roles, starts))
    return rendered


def render_chat(
    tokenizer: ChatTokenizer, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False
) -> RenderedChat:
    """One conversation's ids and loss mask (see `render_chats`)."""
    return render_chats(tokenizer, [messages], add_generation_prompt=add_generation_prompt)[0]


def prompt_ids(tokenizer: ChatTokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The ids a chat model continues: the conversation so far, then `<|assistant|>`."""
    return render_chat(tokenizer, messages, add_generation_prompt=True).ids


def stop_token_ids(tokenizer: ChatTokenizer) -> list[int]:
    """Generation stops at `<|end|>` (the end of the assistant's turn) or `</s>`."""
    return [tokenizer.role_ids["end"], tokenizer.eos_id]


# ---------------------------------------------------------------------------------------------------
# Showing the mask


def show_trained(
    tokenizer: ChatTokenizer, ids: Sequence[int], labels: Sequence[int], *, color: bool | None = None
) -> str:
    """The tokens as text with the trained ones marked: green on a terminal, else between ⟦ and ⟧.

    Control tokens are shown by name (`<|user|>`), so the whole format is visible. A trained token is one
    whose label is not IGNORE_INDEX.
    """
    if color is None:
        color = sys.stdout.isatty()
    opening, closing = ("\033[42m\033[30m", "\033[0m") if color else ("⟦", "⟧")
    control = {tokenizer.bos_id, *tokenizer.role_ids.values()}
    for name in ("eos_id", "pad_id"):
        if hasattr(tokenizer, name):
            control.add(getattr(tokenizer, name))
    out: list[str] = []
    run: list[int] = []
    run_trained = False

    def flush() -> None:
        if run:
            out.append(tokenizer.decode(run))
            run.clear()

    for token, label in zip(ids, labels):
        trained = label != IGNORE_INDEX
        if trained != run_trained:
            flush()
            out.append(opening if trained else closing)
            run_trained = trained
        if token in control:
            flush()
            out.append(tokenizer.id_to_piece(token))
        else:
            run.append(int(token))
    flush()
    if run_trained:
        out.append(closing)
    return "".join(out)
