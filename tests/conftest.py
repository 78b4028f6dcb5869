"""Shared pytest fixtures: where the real corpus lives and how tests skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_CORPUS = Path(os.environ.get("OPEN_LLAMA_SHARED", REPO_ROOT.parent / "shared")) / "corpus"

# Tests run on 2 CPU cores; keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_corpus() -> Path:
    """The real corpus in ../shared/corpus; tests that need it skip on a fresh clone."""
    if not (SHARED_CORPUS / "raw").is_dir():
        pytest.skip(f"real corpus not found at {SHARED_CORPUS} (present in CI, absent on a fresh clone)")
    return SHARED_CORPUS
