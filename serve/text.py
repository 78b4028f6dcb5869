"""Generated token ids to streamed text: never half a character, never the start of a stop string.

A token can hold part of a character (byte-fallback pieces, byte-level BPE: a Chinese character is often
three tokens), and a stop string can arrive split over several tokens. `TextStream` turns ids into text
deltas that are safe to send at once:

- decoding: each new token's text is the difference between two decodes of a short window (the text-generation-
  inference / vLLM way), so a tokenizer that strips the first space of a decode, or merges bytes into a
  character, gives the same text as decoding everything at the end; a window whose text ends in U+FFFD (an
  incomplete character) is held until the character is complete;
- stop strings: text that could still become the start of a stop string is held back; once one appears, the
  text before it is the last delta and the stop string itself is never sent (OpenAI's behaviour).

Streamed deltas joined are exactly the non-streamed text: both are built from the same deltas.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer as BackendTokenizer

INCOMPLETE = "\ufffd"


class TextStream:
    """Text deltas of one reply, token by token (see the module docstring)."""

    def __init__(self, tokenizer: BackendTokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self._prefix_offset = 0  # the window decoded for context starts here...
        self._read_offset = 0  # ...and its text up to here has been handed on
        self._held = ""  # decoded text not yet sent: it may be the start of a stop string
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Text to send after `token_id` ("" while a character or a possible stop string is incomplete)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(INCOMPLETE):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return self._release(new_text[len(prefix_text) :])

    def finish(self) -> str:
        """The rest of the text at the end of the reply (an incomplete character stays U+FFFD)."""
        if self.stopped:
            return ""
        rest = ""
        if self._read_offset < len(self.ids):
            prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
            rest = self._decode(self.ids[self._prefix_offset :])[len(prefix_text) :]
            self._read_offset = len(self.ids)
        text = self._release(rest)
        if not self.stopped:  # nothing more can complete a stop string
            text, self._held = text + self._held, ""
        return text

    def _release(self, delta: str) -> str:
        """Add decoded text; return what is safe to send now."""
        text = self._held + delta
        if not self.stop:
            self._held = ""
            return text
        found = [(text.find(s), s) for s in self.stop if s in text]
        if found:
            self.stopped = True
            self._held = ""
            return text[: min(found)[0]]
        keep = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]
