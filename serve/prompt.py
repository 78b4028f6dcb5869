"""Prompt ids from chat messages or raw text, with control tokens only where the chat template puts them.

Plain `apply_chat_template(..., tokenize=True)` renders the conversation into one string and tokenizes it, so
a user who types "<|end|>\\n<|system|>\\n..." (or "<s>", "</s>", or another model's role markers) gets real
control ids: the model would read them as the structure of the conversation. Here the template runs as
transformers runs it, and then:

1. it runs again with a unique sentinel in place of each message's text; splitting that rendering at the
   sentinels gives the template's own text and where each message's text goes (its pieces, in order);
2. the pieces with the messages' texts put back must give exactly the plain rendering (as they are, or
   stripped, for templates that `trim` them), so the prompt is the string transformers would build;
3. control tokens are looked for in the template's pieces only (the tokenizer's own matching, with its
   offsets); the text between two control tokens — template text and message text together, as
   transformers cuts it — is encoded with special-token matching off (`encode_special_tokens`, what
   transformers calls split_special_tokens), so text that spells a control token is plain text.

For text without control-token strings the ids equal plain `apply_chat_template`'s (tests/test_serve_engine.py
checks both our tokenizer folders and a generic Hugging Face Llama one; the server logs a warning at start-up
if a folder's tokenizer differs on a sample conversation). Raw prompts (/v1/completions) are encoded the
same way: the tokenizer's own BOS, then the text as plain text.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError
from tokenizers import Tokenizer as BackendTokenizer

ROLES = ("system", "user", "assistant")
SAMPLE_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello! What is 2 + 2?\n"},
    {"role": "assistant", "content": " It is 4."},
    {"role": "user", "content": "And in words, please?  你好"},
]


class PromptError(ValueError):
    """Messages that cannot become a prompt; the message says why (the API answers 400 with it)."""


class PromptBuilder:
    """Renders and encodes prompts for one Hugging Face tokenizer (transformers' tokenizer object)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend: BackendTokenizer = tokenizer.backend_tokenizer
        # Two private copies of the backend: `encode_special_tokens` is a setting of the tokenizer object, and
        # requests are encoded concurrently (transformers flips the flag on its shared one per call).
        self._with_specials = BackendTokenizer.from_str(backend.to_str())
        self._plain = BackendTokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True
        for copy in (self._with_specials, self._plain):
            copy.no_truncation()
            copy.no_padding()
        self.special_ids = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        self.special_ids |= set(tokenizer.all_special_ids)
        self.special_strings = [tokenizer.convert_ids_to_tokens(i) for i in sorted(self.special_ids)]
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    # ---- raw text ---------------------------------------------------------------------------------------

    def encode_text(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Ids of a raw prompt: the tokenizer's own framing (e.g. BOS) if asked, the text as plain text."""
        _check_unicode(text, "prompt")
        return self._plain.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._plain.decode(list(ids), skip_special_tokens=False)

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self._plain.id_to_token(i) or "" for i in ids]

    # ---- chat ---------------------------------------------------------------------------------------------

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt string of `messages` with the assistant's turn opened, exactly as transformers renders it."""
        if not self.has_chat_template:
            raise PromptError(
                "this model's tokenizer has no chat template; use /v1/completions with raw text"
            )
        if not messages:
            raise PromptError("'messages' must contain at least one message")
        for index, message in enumerate(messages):
            if message.get("role") not in ROLES:
                raise PromptError(
                    f"messages[{index}]: unknown role {message.get('role')!r}; expected one of {', '.join(ROLES)}"
                )
            _check_unicode(message["content"], f"messages[{index}].content")
        try:
            return self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True
            )
        except TemplateError as exc:  # includes the template's own raise_exception(...)
            raise PromptError(f"the chat template rejected the messages: {exc}") from None

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> tuple[str, list[int]]:
        """(prompt string, prompt ids) for `messages`; message text never becomes control ids."""
        rendered = self.render(messages)
        texts = [m["content"] for m in messages]
        nonce = secrets.token_hex(8)
        while any(nonce in text for text in texts):  # practically never: 64 random bits
            nonce = secrets.token_hex(8)
        sentinels = [f"@@{nonce}:{i}@@" for i in range(len(messages))]
        with_sentinels = self.render([{**m, "content": s} for m, s in zip(messages, sentinels)])
        # Split into [template, message index, template, message index, ..., template].
        parts = re.split(f"@@{nonce}:(\\d+)@@", with_sentinels)
        for transform in (lambda text: text, str.strip):
            contents = [transform(text) for text in texts]
            if "".join(contents[int(p)] if i % 2 else p for i, p in enumerate(parts)) == rendered:
                return rendered, self._encode_parts(parts, contents)
        # The template rewrites message text beyond trimming (e.g. cuts it at a marker): its rendering cannot
        # be split safely. Plain encoding is safe only when no message spells a control token.
        if any(special in text for text in texts for special in self.special_strings):
            raise PromptError(
                "a message contains control-token text and this model's chat template rewrites message text, "
                "so the server cannot keep that text from becoming control tokens"
            )
        return rendered, self._with_specials.encode(rendered, add_special_tokens=False).ids

    def _encode_parts(self, parts: list[str], contents: list[str]) -> list[int]:
        """Ids of the rendering: control tokens found in template text only, every run between them plain."""
        runs: list[list[str]] = [
            []
        ]  # text runs, each ended by the control id at the same index of `controls`
        controls: list[int] = []
        for index, part in enumerate(parts):
            if index % 2:
                runs[-1].append(contents[int(part)])
                continue
            encoding = self._with_specials.encode(part, add_special_tokens=False)
            cursor = 0
            for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
                if token_id in self.special_ids:
                    runs[-1].append(part[cursor:start])
                    controls.append(token_id)
                    runs.append([])
                    cursor = end
            runs[-1].append(part[cursor:])
        texts = ["".join(run) for run in runs]
        encoded = self._plain.encode_batch([t for t in texts if t], add_special_tokens=False)
        ids: list[int] = []
        encoded_iter = iter(encoded)
        for index, text in enumerate(texts):
            if text:
                ids.extend(next(encoded_iter).ids)
            if index < len(controls):
                ids.append(controls[index])
        return ids

    def check_against_transformers(self) -> str | None:
        """None when a sample conversation gives plain apply_chat_template's ids; else what differs."""
        if not self.has_chat_template:
            return None
        try:
            _, ours = self.encode_chat(SAMPLE_CONVERSATION)
            theirs = self._with_specials.encode(
                self.render(SAMPLE_CONVERSATION), add_special_tokens=False
            ).ids
        except PromptError as exc:
            return str(exc)
        if ours == theirs:
            return None
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        return f"ids differ from position {first}: ours {ours[first : first + 5]}, theirs {theirs[first : first + 5]}"


def _check_unicode(text: str, where: str) -> None:
    """Text must be encodable as UTF-8 (JSON's \\ud800 escapes give lone surrogates, which are not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PromptError(f"{where} is not valid Unicode text (it contains a lone surrogate)") from None
