"""Instruction-tuning data on the shared corpus's instruction data: rendering, preparation, packing and the
training speed they give (not a test).

    python bench/bench_sft.py [--corpus ../shared/corpus] [--tokenizer TOKDIR] [--seq-len 512]

Measures, in one run, on every conversation of sft/alpaca_en_zh.json and sft/sharegpt.jsonl:
- rendering into ids and loss mask: our renderer (`render_chats`, SentencePiece with 1 and 2 threads) beside
  transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)` on the same conversations (what
  an SFT pipeline built on transformers calls per conversation); the run checks that both agree exactly;
- preparation end to end (read, check, render, truncate, shuffle, write shards): seconds;
- packing: the share of the tokens the model runs on that are padding, for best-fit packing (ours),
  one conversation per row grouped by length (ours, "pad"), and one per row padded to the batch's longest
  without grouping (the plain padded batch);
- training speed of the tiny preset on this CPU: trained tokens per second over the same conversations in
  best-fit and in padded batches, fp32, passes alternating so that load on the machine hits both alike.

Without --tokenizer an 8000-piece tokenizer is trained on the conversations first. Prints markdown rows
for docs/benchmarks.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))

import argparse
import platform
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import orjson
import torch
import zstandard

from dataset.chat_prepare import ChatDataConfig, prepare_chat_data
from dataset.chat_sources import iter_source, parse_sources
from dataset.chat_stream import ChatLoader
from dataset.chat_template import render_chats
from dataset.document_order import Document
from dataset.packing import BlockPacker
from dataset.tokenizer import Tokenizer
from dataset.train_tokenizer import train_tokenizer
from models.llama import Llama, ModelConfig
from training.objectives import CausalLMObjective

REPO = Path(__file__).resolve().parent.parent
BATCH = 8


def machine_name() -> str:
    model = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()}-core {model}, load {os.getloadavg()[0]:.1f}"


def conversations(files: list[str]) -> list[list[dict[str, str]]]:
    return [r.messages for s in parse_sources(files) for r in iter_source(s) if r.messages]


def bench_rendering(tokenizer: Tokenizer, tokdir: Path, chats: list) -> list[str]:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokdir)
    rows = []
    ours = None
    for threads in (1, 2):
        start = time.perf_counter()
        ours = render_chats(tokenizer, chats, num_threads=threads)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.ids) for c in ours)
        rows.append((f"`render_chats`, {threads} thread(s)", len(chats) / seconds, tokens / seconds))
    start = time.perf_counter()
    theirs = [hf.apply_chat_template(c, return_dict=True, return_assistant_tokens_mask=True) for c in chats]
    seconds = time.perf_counter() - start
    rows.append(
        (
            "transformers `apply_chat_template` + mask",
            len(chats) / seconds,
            sum(len(t["input_ids"]) for t in theirs) / seconds,
        )
    )
    assert ours is not None
    same = all(
        t["input_ids"] == o.ids and t["assistant_masks"] == [int(x) for x in o.trained]
        for t, o in zip(theirs, ours)
    )
    peer = rows[-1][1]
    return [
        f"| {name} | {per_s:,.0f} | {tokens_s:,.0f} | {per_s / peer:.1f}× | {'identical' if same else 'DIFFERENT'} |"
        for name, per_s, tokens_s in rows
    ]


def rendered_documents(tokenizer: Tokenizer, chats: list, seq_len: int) -> list[Document]:
    docs = []
    for i, chat in enumerate(render_chats(tokenizer, chats, num_threads=2)):
        ids, labels = (
            np.array(chat.ids[:seq_len], dtype=np.int32),
            np.array(chat.labels[:seq_len], dtype=np.int32),
        )
        docs.append(Document(ids, labels, "all", (0, 0, i)))
    return docs


def rows_of(docs: list[Document], policy: str, seq_len: int, group: int) -> list:
    packer = BlockPacker(seq_len, 3, policy=policy, block_docs=1024, seed=0, group_rows=group)  # type: ignore[arg-type]
    feed = iter(docs)
    return list(iter(lambda: packer.next_row(lambda: next(feed, None)), None))


def padding_share(rows: list, *, trim: bool) -> tuple[float, int]:
    """(padding / tokens run, batches) for batches of BATCH consecutive rows."""
    total = filled = batches = 0
    for i in range(0, len(rows), BATCH):
        batch = rows[i : i + BATCH]
        lengths = [sum(s.length for s in r.segments) for r in batch]
        width = max(lengths) if trim else len(batch[0].tokens)
        total += width * len(batch)
        filled += sum(lengths)
        batches += 1
    return 1 - filled / total, batches


def bench_training(tokenizer: Tokenizer, docs: list[Document], seq_len: int, passes: int) -> list[str]:
    """Seconds for one optimizer step per batch over the same conversations, packed or padded (the trained
    tokens are the same); the policies alternate pass by pass, after one warm-up pass each."""
    torch.manual_seed(0)
    shape = ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=seq_len)
    model = Llama(shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = CausalLMObjective(token_accuracy=True)
    batches = {}
    for policy in ("best_fit", "pad"):
        rows = rows_of(docs, policy, seq_len, BATCH)
        loader = ChatLoader(None, packing=policy, batch_size=BATCH, fingerprint={})  # type: ignore[arg-type]
        batches[policy] = [loader.rows_to_batch(rows[i : i + BATCH]) for i in range(0, len(rows), BATCH)]
    seconds = dict.fromkeys(batches, 0.0)
    model.train()
    for rep in range(passes + 1):
        for policy, items in batches.items():
            start = time.perf_counter()
            for batch in items:
                objective(model, batch, {}).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if rep:  # the first pass warms up
                seconds[policy] += time.perf_counter() - start
    trained = sum(int(objective.count(b)) for b in batches["pad"])
    run = {p: sum(b["input_ids"].numel() for b in items) for p, items in batches.items()}
    return [
        f"| {policy} | {len(batches[policy])} | {run[policy]:,} | {trained * passes / seconds[policy]:,.0f} | "
        f"{seconds['pad'] / seconds[policy]:.2f}× |"
        for policy in batches
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus"))
    parser.add_argument("--tokenizer", default="")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    files = [
        str(Path(args.corpus) / "sft" / "alpaca_en_zh.json"),
        str(Path(args.corpus) / "sft" / "sharegpt.jsonl"),
    ]
    chats = conversations(files)
    with tempfile.TemporaryDirectory() as tmp:
        tokdir = Path(args.tokenizer) if args.tokenizer else None
        if tokdir is None:
            texts = ["\n".join(m["content"] for m in c) for c in chats]
            shard = Path(tmp) / "shards" / "part-sft-00000.jsonl.zst"
            shard.parent.mkdir()
            shard.write_bytes(
                zstandard.ZstdCompressor().compress(
                    b"".join(orjson.dumps({"text": t}) + b"\n" for t in texts)
                )
            )
            tokdir = train_tokenizer(str(shard), 8000, Path(tmp) / "tok")
        tokenizer = Tokenizer.load(tokdir)
        print(f"{date.today()}, {machine_name()}, torch {torch.__version__}; {len(chats):,} conversations")

        print("\n| renderer | conversations/s | tokens/s | ratio | ids and mask |\n|---|---:|---:|---:|---|")
        print("\n".join(bench_rendering(tokenizer, tokdir, chats)))

        config = ChatDataConfig(files=files, seq_len=args.seq_len, validation_fraction=0.01)
        start = time.perf_counter()
        prepared = prepare_chat_data(config, tokenizer, tokdir, Path(tmp) / "prepared", log=lambda *_: None)
        seconds = time.perf_counter() - start
        kept = sum(s["kept"] for s in prepared.report["sources"].values())
        print(
            f"\npreparation (read, render, truncate to {args.seq_len}, shuffle, write): {seconds:.1f} s, {kept:,} conversations kept"
        )

        random.Random(0).shuffle(chats)
        docs = rendered_documents(tokenizer, chats, args.seq_len)
        print(
            f"\n| batches of {BATCH} rows, seq_len {args.seq_len} | rows | padding share of the tokens run |\n|---|---:|---:|"
        )
        for name, policy, group, trim in [
            ("best_fit (ours)", "best_fit", 1, False),
            ("pad, grouped by length (ours)", "pad", BATCH, True),
            ("pad to the batch's longest, ungrouped", "pad", 1, True),  # groups of one row: random order
        ]:
            rows = rows_of(docs, policy, args.seq_len, group)
            share, _ = padding_share(rows, trim=trim)
            print(f"| {name} | {len(rows):,} | {share:.1%} |")

        subset = docs[:240]
        print(
            f"\n| tiny preset, fp32, {len(subset)} conversations, batches of {BATCH} | batches | tokens run | "
            "trained tokens/s | speed-up |\n|---|---:|---:|---:|---:|"
        )
        print("\n".join(bench_training(tokenizer, subset, args.seq_len, args.passes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
