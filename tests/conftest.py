"""Shared pytest set-up: where the real corpus lives and how tests skip without it; Triton's interpreter; the
fixtures that several test modules use. Plain functions that build test data are in tests/helpers/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.triton_interpreter import teach_tritons_interpreter_liger

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_CORPUS = Path(os.environ.get("OPEN_LLAMA_SHARED", REPO_ROOT.parent / "shared")) / "corpus"

# Tests run on 2 CPU cores; keep torch from oversubscribing them. Set before anything imports torch, so
# the fixtures below import the project (and torch) when they run.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


if os.environ.get("TRITON_INTERPRET") == "1":
    teach_tritons_interpreter_liger()


@pytest.fixture(scope="session")
def shared_corpus() -> Path:
    """The real corpus in ../shared/corpus; tests that need it skip on a fresh clone."""
    if not (SHARED_CORPUS / "raw").is_dir():
        pytest.skip(f"real corpus not found at {SHARED_CORPUS} (present in CI, absent on a fresh clone)")
    return SHARED_CORPUS


@pytest.fixture(scope="session")
def tiny_model_config():
    """The tiny Llama shape as a factory: `tiny_model_config(n_layers=1)` (tests/helpers/model.py)."""
    from tests.helpers.model import tiny_model_config

    return tiny_model_config


@pytest.fixture(scope="session")
def tokdir(tmp_path_factory) -> Path:
    """A chat tokenizer (700 pieces, chat template) trained on generated English, Chinese and code."""
    from tests.helpers.chat import generated_texts, train_chat_tokenizer

    return train_chat_tokenizer(tmp_path_factory.mktemp("chat_tok"), generated_texts(600), 700)


@pytest.fixture(scope="session")
def tok(tokdir):
    from dataset.tokenizer import Tokenizer

    return Tokenizer.load(tokdir)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    from tests.helpers.shards import synthetic_texts, write_shard

    folder = tmp_path_factory.mktemp("synthetic_shards")
    texts = synthetic_texts(900)
    write_shard(folder / "part-test-0.jsonl.zst", texts[:450])
    write_shard(folder / "part-test-1.jsonl.zst", texts[450:])
    return folder


@pytest.fixture(scope="session")
def synthetic_tokdir(synthetic_shards, tmp_path_factory) -> Path:
    """A tiny tokenizer trained on generated text: runs without the shared corpus."""
    from dataset.train_tokenizer import train_tokenizer

    return train_tokenizer(str(synthetic_shards / "*.jsonl.zst"), 800, tmp_path_factory.mktemp("tok") / "syn")


@pytest.fixture(scope="module")
def real_data(shared_corpus, tmp_path_factory) -> dict[str, Path]:
    """Four small shards of real English text and code (The Pile sample) plus a 512-token tokenizer; per
    module, since the training tests write their reference run under its root."""
    from data.shard_io import iter_shard_records
    from dataset.train_tokenizer import train_tokenizer
    from tests.helpers.shards import write_shard

    root = tmp_path_factory.mktemp("train_data")
    shards = root / "shards"
    shards.mkdir()
    texts = []
    for record in iter_shard_records(shared_corpus / "raw" / "pile" / "00.jsonl.zst"):
        texts.append(record["text"][:1500])
        if len(texts) == 240:
            break
    for i in range(4):
        write_shard(shards / f"part-pile-{i:05d}.jsonl.zst", texts[i::4], "pile")
    tokdir = train_tokenizer([str(shards / "*.jsonl.zst")], 512, root / "tok")
    return {"shards": shards, "tokenizer": tokdir, "root": root}


@pytest.fixture(scope="module")
def our_folder(tmp_path_factory) -> Path:
    """Our own Hugging Face folder (tests/helpers/serve.py), per module: the serving tests start engines on it."""
    from tests.helpers.serve import build_our_folder

    return build_our_folder(tmp_path_factory.mktemp("ours"))
