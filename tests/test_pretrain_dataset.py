"""The pretraining stream and its parts: worker pool, packing, rank/worker split, mixture, exact resume,
held-out stream, CLI.

References the stream did not compute: `Tokenizer.encode` one document at a time, the shards read with
`data.shard_io`, and closed-form positions. Documents are recovered from rows by splitting at </s>,
which text never produces (safe encoding).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
import zstandard

from common import IGNORE_INDEX
from data.shard_io import ShardError, iter_shard_texts
from dataset import pretrain_dataset as pd
from dataset.document_order import Document, Unit
from dataset.packing import Packer
from dataset.pretrain_dataset import (
    PretrainDataConfig,
    build_pretrain_dataloader,
    build_validation_dataloader,
)
from dataset.tokenizer import Tokenizer
from dataset.train_tokenizer import train_tokenizer
from dataset.worker_pool import WorkerDiedError, WorkerPool
from tests.helpers.shards import first_epoch_documents, generated_corpus, split_documents


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, list[Path]]:
    return generated_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory) -> Tokenizer:
    paths = [str(p) for ps in corpus.values() for p in ps]
    return Tokenizer.load(train_tokenizer(paths, 400, tmp_path_factory.mktemp("tok") / "tok"))


def make_config(corpus, **overrides) -> PretrainDataConfig:
    values = dict(
        shards=[str(corpus["alpha"][0].parent)],
        seq_len=64,
        batch_size=4,
        num_workers=0,
        unit_docs=8,
        shuffle_window=3,
    )
    values.update(overrides)
    return PretrainDataConfig(**values)


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def reference_documents(tokenizer: Tokenizer, paths, *, bos: bool = True) -> list[list[int]]:
    return [tokenizer.encode(t, bos=bos, eos=True) for t in iter_shard_texts(sorted(paths))]


def expected_positions(doc_lengths: list[int], seq_len: int, rows: int) -> np.ndarray:
    """Closed form: position = distance from max(document start, row start)."""
    starts = np.concatenate([[0], np.cumsum(doc_lengths)])
    flat = np.arange(rows * seq_len)
    doc_start = starts[np.searchsorted(starts, flat, side="right") - 1]
    row_start = flat // seq_len * seq_len
    return (flat - np.maximum(doc_start, row_start)).reshape(rows, seq_len)


# --------------------------------------------------------------------------------------------------
# The worker pool (generic: any hashable request, any function)


def affine(request: int, offset: int) -> int:
    if request < 0:
        raise ValueError(f"negative request {request}")
    if request == 99:
        os._exit(3)  # a worker killed mid-task
    return request * request + offset


@pytest.mark.parametrize("num_workers", [0, 2])
def test_worker_pool_results_are_looked_up_by_request(num_workers):
    with WorkerPool(affine, 10, num_workers) as pool:
        pool.prefetch([3, 1, 2, 4])
        pool.prefetch([2, 3])  # 1 and 4 are no longer wanted: dropped, computed again if asked for
        assert [pool.get(r) for r in (2, 4, 3, 1, 5)] == [14, 26, 19, 11, 35]
        with pytest.raises(ValueError, match="negative request -1"):  # raised as in the worker
            pool.get(-1)


def test_worker_pool_reports_a_dead_worker_and_needs_the_main_thread():
    with WorkerPool(affine, 0, 1) as pool, pytest.raises(WorkerDiedError, match="while working on 99"):
        pool.get(99)
    # Linux kills a worker when the thread that forked it ends: the pool forks only from the main thread.
    errors: list[BaseException] = []

    def use_pool_in_a_thread() -> None:
        try:
            WorkerPool(affine, 0, 1).get(2)
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=use_pool_in_a_thread)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])


# --------------------------------------------------------------------------------------------------
# Packing


def test_packer_policies_and_per_token_labels():
    unit = Unit.build([[1, 2, 3, 4, 5], None, [6]], labels=[[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], [6]])
    assert unit.num_records == 3 and len(unit.tokens_of(1)) == 0 and unit.labels_of(2).tolist() == [6]
    masked = Document(unit.tokens_of(0), unit.labels_of(0), "a", (0, 0, 0))
    plain = Document(np.arange(10, 14), None, "b", (0, 0, 1))
    long = Document(np.arange(20, 29), None, "a", (0, 0, 2))

    def pack(policy: str) -> list:
        docs = iter([masked, plain, long])
        packer = Packer(8, 0, policy=policy)
        return list(iter(lambda: packer.next_row(lambda: next(docs, None)), None))

    concat = pack("concat")  # no padding except at the end of the documents
    assert [r.tokens.tolist() for r in concat] == [
        [1, 2, 3, 4, 5, 10, 11, 12],
        [13, 20, 21, 22, 23, 24, 25, 26],
        [27, 28, 0, 0, 0, 0, 0, 0],
    ]
    assert concat[0].labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5, 10, 11, 12]
    assert concat[0].positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert concat[1].positions.tolist() == [0, 0, 1, 2, 3, 4, 5, 6]  # a continuation restarts at 0
    assert concat[2].labels.tolist() == [27, 28] + [IGNORE_INDEX] * 6
    assert [(s.source, s.length, s.document_start, s.document_end) for s in concat[1].segments] == [
        ("b", 1, False, True),
        ("a", 7, True, False),
    ]
    padded = pack("pad")  # a document that does not fit starts the next row; a longer one is still cut
    assert [r.tokens.tolist() for r in padded] == [
        [1, 2, 3, 4, 5, 0, 0, 0],
        [10, 11, 12, 13, 0, 0, 0, 0],
        [20, 21, 22, 23, 24, 25, 26, 27],
        [28, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert padded[0].labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5] + [IGNORE_INDEX] * 3


@pytest.mark.parametrize("add_bos", [True, False])
def test_packing_is_the_concatenation_of_documents_in_file_order(corpus, tokenizer, add_bos):
    config = make_config(corpus, shuffle=False, document_masking=True, add_bos=add_bos, batch_size=3)
    docs = reference_documents(tokenizer, corpus["alpha"] + corpus["beta"], bos=add_bos)
    stream = [t for d in docs for t in d]
    epoch_rows = len(stream) // config.seq_len
    n_batches = epoch_rows // config.batch_size + 2  # into the second epoch
    with build_pretrain_dataloader(config, tokenizer) as loader:
        batches = take(loader, n_batches)
    input_ids = torch.cat([b["input_ids"] for b in batches])
    rows = len(input_ids)
    assert input_ids.shape == (rows, config.seq_len) and input_ids.dtype == torch.long
    # No padding: every column is a document token; the epoch wraps around to the first document.
    expected = (stream * 2)[: rows * config.seq_len]
    assert input_ids.flatten().tolist() == expected
    for b in batches:
        assert torch.equal(b["labels"], b["input_ids"])
    positions = torch.cat([b["position_ids"] for b in batches])
    lengths = [len(d) for d in docs] * 2
    assert np.array_equal(positions.numpy(), expected_positions(lengths, config.seq_len, rows))
    state = loader.state_dict()
    assert state["groups"]["all"]["epoch"] == 1
    # Shards are read in sorted order: the 210 alpha documents, then the beta ones.
    alpha_tokens = sum(len(d) for d in docs[:210])
    source_of_token = (["alpha"] * alpha_tokens + ["beta"] * (len(stream) - alpha_tokens)) * 2
    counted = source_of_token[: rows * config.seq_len]
    assert state["tokens_per_source"] == {"alpha": counted.count("alpha"), "beta": counted.count("beta")}


def test_no_position_ids_without_document_masking(corpus, tokenizer):
    with build_pretrain_dataloader(make_config(corpus), tokenizer) as loader:
        (batch,) = take(loader, 1)
    assert set(batch) == {"input_ids", "labels"}


# --------------------------------------------------------------------------------------------------
# Rank and worker split


@pytest.mark.parametrize(("world_size", "num_workers"), [(2, 2), (4, 0)])
def test_each_document_read_once_per_epoch_across_ranks(corpus, tokenizer, world_size, num_workers):
    config = make_config(corpus, num_workers=num_workers)
    all_docs = {tuple(d) for d in reference_documents(tokenizer, corpus["alpha"] + corpus["beta"])}
    per_rank = []
    for rank in range(world_size):
        with build_pretrain_dataloader(config, tokenizer, rank=rank, world_size=world_size) as loader:
            per_rank.append(first_epoch_documents(loader, tokenizer.eos_id))
    seen = [d for docs in per_rank for d in docs]
    assert len(seen) == len(set(seen)) == len(all_docs)
    assert set(seen) == all_docs
    # With few shards per rank every shard is split by record index: each rank gets an equal share.
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 6


# --------------------------------------------------------------------------------------------------
# Exact resume


@pytest.mark.parametrize(("workers_before", "workers_after"), [(0, 2), (2, 1)])
def test_resume_gives_exactly_the_uninterrupted_rows(corpus, tokenizer, workers_before, workers_after):
    config = make_config(corpus, mixture={"alpha": 1, "beta": 1}, document_masking=True)
    n, m = 15, 40
    with build_pretrain_dataloader(config, tokenizer) as reference:
        expected = take(reference, n + m)
        groups = reference.state_dict()["groups"].values()
        assert max(g["epoch"] for g in groups) >= 1  # the range crosses an epoch
    config.num_workers = workers_before
    with build_pretrain_dataloader(config, tokenizer) as first:
        take(first, n)
        state = json.loads(json.dumps(first.state_dict()))  # it is plain JSON
    config.num_workers = workers_after
    with build_pretrain_dataloader(config, tokenizer) as resumed:
        resumed.load_state_dict(state)
        got = take(resumed, m)
        assert resumed.state_dict()["batches"] == n + m
    for want, have in zip(expected[n:], got):
        assert want.keys() == have.keys()
        for key in want:
            assert torch.equal(want[key], have[key]), key


def test_resume_from_a_version_1_state(corpus, tokenizer):
    """States saved before the stream was split (v1, with informational keys since dropped) still resume."""
    config = make_config(corpus, mixture={"alpha": 1, "beta": 1})
    with build_pretrain_dataloader(config, tokenizer) as loader:
        take(loader, 7)
        state = loader.state_dict()
        expected = take(loader, 3)
    v1 = {**state, "version": 1, "rows": 28, "epochs": {"alpha": 0, "beta": 0}, "documents_per_source": {}}
    with build_pretrain_dataloader(config, tokenizer) as resumed:
        resumed.load_state_dict(v1)
        assert resumed.counters() == {"tokens_per_source": state["tokens_per_source"]}
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(expected, take(resumed, 3)))
        assert "epochs" not in resumed.state_dict() and resumed.state_dict()["version"] == 2


def test_resume_skips_past_shards_without_reading_them(corpus, tokenizer, monkeypatch):
    config = make_config(corpus, mixture={"alpha": 1, "beta": 1})
    calls: list[pd.TextUnitRequest] = []
    real = pd.tokenize_unit
    monkeypatch.setattr(pd, "tokenize_unit", lambda request, tok: calls.append(request) or real(request, tok))
    with build_pretrain_dataloader(config, tokenizer) as loader:
        take(loader, 40)
        state = loader.state_dict()
    uninterrupted = len(calls)
    calls.clear()
    with build_pretrain_dataloader(config, tokenizer) as loader:
        loader.load_state_dict(state)
        take(loader, 1)
    # Only the open parts' current units (window 3 per source) plus the cut document's are re-read.
    assert len(calls) <= 2 * config.shuffle_window + 3 < uninterrupted


def test_resume_refuses_a_different_stream(corpus, tokenizer):
    with build_pretrain_dataloader(make_config(corpus), tokenizer) as loader:
        take(loader, 1)
        state = loader.state_dict()
    other = build_pretrain_dataloader(make_config(corpus, seq_len=32), tokenizer)
    with pytest.raises(ValueError, match="seq_len: saved 64, now 32"):
        other.load_state_dict(state)
    other = build_pretrain_dataloader(make_config(corpus), tokenizer, rank=1, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        other.load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# Mixture


@pytest.mark.parametrize("weights", [(1, 1), (3, 1)])
def test_mixture_token_shares_follow_the_weights(corpus, tokenizer, weights):
    config = make_config(corpus, mixture=dict(zip(("alpha", "beta"), weights)))
    with build_pretrain_dataloader(config, tokenizer) as loader:
        rows = [row for _, row in zip(range(150), loader.iter_rows())]
        counts = loader.tokens_per_source
    total = 150 * config.seq_len
    assert sum(counts.values()) == total
    # The counts are the segments' lengths, and each segment's text belongs to its source.
    for source in ("alpha", "beta"):
        segments = [(row, s) for row in rows for s in row.segments if s.source == source]
        assert counts[source] == sum(s.length for _, s in segments)
        for row, s in segments:
            if s.document_start:
                text = tokenizer.decode(row.tokens[s.start : s.start + s.length])
                assert source.startswith(text[: len(source)])
    # The natural share of alpha is about 30%; the greedy choice holds the weights to within a document.
    share = counts["alpha"] / total
    longest = max(len(d) for d in reference_documents(tokenizer, corpus["alpha"] + corpus["beta"]))
    assert abs(share - weights[0] / sum(weights)) <= longest / total + 1e-9


def test_mixture_weight_zero_leaves_a_source_out(corpus, tokenizer):
    config = make_config(corpus, mixture={"alpha": 1, "beta": 0})
    with build_pretrain_dataloader(config, tokenizer) as loader:
        take(loader, 5)
        assert loader.tokens_per_source == {"alpha": 5 * 4 * 64}


def test_mixture_errors_name_the_sources(corpus, tokenizer):
    with pytest.raises(ValueError, match=r"source\(s\) \['beta'\] have no mixture weight"):
        build_pretrain_dataloader(make_config(corpus, mixture={"alpha": 1}), tokenizer)
    with pytest.raises(ValueError, match=r"\['gamma'\] match no shard"):
        build_pretrain_dataloader(make_config(corpus, mixture={"alpha": 1, "beta": 1, "gamma": 1}), tokenizer)
    with pytest.raises(ValueError, match=r"\['betta'\] match no shard; sources found: \['alpha', 'beta'\]"):
        build_pretrain_dataloader(make_config(corpus, mixture={"alpha": 1, "betta": 1}), tokenizer)  # a typo
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        make_config(corpus, mixture={"alpha": -1})


# --------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_same_rows_other_seed_other_rows(corpus, tokenizer):
    def rows(seed: int, num_workers: int) -> torch.Tensor:
        config = make_config(corpus, seed=seed, num_workers=num_workers)
        with build_pretrain_dataloader(config, tokenizer) as loader:
            return torch.cat([b["input_ids"] for b in take(loader, 6)])

    first = rows(0, 0)
    assert torch.equal(first, rows(0, 2))
    assert not torch.equal(first, rows(1, 0))


def test_each_epoch_has_its_own_order(corpus, tokenizer):
    config = make_config(corpus)
    total = sum(len(d) for d in reference_documents(tokenizer, corpus["alpha"] + corpus["beta"]))
    n_batches = 2 * total // (config.seq_len * config.batch_size) + 4
    with build_pretrain_dataloader(config, tokenizer) as loader:
        tokens = torch.cat([b["input_ids"] for b in take(loader, n_batches)]).flatten().tolist()
    docs = split_documents(tokens, tokenizer.eos_id)
    n = len({tuple(d) for d in reference_documents(tokenizer, corpus["alpha"] + corpus["beta"])})
    epoch0, epoch1 = docs[:n], docs[n : 2 * n]
    assert len(set(epoch0)) == n and set(epoch0) == set(epoch1)
    assert epoch0 != epoch1
    # Shuffled: not the file order.
    assert [list(d) for d in epoch0] != reference_documents(tokenizer, corpus["alpha"] + corpus["beta"])


# --------------------------------------------------------------------------------------------------
# Held-out stream


def test_held_out_fraction_is_disjoint_from_training_and_finite(corpus, tokenizer):
    config = make_config(corpus, validation_fraction=0.2)
    all_docs = {tuple(d) for d in reference_documents(tokenizer, corpus["alpha"] + corpus["beta"])}
    with build_pretrain_dataloader(config, tokenizer) as loader:
        train_docs = first_epoch_documents(loader, tokenizer.eos_id)
    with build_validation_dataloader(config, tokenizer) as val:
        batches = list(val)
        again = list(val)
    assert len(batches) == len(again) and all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again)
    )
    labels = torch.cat([b["labels"] for b in batches]).flatten()
    ids = torch.cat([b["input_ids"] for b in batches]).flatten()
    real = labels != -100
    # Only the tail of the last row is padding.
    assert real.sum() > 0 and bool(real[: int(real.sum())].all())
    assert bool((ids[~real] == tokenizer.pad_id).all())
    val_docs = split_documents(ids[real].tolist(), tokenizer.eos_id)
    assert len(val_docs) == len(set(val_docs)) > 0
    assert set(val_docs).isdisjoint(train_docs)
    assert set(val_docs) | set(train_docs) == all_docs
    assert 0.1 < len(val_docs) / len(all_docs) < 0.3


def test_held_out_shards_and_max_batches(corpus, tokenizer):
    held = [str(corpus["alpha"][2]), str(corpus["beta"][2])]
    config = make_config(corpus, validation_shards=held, batch_size=2)
    with build_pretrain_dataloader(config, tokenizer, rank=0, world_size=1) as loader:
        groups = loader.stream.streams
        assert sorted(p.path for g in groups for p in g.group.parts) == sorted(
            str(p) for p in corpus["alpha"][:2] + corpus["beta"][:2]
        )
    with build_validation_dataloader(config, tokenizer) as val:
        ids = torch.cat([b["input_ids"] for b in val])
        labels = torch.cat([b["labels"] for b in val])
    expected = [t for d in reference_documents(tokenizer, held) for t in d]
    assert ids.flatten()[labels.flatten() != -100].tolist() == expected
    n = len(ids) // 2 + 1
    with build_validation_dataloader(config, tokenizer, max_batches=3 * n) as val:
        assert len(list(val)) == 3 * n  # starts over to give every rank the same number of batches
    assert build_validation_dataloader(make_config(corpus), tokenizer) is None


# --------------------------------------------------------------------------------------------------
# Bad input, real shards, command line


def test_malformed_shard_names_file_and_line(tmp_path, tokenizer):
    good = orjson.dumps({"text": "fine"}) + b"\n"
    (tmp_path / "part-x-00000.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(good * 3 + b"{oops\n")
    )
    for workers in (0, 1):
        config = PretrainDataConfig(shards=[str(tmp_path)], seq_len=8, batch_size=1, num_workers=workers)
        with (
            build_pretrain_dataloader(config, tokenizer) as loader,
            pytest.raises(ShardError, match=r"00000\.jsonl\.zst:4"),
        ):
            take(loader, 3)


def test_real_corpus_through_the_sharder_and_a_tokenizer(shared_corpus, tmp_path, capsys):
    from data.shard import main as shard_main

    out = tmp_path / "shards"
    for corpus_format in ("pile", "wudao"):
        raw = str(shared_corpus / "raw" / corpus_format)
        assert shard_main([raw, "--format", corpus_format, "--output-dir", str(out / corpus_format)]) == 0
    shards = [str(out / "pile"), str(out / "wudao")]
    tokdir = train_tokenizer(shards, 2000, tmp_path / "tok", sample_bytes=2 << 20, character_coverage=0.99)
    tokenizer = Tokenizer.load(tokdir)
    config = PretrainDataConfig(
        shards=shards,
        seq_len=256,
        batch_size=4,
        num_workers=2,
        mixture={"pile": 1, "wudao": 1},
        document_masking=True,
        unit_docs=32,
    )
    with build_pretrain_dataloader(config, tokenizer) as loader:
        batches = take(loader, 10)
        state = loader.state_dict()
    counts = state["tokens_per_source"]
    # Both sources are read (their shares converge over documents; one Python file can fill all 10 batches).
    assert sum(counts.values()) == 10 * 4 * 256 and min(counts.values()) > 0
    # Every complete document in the rows is the encoding of a real record.
    texts = set(iter_shard_texts(sorted(out.glob("*/*.jsonl.zst"))))
    docs = split_documents(torch.cat([b["input_ids"] for b in batches]).flatten().tolist(), tokenizer.eos_id)
    whole = [d for d in docs[1:] if d[0] == tokenizer.bos_id]
    assert len(whole) > 5
    for d in whole:
        assert tokenizer.decode(d) in texts
    flags = ["--data.tokenizer", str(tokdir), "--data.seq_len", "64", "--data.document_masking", "true"]
    mixture = "--data.mixture={pile: 1, wudao: 1}"
    assert pd.main(["--data.shards", shards[0], "--data.shards+", shards[1], mixture, *flags]) == 0
    printed = capsys.readouterr().out
    assert (
        "batch 0 row 0:" in printed and "document start" in printed and "tokens per source: pile" in printed
    )


def test_cli_reads_the_data_section_of_a_run_config(corpus, tokenizer, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data:\n  shards: ['{corpus['alpha'][0].parent}']\n  tokenizer: '{tokenizer.path}'\n"
        "  seq_len: 32\n  batch_size: 2\n  num_workers: 0\n  mixture: {alpha: 1, beta: 1}\n"
    )
    # The other sections of a run config are ignored; --show.* chooses what is printed.
    config.write_text(config.read_text() + "model: {preset: tiny}\ntrain: {max_steps: 3}\n")
    assert pd.main(["--config", str(config), "--show.batches", "2", "--show.max_chars=20"]) == 0
    printed = capsys.readouterr().out
    assert "seq_len 32, batch_size 2" in printed and "batch 1 row 1:" in printed and "[...]" in printed
    assert pd.main(["--config", str(config), "--show.rank", "1", "--show.world_size", "2"]) == 0
    assert "training stream of rank 1/2" in capsys.readouterr().out
    assert pd.main(["--config", str(config), "--show.validation", "true"]) == 2
    assert "no held-out stream" in capsys.readouterr().err
    validation = ["--show.validation=true", "--data.validation_fraction", "0.2", "--show.batches", "100"]
    assert pd.main(["--config", str(config), *validation]) == 0
    assert (
        "held-out stream of rank 0/1" in (printed := capsys.readouterr().out)
        and "padding, labels -100" in printed
    )
    assert pd.main(["--config", str(config), "--data.seq_len", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(--data.seq_len): 'data.seq_len' must be PositiveInt, got '0'" in err
    assert pd.main(["--config", str(config), "--seq-len", "8"]) == 2  # the old flags are gone
    assert "unknown option --seq-len" in capsys.readouterr().err
    config.write_text("data:\n  shardz: []\n")
    assert pd.main(["--config", str(config)]) == 2
    assert "did you mean 'shards'" in capsys.readouterr().err
