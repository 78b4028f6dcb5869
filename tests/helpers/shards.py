"""Shards in the sharder's format (jsonl.zst) written from generated text, a small raw corpus for the sharder
with duplicates (tests/test_shard.py, tests/test_shard_executors.py), and documents read back from a
pretraining stream."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path

import orjson
import zstandard

ENGLISH = [
    "the",
    "river",
    "light",
    "stone",
    "garden",
    "window",
    "quiet",
    "market",
    "winter",
    "paper",
    "orange",
]
CJK = "山水风月花鸟云雨春秋江河天地人心"


def write_shard(path: Path, texts: list[str], source: str = "test") -> Path:
    """A jsonl.zst shard in the sharder's format, every record from `source`."""
    lines = b"".join(orjson.dumps({"text": t, "meta": {"source": source}}) + b"\n" for t in texts)
    path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    return path


def synthetic_texts(n_docs: int, seed: int = 0) -> list[str]:
    """Generated English-like, Chinese-like and code-like documents (no corpus needed)."""
    rng = random.Random(seed)
    syllables = ["th", "e", "an", "in", "er", "on", "re", "at", "st", "ou", "ing", "ed", "al", "ly", "s"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(600)]
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 150)]
    docs = []
    for i in range(n_docs):
        kind = i % 3
        if kind == 0:
            body = " ".join(rng.choice(words) for _ in range(rng.randint(50, 300)))
            docs.append(
                body.capitalize() + f". In {rng.randint(1000, 2030)}, {rng.randint(1, 99)} times.\n\n"
            )
        elif kind == 1:
            docs.append("".join(rng.choice(han) for _ in range(rng.randint(50, 300))) + "。\n")
        else:
            lines = [f"def {rng.choice(words)}(x, y={rng.randint(0, 9)}):"]
            lines += [
                f"{' ' * 4 * rng.randint(1, 3)}{rng.choice(words)} = x + {rng.randint(0, 99)}"
                for _ in range(8)
            ]
            docs.append("\n".join(lines) + "\n\treturn  None\n")
    return docs


def generated_corpus(root: Path) -> dict[str, list[Path]]:
    """Two unequal sources: 'alpha' (many short English documents), 'beta' (few long Chinese ones)."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    shards: dict[str, list[Path]] = {"alpha": [], "beta": []}
    for s in range(3):
        alpha = [f"alpha {s}-{i}: " + " ".join(rng.choices(ENGLISH, k=rng.randint(3, 25))) for i in range(70)]
        beta = [f"beta {s}-{i}: " + "".join(rng.choices(CJK, k=rng.randint(60, 240))) for i in range(12)]
        for source, texts in (("alpha", alpha), ("beta", beta)):
            path = root / f"part-{source}-{s:05d}-00000.jsonl.zst"
            write_shard(path, texts, source)
            shards[source].append(path)
    return shards


def make_corpus(root: Path) -> list[Path]:
    """Three sharder inputs of different formats (jsonl.zst, jsonl.gz, a WuDao JSON array) with duplicates
    within and across files: 2,500 documents, 215 of them exact duplicates."""
    root.mkdir()
    a = root / "a.jsonl.zst"
    a.write_bytes(
        zstandard.ZstdCompressor(level=3).compress(
            _jsonl([{"text": f"alpha {i % 900}"} for i in range(1000)])
        )
    )
    b = root / "b.jsonl.gz"
    b.write_bytes(
        gzip.compress(_jsonl([{"text": f"alpha {i}" if i % 7 == 0 else f"beta {i}"} for i in range(800)]))
    )
    c = root / "c.json"
    c.write_text(
        json.dumps([{"title": f"t{i}", "content": f"gamma {i}", "dataType": "x"} for i in range(700)])
    )
    return [a, b, c]


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def shard_hashes(output_dir: Path) -> dict[str, str]:
    """sha256 of each shard and of manifest.json in a sharder output folder, by file name."""
    files = [*sorted(output_dir.glob("part-*.jsonl.zst")), output_dir / "manifest.json"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def split_documents(tokens: list[int], eos_id: int) -> list[tuple[int, ...]]:
    """Complete documents (ending in </s>) of a concatenated token stream."""
    docs, start = [], 0
    for i, t in enumerate(tokens):
        if t == eos_id:
            docs.append(tuple(tokens[start : i + 1]))
            start = i + 1
    return docs


def first_epoch_documents(loader, eos_id: int, max_batches: int = 400) -> list[tuple[int, ...]]:
    """The rank's documents up to the first one seen again (= its first epoch)."""
    tokens: list[int] = []
    it = iter(loader)
    for _ in range(max_batches):
        tokens += next(it)["input_ids"].flatten().tolist()
        docs = split_documents(tokens, eos_id)
        if len(set(docs)) < len(docs):
            seen, first = set(), []
            for d in docs:
                if d in seen:
                    return first
                seen.add(d)
                first.append(d)
    raise AssertionError("no document repeated: the epoch did not end")
