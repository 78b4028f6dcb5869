"""Tokenizer: training from shards, exact Hugging Face parity, lossless round trip, safe control tokens.

The references are ones we did not write: SentencePiece's own processor and transformers' AutoTokenizer.
Tokenizers are trained inside the tests (about a second each).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dataset.train_tokenizer as train_tokenizer_module
from data.shard_io import iter_shard_texts
from dataset.chat_template import ROLE_TOKENS
from dataset.tokenizer import BOS, EOS, PAD, UNK, WS_MARKER, Tokenizer
from dataset.train_tokenizer import (
    SUMMARY_FILE,
    BoundedSample,
    draw_sample,
    main,
    train_tokenizer,
)
from tests.helpers.shards import synthetic_texts, write_shard

REPO_ROOT = Path(__file__).resolve().parent.parent
CONTROL_STRINGS = [BOS, EOS, PAD, UNK, *ROLE_TOKENS.values()]
TRICKY_TEXTS = [
    "Hello, world!  Two spaces,   three, \t\ttabs\tand\n\n\nnewlines.\n",
    "    def f(x):\n\treturn x  # indented with spaces and a tab\r\n",
    "中文文本，混合English与数字12345和标点。",
    "emoji 😀👍🏽🇫🇷 and ZWJ 👩‍👩‍👧 sequences",
    "control \x00\x01\x07\x1b[31m\x7f chars and \u200b zero width \ufeff BOM",
    "   leading and trailing spaces   ",
    "\n",
    " ",
    "",
    "3.14159 + 2e-10 = 0x1F",
    "ｆｕｌｌｗｉｄｔｈ and ½ ligature ﬁ",
    "Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト",
    "<s> </s> <pad> <unk> <|user|> <|assistant|> <|system|> <|end|> <0x41> <<s>>",
]


def read_wudao(path: Path) -> list[str]:
    return [r["title"] + "\n" + r["content"] for r in json.loads(path.read_text(encoding="utf-8"))]


@pytest.fixture(scope="session")
def corpus_tokdir(shared_corpus, tmp_path_factory) -> Path:
    """Trained on pile/00 and wudao/part-0; the parity test uses the other files."""
    folder = tmp_path_factory.mktemp("corpus_shards")
    pile = list(iter_shard_texts([shared_corpus / "raw/pile/00.jsonl.zst"]))
    write_shard(folder / "part-pile-0.jsonl.zst", pile)
    write_shard(folder / "part-wudao-0.jsonl.zst", read_wudao(shared_corpus / "raw/wudao/part-0.json"))
    return train_tokenizer(
        [str(folder / "*.jsonl.zst")], 8000, tmp_path_factory.mktemp("tok") / "corpus", sample_bytes=6 << 20
    )


@pytest.fixture(scope="session")
def heldout_corpus_texts(shared_corpus) -> list[str]:
    """Real documents the corpus tokenizer was not trained on: English prose, code, docs, Chinese."""
    texts = list(iter_shard_texts([shared_corpus / "raw/pile/01.jsonl.zst"]))[:500]
    texts += read_wudao(shared_corpus / "raw/wudao/part-1.json")[:1000]
    return texts


def load_hf(tokdir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokdir)


def sp_processor(tokdir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tokdir / "tokenizer.model"))


# --- Hugging Face parity ---------------------------------------------------------------------------------


def test_autotokenizer_matches_sentencepiece_on_real_text(corpus_tokdir, heldout_corpus_texts):
    texts = heldout_corpus_texts
    assert len(texts) >= 1000
    hf = load_hf(corpus_tokdir)
    assert hf.is_fast and len(hf) == sp_processor(corpus_tokdir).get_piece_size() == 8000
    expected = sp_processor(corpus_tokdir).encode(texts)
    got = hf(texts, add_special_tokens=False)["input_ids"]
    mismatches = [i for i, (e, g) in enumerate(zip(expected, got)) if e != g]
    assert not mismatches, f"{len(mismatches)} texts differ, first: {texts[mismatches[0]][:200]!r}"
    tok = Tokenizer.load(corpus_tokdir)
    assert tok.encode_batch(texts, num_threads=2) == expected
    # HF's safe mode for untrusted text gives the same ids, with or without control-token strings.
    few = texts[:100] + TRICKY_TEXTS
    assert hf(few, add_special_tokens=False, split_special_tokens=True)["input_ids"] == sp_processor(
        corpus_tokdir
    ).encode(few)
    # Decoding gives the documents back, on both sides.
    assert hf.batch_decode(got[:300]) == texts[:300]
    assert [tok.decode(ids) for ids in expected] == texts


def test_heldout_compression_report_per_script(corpus_tokdir):
    summary = json.loads((corpus_tokdir / SUMMARY_FILE).read_text())
    report = summary["heldout_compression"]
    assert {"latin", "han", "all"} <= set(report)
    # Chinese packs more bytes per character than English, and BPE merges several Latin letters per token.
    assert report["latin"]["chars_per_token"] > 2.5 > report["han"]["chars_per_token"] > 1.0
    assert summary["documents_sampled"] > 0 and summary["bytes_sampled"] <= 6 << 20
    assert summary["peak_rss_bytes"] > 0


def test_autotokenizer_matches_on_tricky_text(synthetic_tokdir):
    hf = load_hf(synthetic_tokdir)
    tok = Tokenizer.load(synthetic_tokdir)
    expected = sp_processor(synthetic_tokdir).encode(TRICKY_TEXTS)
    assert hf(TRICKY_TEXTS, add_special_tokens=False, split_special_tokens=True)["input_ids"] == expected
    assert tok.encode_batch(TRICKY_TEXTS) == expected
    for text, ids in zip(TRICKY_TEXTS, expected):
        assert hf.decode(ids) == text == tok.decode(ids)
    # Like Llama, the HF tokenizer starts a text with <s>; our encode does when asked.
    assert hf("hello world")["input_ids"] == tok.encode("hello world", bos=True)


def test_hf_files_and_special_tokens(synthetic_tokdir):
    files = {p.name for p in synthetic_tokdir.iterdir()}
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= files
    config = json.loads((synthetic_tokdir / "tokenizer_config.json").read_text())
    assert config["chat_template"] and config["model_max_length"] == 2048
    hf = load_hf(synthetic_tokdir)
    tok = Tokenizer.load(synthetic_tokdir)
    assert (
        (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id)
        == (
            tok.bos_id,
            tok.eos_id,
            tok.pad_id,
            tok.unk_id,
        )
        == (1, 2, 3, 0)
    )
    assert {role: hf.convert_tokens_to_ids(t) for role, t in ROLE_TOKENS.items()} == tok.role_ids
    assert hf.model_max_length == 2048


# --- control tokens stay safe ----------------------------------------------------------------------------


def test_control_token_strings_are_plain_text(synthetic_tokdir):
    tok = Tokenizer.load(synthetic_tokdir)
    hf = load_hf(synthetic_tokdir)
    sp = sp_processor(synthetic_tokdir)
    control_ids = {sp.piece_to_id(s) for s in CONTROL_STRINGS}
    assert len(control_ids) == len(CONTROL_STRINGS)
    for token in CONTROL_STRINGS:
        text = f"user text {token} more{token}"
        ids = tok.encode(text)
        assert not control_ids & set(ids), token
        assert (
            ids
            == sp.encode(text)
            == hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        )
        assert tok.decode(ids) == text
        # HF's default parses special-token strings: this is why untrusted text needs split_special_tokens.
        assert hf.convert_tokens_to_ids(token) in hf(text, add_special_tokens=False)["input_ids"]
    assert tok.encode("x", bos=True, eos=True) == [tok.bos_id, *tok.encode("x"), tok.eos_id]
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.role_ids["user"], tok.pad_id, tok.eos_id]) == "hi"


def test_chat_template_renders_role_tokens(synthetic_tokdir):
    hf = load_hf(synthetic_tokdir)
    tok = Tokenizer.load(synthetic_tokdir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say <|end|> please"}]
    ids = hf.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False, sanitize_control_tokens=True
    )
    r = tok.role_ids
    # The full format, token for token, is tested in tests/test_chat_template.py.
    assert ids[:2] == [tok.bos_id, r["system"]] and ids[-1] == r["assistant"]
    assert ids.count(r["end"]) == 2  # the user's "<|end|>" stays text
    assert hf.decode(ids, skip_special_tokens=True) == "Be brief.Say <|end|> please"
    with pytest.raises(Exception, match="unknown chat role"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# --- lossless round trip (property tests) ----------------------------------------------------------------

WHITESPACE = st.sampled_from([" ", "  ", "\t", "\n", "\r\n", "\u3000", "\xa0", "\x00", "\x0b", "\x1f"])
CONTROLS = st.sampled_from(CONTROL_STRINGS)
TEXT = st.lists(
    st.one_of(st.text(max_size=12), WHITESPACE, CONTROLS, st.text("ab 中文\t\n", max_size=8)), max_size=12
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=TEXT)
def test_round_trip_any_unicode(synthetic_tokdir, pieces):
    text = "".join(pieces)
    tok = _cached(Tokenizer.load, synthetic_tokdir)
    hf = _cached(load_hf, synthetic_tokdir)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, text[:3]]) == [ids, tok.encode(text[:3])]
    if WS_MARKER not in text:
        # U+2581 is SentencePiece's space marker: the HF tokenizer (like every SentencePiece tokenizer) reads it
        # as a space, while our encode keeps it as bytes (tested below).
        hf_ids = hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert hf_ids == ids
        assert hf.decode(hf_ids) == text


def test_round_trip_space_marker(synthetic_tokdir):
    tok = Tokenizer.load(synthetic_tokdir)
    for text in [WS_MARKER, f"a{WS_MARKER}b", f" {WS_MARKER}{WS_MARKER} x{WS_MARKER}", "▁▂▃▄▅▆▇█"]:
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode_batch([text]) == [tok.encode(text)]
    # The text around the marker is encoded as it would be on its own.
    assert tok.encode(f"hello{WS_MARKER}world") == [
        *tok.encode("hello"),
        *[tok.sp.piece_to_id(f"<0x{b:02X}>") for b in WS_MARKER.encode()],
        *tok.encode("world"),
    ]


_CACHE: dict = {}


def _cached(factory, path):
    key = (factory, path)
    if key not in _CACHE:
        _CACHE[key] = factory(path)
    return _CACHE[key]


def test_tokenizer_pickles_for_dataloader_workers(synthetic_tokdir):
    tok = Tokenizer.load(synthetic_tokdir)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(TRICKY_TEXTS[0]) == tok.encode(TRICKY_TEXTS[0]) and clone.role_ids == tok.role_ids


# --- training: sampling, determinism, memory, options, errors ---------------------------------------------


def test_bounded_sample_is_uniform_and_within_budget():
    n, k, trials = 20, 5, 2000
    hits = [0] * n
    for seed in range(trials):
        rng = random.Random(seed)
        sample = BoundedSample(max_bytes=10**9, max_items=k)
        for i in range(n):
            sample.offer(rng.random(), bytes([i]))
        items = sample.items()
        assert len(items) == k
        for item in items:
            hits[item[0]] += 1
    expected = trials * k / n  # 500; binomial sd ~19
    assert all(abs(h - expected) < 100 for h in hits), hits
    sample = BoundedSample(max_bytes=1000)
    for _ in range(100):
        sample.offer(random.random(), b"x" * 37)
    assert sample.bytes <= 1000 and len(sample) == 1000 // 37


def test_training_is_deterministic_for_a_seed(synthetic_shards, synthetic_tokdir, tmp_path):
    pattern = str(synthetic_shards / "*.jsonl.zst")
    again = train_tokenizer(pattern, 800, tmp_path / "again")
    for name in ("tokenizer.model", "tokenizer.json"):
        assert (again / name).read_bytes() == (synthetic_tokdir / name).read_bytes()
    # A different seed draws a different sample when the sample is smaller than the input.
    paths = sorted(synthetic_shards.glob("*.jsonl.zst"))
    kwargs = {
        "sample_bytes": 100_000,
        "sample_documents": None,
        "heldout_fraction": 0.1,
        "heldout_bytes": 50_000,
    }
    first, same = draw_sample(paths, seed=1, **kwargs), draw_sample(paths, seed=1, **kwargs)
    other = draw_sample(paths, seed=2, **kwargs)
    assert first.train == same.train and first.heldout == same.heldout
    assert first.train != other.train
    assert sum(map(len, first.train)) <= 100_000 and not set(first.train) & set(first.heldout)


def test_retraining_replaces_the_folder_atomically(synthetic_shards, tmp_path):
    out = tmp_path / "tok"
    pattern = str(synthetic_shards / "*.jsonl.zst")
    train_tokenizer(pattern, 700, out, sample_bytes=200_000)
    train_tokenizer(pattern, 750, out, sample_bytes=200_000)
    assert Tokenizer.load(out).vocab_size == 750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporary folders left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "important.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a tokenizer folder"):
        train_tokenizer(pattern, 700, tmp_path / "notes")


def test_nfkc_option_keeps_hf_parity(synthetic_shards, tmp_path):
    out = train_tokenizer(str(synthetic_shards / "*.jsonl.zst"), 700, tmp_path / "nfkc", normalization="nfkc")
    texts = [*TRICKY_TEXTS, "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ ㈱ ﬁ"]
    hf = load_hf(out)
    assert hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] == sp_processor(
        out
    ).encode(texts)


def _cli(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "dataset/train_tokenizer.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_cli_bad_input_gives_clear_errors(synthetic_shards, tmp_path):
    result = _cli(
        "--input", str(tmp_path / "nothing/*.jsonl.zst"), "--vocab-size", "500", "--output-dir", "x"
    )
    assert (
        result.returncode == 2
        and "no shard files match" in result.stderr
        and "Traceback" not in result.stderr
    )
    # A truncated shard and a malformed line are reported with file (and line) and counted; the rest trains.
    good = (synthetic_shards / "part-test-0.jsonl.zst").read_bytes()
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "part-a-0.jsonl.zst").write_bytes(good)
    (shards / "part-a-1.jsonl.zst").write_bytes(good[: len(good) // 2])
    (shards / "part-a-2.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(b'{"text": "ok"}\n{"text": x\n')
    )
    out = tmp_path / "tok"
    result = _cli(
        "--input", str(shards), "--vocab-size", "700", "--output-dir", str(out), "--num-threads", "1"
    )
    assert result.returncode == 0, result.stderr
    assert (
        "part-a-1.jsonl.zst: truncated" in result.stderr
        and "part-a-2.jsonl.zst:2: malformed" in result.stderr
    )
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert len(summary["bad_shards"]) == 2 and summary["files"] == 3
    assert "wrote" in result.stderr and "bytes/token" in result.stderr
    assert "warning" not in result.stderr.replace("warning: skipping the rest of a bad shard", "")

    # An output folder that cannot be written fails at once, in one line, before any training.
    (tmp_path / "a_file").write_text("x")
    result = _cli("--input", str(shards), "--vocab-size", "700", "--output-dir", str(tmp_path / "a_file/tok"))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: cannot write --output_dir {tmp_path / 'a_file/tok'}: Not a directory"
    ]
    # A vocabulary larger than the text supports comes out smaller, and the summary says so.
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    write_shard(tiny / "part-t-0.jsonl.zst", [f"hello world number {i} and some text" for i in range(200)])
    small = tmp_path / "small"
    result = _cli(
        "--input", str(tiny), "--vocab_size", "5000", "--output_dir", str(small), "--num_threads", "1"
    )
    assert result.returncode == 0, result.stderr
    vocab = json.loads((small / SUMMARY_FILE).read_text())["vocab_size"]
    assert vocab == Tokenizer.load(small).vocab_size < 5000
    assert f"warning: the sample only supports {vocab:,} pieces of the 5,000 asked for" in result.stderr
    # Too small for the characters the sample needs: the error says how many pieces are needed.
    many_chars = tmp_path / "chars"
    many_chars.mkdir()
    write_shard(
        many_chars / "part-c-0.jsonl.zst",
        ["".join(chr(0x4E00 + i * 7 + j) for j in range(7)) for i in range(80)],
    )
    result = _cli(
        "--input",
        str(many_chars),
        "--vocab-size",
        "400",
        "--output-dir",
        str(tmp_path / "c"),
        "--character-coverage",
        "1.0",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: SentencePiece training failed")
    needed = int(re.search(r"the sample has (\d+) pieces that must be in the vocabulary", result.stderr)[1])
    assert needed > 400 and "raise --vocab_size above that" in result.stderr


def test_cli_keys_aliases_and_bad_values(tmp_path, capsys, monkeypatch):
    """The keys, their dash aliases and the inputs as bare arguments or after --input (one or several) give
    the same call; a bad option is one line naming it, exit status 2, before any shard is read."""
    calls = []

    def record(*args, log, **kwargs):
        calls.append((args, {**kwargs, "quiet": log is None}))

    monkeypatch.setattr(train_tokenizer_module, "train_tokenizer", record)
    assert main(["--input", "a", "--vocab_size", "700", "--output_dir", "tok", "--sample_bytes", "1M"]) == 0
    assert main(["--input", "a", "--vocab-size", "700", "--output-dir", "tok", "--sample-bytes", "1M"]) == 0
    assert main(["a", "--vocab_size", "700", "--output_dir", "tok", "--sample_bytes", "1M"]) == 0
    assert calls[0] == calls[1] == calls[2] and calls[0][0] == (["a"], 700, "tok")
    assert calls[0][1]["sample_bytes"] == 2**20 and not calls[0][1]["quiet"]
    assert main(["--input", "a", "b", "--vocab_size", "700", "--output_dir", "tok", "--quiet"]) == 0
    assert calls[-1][0] == (["a", "b"], 700, "tok") and calls[-1][1]["quiet"]

    required = ["--input", str(tmp_path / "*.jsonl.zst"), "--output_dir", str(tmp_path / "tok")]
    bad = [
        ("vocab_size", ["--vocab_size", "200"]),  # below the 256 byte pieces
        ("normalization", ["--vocab_size", "700", "--normalization", "nfd"]),
        ("heldout_fraction", ["--vocab_size", "700", "--heldout_fraction", "1"]),
        ("lots", ["--vocab_size", "700", "--sample_bytes", "lots"]),
        ("vocab_size", ["--vocab-sise", "700"]),  # a misspelt key: "did you mean"
    ]
    capsys.readouterr()
    for named, args in bad:
        assert main([*required, *args]) == 2, named
        err = capsys.readouterr().err
        assert err.startswith("dataset/train_tokenizer.py: error: ") and named in err, (named, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "tok").exists()


def _peak_rss_of_training(tmp_path: Path, n_copies: int, shard: Path) -> int:
    shards = tmp_path / f"x{n_copies}"
    shards.mkdir()
    for i in range(n_copies):
        (shards / f"part-mem-{i}.jsonl.zst").write_bytes(shard.read_bytes())
    out = tmp_path / f"tok{n_copies}"
    args = ["--input", str(shards), "--vocab-size", "700", "--output-dir", str(out), "--sample-bytes", "1M"]
    result = _cli(*args, "--num-threads", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    return json.loads((out / SUMMARY_FILE).read_text())["peak_rss_bytes"]


def test_training_memory_depends_on_sample_not_corpus(tmp_path):
    texts = synthetic_texts(6000, seed=1)
    shard = write_shard(tmp_path / "big.jsonl.zst", texts)
    text_bytes = sum(len(t.encode()) for t in texts)
    small = _peak_rss_of_training(tmp_path, 1, shard)
    large = _peak_rss_of_training(tmp_path, 4, shard)
    print(
        f"peak RSS {small / 2**20:.1f} MiB (1x) vs {large / 2**20:.1f} MiB (4x), input {text_bytes / 1e6:.1f} MB"
    )
    # 3 more copies of the input add ~12 MB of text; holding it (or SentencePiece's copy) would show.
    assert large - small < 0.25 * 3 * text_bytes, (small, large, text_bytes)
