"""The held-out split every stream uses (pretraining text, conversations, preference pairs).

Which documents are held out is decided by a hash of each one's text, the same on every machine and in
every run, so training and validation split a corpus without a list of documents and never overlap.
"""

from __future__ import annotations

import hashlib

from jsonargparse.typing import restricted_number_type

HeldOutFraction = restricted_number_type(None, float, [(">=", 0), ("<", 1)])
"""The type of a config's `validation_fraction`: a fraction in [0, 1)."""


def is_held_out(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out fraction: a hash of its text, the same on every machine."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2.0**64
