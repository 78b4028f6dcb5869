"""Instruction data: formats and containers, malformed records, preparation, best-fit packing, the stream's
exact resume and rank split, packed and padded batches giving the same loss, token accuracy, NEFTune.

Everything here runs on generated conversations (no corpus needed) with a tokenizer trained in the module.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

from common import IGNORE_INDEX
from common.run_folder import find_tokenizer
from dataset.chat_prepare import ChatDataConfig, format_report, prepare_chat_data
from dataset.chat_sources import iter_source, parse_sources, to_messages
from dataset.chat_stream import ChatLoader, build_chat_loaders
from dataset.chat_template import render_chat
from dataset.document_order import Document
from dataset.packing import BlockPacker, best_fit_decreasing
from dataset.tokenizer import Tokenizer
from models.llama import Llama
from tests.helpers.chat import WORDS
from tests.helpers.model import tiny_model_config
from training.neftune import add_neftune, segment_lengths
from training.objectives import CausalLMObjective


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def chats(n: int, seed: int = 0, *, max_turns: int = 3) -> list[list[dict[str, str]]]:
    """Conversations of very different lengths, some with a system prompt, some multi-turn."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": sentence(rng, 2, 6)}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, max_turns)):
            messages.append({"role": "user", "content": f"q{i} " + sentence(rng, 1, 20)})
            messages.append({"role": "assistant", "content": f"a{i} " + sentence(rng, 1, 40)})
        out.append(messages)
    return out


def write_jsonl(path: Path, records: list, *, zstd: bool = False) -> Path:
    data = b"".join(orjson.dumps(r) + b"\n" for r in records)
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if zstd else data)
    return path


def as_alpaca(messages):
    system = [m["content"] for m in messages if m["role"] == "system"]
    record = {"instruction": messages[-2]["content"], "input": "", "output": messages[-1]["content"]}
    return {**record, "system": system[0]} if system else record


def as_sharegpt(messages):
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}


# ---------------------------------------------------------------------------------------------------
# Sources, formats, malformed records


def test_every_format_and_container_reads_the_same_conversations(tmp_path):
    conversations = chats(12)
    single = [[*([m for m in c if m["role"] == "system"]), *c[-2:]] for c in conversations]
    files = [
        write_jsonl(
            tmp_path / "messages.jsonl", [{"messages": c, "id": i} for i, c in enumerate(conversations)]
        ),
        write_jsonl(tmp_path / "share.jsonl.zst", [as_sharegpt(c) for c in conversations], zstd=True),
    ]
    (tmp_path / "alpaca.json").write_text(json.dumps([as_alpaca(c) for c in single], ensure_ascii=False))
    pq.write_table(pa.Table.from_pylist([{"messages": c} for c in conversations]), tmp_path / "rows.parquet")
    zst = zstandard.ZstdCompressor().compress((tmp_path / "alpaca.json").read_bytes())
    (tmp_path / "alpaca_copy.json.zst").write_bytes(zst)
    sources = parse_sources([str(tmp_path / "*")])
    assert [s.name for s in sources] == ["alpaca", "alpaca_copy", "messages", "rows", "share"]
    read = {s.name: [r.messages for r in iter_source(s)] for s in sources}
    assert read["messages"] == read["rows"] == read["share"] == conversations
    assert read["alpaca"] == read["alpaca_copy"] == single
    # Alpaca's input goes after the instruction, with a blank line between.
    assert (
        to_messages({"instruction": "Do it.", "input": "x = 1", "output": "ok"})[0]["content"]
        == "Do it.\n\nx = 1"
    )
    assert to_messages({"prompt": "p", "completion": "c", "system": "s"}) == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "c"},
    ]
    assert [r.origin for r in iter_source(sources[0])][:2] == [
        f"{files[0].parent}/alpaca.json: item {i}" for i in (1, 2)
    ]


def test_malformed_records_are_skipped_counted_and_reported_with_file_and_line(tmp_path, tok, tokdir):
    good = [{"messages": c} for c in chats(4)]
    lines = [
        orjson.dumps(good[0]),
        b'{"messages": [{"role": "user", "content": "cut',
        orjson.dumps({"instruction": "no output"}),
        orjson.dumps({"conversations": [{"from": "robot", "value": "x"}]}),
        orjson.dumps(good[1]),
        b"",
        orjson.dumps([1, 2]),
        orjson.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}),
        orjson.dumps({"text": "pretraining text"}),
        orjson.dumps(good[2]),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    config = ChatDataConfig(files=[str(path)], seq_len=512)
    report = prepare_chat_data(config, tok, tokdir, tmp_path / "prepared", log=lambda *_: None).report
    source = report["sources"]["mixed"]
    assert (source["records"], source["malformed"], source["kept"]) == (9, 6, 3)
    examples = source["malformed_examples"]
    assert examples[0].startswith(f"{path}:2: malformed JSON")
    assert examples[1] == f"{path}:3: field 'output' is missing"
    assert examples[2] == f"{path}:4: turn 0 is from 'robot'; expected human, gpt or system"
    assert examples[3] == f"{path}:7: expected a JSON object, found list"
    assert examples[4] == f"{path}:8: message 1 (assistant) is empty"
    assert examples[5].startswith(
        f"{path}:9: not alpaca (instruction/input/output), ShareGPT (conversations), messages"
    )
    assert f"malformed: {path}:3: field 'output' is missing" in format_report(report)


def test_a_hugging_face_dataset_is_a_source(tmp_path, tok, tokdir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    folder = tmp_path / "local_dataset"
    folder.mkdir()
    conversations = chats(6)
    write_jsonl(folder / "train.jsonl", [as_sharegpt(c) for c in conversations])
    (source,) = parse_sources([f"hf:{folder}"])
    assert (source.name, source.hf_split) == ("local_dataset", "train")
    assert [r.messages for r in iter_source(source)] == conversations
    assert next(iter(iter_source(source))).origin == f"hf:{folder}:train: row 1"
    config = ChatDataConfig(files=[f"mine=hf:{folder}:train"], seq_len=512)
    report = prepare_chat_data(config, tok, tokdir, tmp_path / "prepared", log=lambda *_: None).report
    assert report["sources"]["mine"]["kept"] == 6


def test_sources_names_and_mistakes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        write_jsonl(tmp_path / folder / "data.jsonl", [{"messages": chats(1)[0]}])
    with pytest.raises(ValueError, match=r"two sources are named .data.*NAME=PATTERN"):
        parse_sources([str(tmp_path / "a"), str(tmp_path / "b")])
    named = parse_sources([f"first={tmp_path / 'a'}", f"second={tmp_path / 'b' / '*.jsonl'}"])
    assert [(s.name, len(s.paths)) for s in named] == [("first", 1), ("second", 1)]
    with pytest.raises(FileNotFoundError, match="no instruction data matches"):
        parse_sources([str(tmp_path / "missing.jsonl")])


def test_prepared_data_is_reused_until_an_input_changes(tmp_path, tok, tokdir):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in chats(30)])
    config = ChatDataConfig(files=[str(path)], seq_len=256, validation_fraction=0.2)
    logs: list[str] = []
    first = prepare_chat_data(config, tok, tokdir, tmp_path / "prepared", log=logs.append)
    again = prepare_chat_data(config, tok, tokdir, tmp_path / "prepared", log=logs.append)
    assert again.fingerprint == first.fingerprint and logs[-1].startswith(
        "prepared instruction data is up to date"
    )
    report = first.report["sources"]["chat"]
    assert report["held_out"] + report["kept"] == 30 and 0 < report["held_out"] < 15
    assert first.report["validation"]["chat"]["kept"] == report["held_out"]
    changed = prepare_chat_data(
        ChatDataConfig(files=[str(path)], seq_len=128), tok, tokdir, tmp_path / "prepared"
    )
    assert changed.fingerprint != first.fingerprint
    write_jsonl(path, [{"messages": c} for c in chats(31)])
    assert prepare_chat_data(config, tok, tokdir, tmp_path / "prepared").fingerprint != first.fingerprint
    assert not list(tmp_path.glob(".prepared.tmp-*"))


def test_the_tokenizer_comes_from_init_when_not_given(tmp_path, tokdir):
    assert find_tokenizer("", str(tokdir)) == str(tokdir)
    run = tmp_path / "run"
    (run / "step-4").mkdir(parents=True)
    (run / "latest").write_text("step-4\n")
    (run / "step-4" / "config.yaml").write_text(f"data:\n  tokenizer: {tokdir}\n")
    (run / "step-4" / "trainer_state.json").write_text("{}")  # what makes the folder a complete checkpoint
    assert find_tokenizer("", str(run)) == str(tokdir) == find_tokenizer("", str(run / "step-4"))
    with pytest.raises(ValueError, match=r"set data\.tokenizer"):
        find_tokenizer("", str(tmp_path))


# ---------------------------------------------------------------------------------------------------
# Packing


def documents(lengths: list[int], source: str = "s") -> list[Document]:
    rng = np.random.default_rng(0)
    docs = []
    for i, n in enumerate(lengths):
        tokens = rng.integers(10, 100, n, dtype=np.int32)
        labels = np.where(np.arange(n) >= n // 2, tokens, IGNORE_INDEX).astype(np.int32)
        docs.append(Document(tokens, labels, source, (0, 0, i)))
    return docs


def test_best_fit_packs_every_conversation_whole_and_fills_the_rows():
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(5, 40), rng.randint(40, 250)]) for _ in range(400)]
    rows = best_fit_decreasing(lengths, 256)
    assert sorted(i for row in rows for i in row) == list(range(400))
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    assert len(rows) <= 1.02 * sum(lengths) / 256 + 1  # within 2% of the least possible
    docs = documents(lengths)
    by_tokens = {d.tokens.tobytes(): d for d in docs}
    packer = BlockPacker(256, 0, policy="best_fit", block_docs=400, seed=1)
    feed = _feeder(docs)
    packed = list(iter(lambda: packer.next_row(feed), None))
    assert len(packed) == len(rows)
    seen = []
    for row in packed:
        for seg in row.segments:
            doc = by_tokens[row.tokens[seg.start : seg.start + seg.length].astype(np.int32).tobytes()]
            assert np.array_equal(row.labels[seg.start : seg.start + seg.length], doc.labels)
            assert np.array_equal(row.positions[seg.start : seg.start + seg.length], np.arange(seg.length))
            seen.append(doc.ref)
        filled = sum(s.length for s in row.segments)
        assert (row.labels[filled:] == IGNORE_INDEX).all() and (row.tokens[filled:] == 0).all()
    assert sorted(seen) == sorted(d.ref for d in docs)  # every conversation once, never cut


def _feeder(docs):
    iterator = iter(docs)
    return lambda: next(iterator, None)


def test_pad_packing_gives_each_conversation_a_row_grouped_by_length():
    lengths = [random.Random(i).randint(5, 200) for i in range(64)]
    packer = BlockPacker(256, 0, policy="pad", block_docs=64, seed=0, group_rows=8)
    feed = _feeder(documents(lengths))
    rows = list(iter(lambda: packer.next_row(feed), None))
    assert len(rows) == 64 and all(len(r.segments) == 1 for r in rows)
    groups = [[r.segments[0].length for r in rows[i : i + 8]] for i in range(0, 64, 8)]
    ordered = sorted(lengths, reverse=True)
    assert sorted(groups) == sorted(ordered[i : i + 8] for i in range(0, 64, 8))  # groups of neighbours
    assert groups != [ordered[i : i + 8] for i in range(0, 64, 8)]  # ... in a shuffled order


# ---------------------------------------------------------------------------------------------------
# The stream: exact resume, one global stream split by rank


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok, tokdir):
    root = tmp_path_factory.mktemp("sft_stream")
    a = write_jsonl(root / "long.jsonl", [{"messages": c} for c in chats(150, seed=1, max_turns=4)])
    b = write_jsonl(root / "short.jsonl", [as_sharegpt(c) for c in chats(150, seed=2, max_turns=1)])
    config = ChatDataConfig(files=[str(a), str(b)], seq_len=128, validation_fraction=0.1)
    return config, prepare_chat_data(config, tok, tokdir, root / "prepared", log=lambda *_: None)


def batches(loader: ChatLoader, n: int) -> list[dict[str, torch.Tensor]]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(n)]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


@pytest.mark.parametrize("packing", ["best_fit", "pad"])
@pytest.mark.parametrize("workers", [0, 1])
def test_the_stream_resumes_exactly_mid_block(prepared, tok, packing, workers):
    base, data = prepared
    config = ChatDataConfig(
        **{**base.__dict__, "packing": packing, "batch_size": 3, "pack_block": 40, "num_workers": workers}
    )
    config.mixture = {"long": 1.0, "short": 2.0}
    with build_chat_loaders(config, data, tok.pad_id)[0] as loader:
        straight = batches(loader, 30)  # several blocks, past the end of an epoch of the long source
    with build_chat_loaders(config, data, tok.pad_id)[0] as loader:
        first = batches(loader, 11)
        state = json.loads(json.dumps(loader.state_dict()))  # plain JSON, as checkpoints hold it
    assert state["block_rows"] > 0 and state["version"] == 1  # inside a block
    with build_chat_loaders(config, data, tok.pad_id)[0] as loader:
        loader.load_state_dict(state)
        rest = batches(loader, 19)
        counters = loader.counters()
    assert same(first + rest, straight)
    rows = sum(b["input_ids"].shape[0] for b in straight)
    assert sum(counters["conversations_per_source"].values()) >= rows
    if packing == "best_fit":
        assert all(b["input_ids"].shape == (3, 128) and "position_ids" in b for b in straight)
    else:
        assert "position_ids" not in straight[0] and len({b["input_ids"].shape[1] for b in straight}) > 1


def test_ranks_take_their_share_of_every_global_batch(prepared, tok):
    base, data = prepared
    one = ChatDataConfig(**{**base.__dict__, "batch_size": 4})
    two = ChatDataConfig(**{**base.__dict__, "batch_size": 2})
    with build_chat_loaders(one, data, tok.pad_id, rows_per_step=4)[0] as loader:
        single = batches(loader, 6)
    per_rank = []
    for rank in (0, 1):
        with build_chat_loaders(two, data, tok.pad_id, rank=rank, world_size=2)[0] as loader:
            per_rank.append(batches(loader, 6))
    for step, whole in enumerate(single):
        joined = {k: torch.cat([per_rank[0][step][k], per_rank[1][step][k]]) for k in whole}
        assert all(torch.equal(joined[k], whole[k]) for k in whole)


def test_the_held_out_stream_is_the_same_every_time(prepared, tok):
    config, data = prepared
    _, held_out = build_chat_loaders(config, data, tok.pad_id, eval_batches=3)
    with held_out:
        first, second = list(held_out), list(held_out)
    assert len(first) == 3 and same(first, second)


# ---------------------------------------------------------------------------------------------------
# The loss: packed and padded agree; token accuracy without logits; NEFTune


def tiny_model(vocab: int, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(tiny_model_config(vocab_size=vocab, dim=32, max_seq_len=256))


def rendered_documents(tok: Tokenizer, conversations) -> list[Document]:
    docs = []
    for i, messages in enumerate(conversations):
        chat = render_chat(tok, messages)
        docs.append(
            Document(
                np.array(chat.ids, dtype=np.int32), np.array(chat.labels, dtype=np.int32), "s", (0, 0, i)
            )
        )
    return docs


def arranged(docs: list[Document], policy: str, seq_len: int = 256) -> dict[str, torch.Tensor]:
    packer = BlockPacker(seq_len, 3, policy=policy, block_docs=len(docs), seed=0)  # type: ignore[arg-type]
    feed = _feeder(docs)
    rows = list(iter(lambda: packer.next_row(feed), None))
    return ChatLoader(None, packing=policy, batch_size=len(rows), fingerprint={}).rows_to_batch(rows)  # type: ignore[arg-type]


def test_packed_and_padded_batches_give_the_same_loss_and_gradient(tok):
    docs = rendered_documents(tok, chats(10, seed=3))
    packed, padded = arranged(docs, "best_fit"), arranged(docs, "pad")
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0] == 10
    objective = CausalLMObjective(token_accuracy=True)
    results = []
    for batch in (packed, padded):
        model = tiny_model(tok.vocab_size)
        out = objective(model, batch, {})
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append(
            (out.loss.item(), out.metrics["token_accuracy"].item(), int(objective.count(batch)), grads)
        )
    (loss_a, acc_a, count_a, grad_a), (loss_b, acc_b, count_b, grad_b) = results
    assert count_a == count_b == sum(int((d.labels != IGNORE_INDEX).sum()) for d in docs)
    assert loss_a == pytest.approx(loss_b, abs=1e-5) and acc_a == pytest.approx(acc_b)
    torch.testing.assert_close(grad_a, grad_b, atol=1e-5, rtol=1e-4)


def test_token_accuracy_without_logits_matches_the_argmax():
    model = tiny_model(64)
    ids = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        predicted = model(ids).logits.argmax(-1)
    labels = ids.clone()
    labels[:, 1::2] = predicted[:, :-1:2]  # every other target is the model's own guess: right
    labels[0, :10] = IGNORE_INDEX
    targets, guesses = labels[:, 1:], predicted[:, :-1]
    valid = targets != IGNORE_INDEX
    expected = ((guesses == targets) & valid).sum().item() / valid.sum().item()
    assert 0.4 < expected < 0.9
    got = {"eval (full logits)": model(ids, labels=labels, return_token_accuracy=True).token_accuracy}
    model.train()  # chunked loss: with and without a backward to prepare
    got["train (chunked)"] = model(ids, labels=labels, return_token_accuracy=True).token_accuracy
    with torch.no_grad():
        got["train, no grad"] = model(ids, labels=labels, return_token_accuracy=True).token_accuracy
    for name, value in got.items():
        assert value.item() == pytest.approx(expected), name


def test_neftune_noise_is_scaled_per_conversation_and_only_in_training():
    torch.manual_seed(0)
    model = Llama(tiny_model_config(vocab_size=64, dim=32, n_layers=1, n_kv_heads=4, stable_embedding=True))
    ids = torch.randint(0, 64, (1, 30))
    positions = torch.cat([torch.arange(10), torch.arange(20)])[None]
    assert segment_lengths(positions).tolist() == [[10] * 10 + [20] * 20]
    clean = model.embed(ids)
    add_neftune(model, alpha=5.0)
    seen = {}
    model.model.embed_layernorm.register_forward_hook(lambda m, i, o: seen.update(out=o))  # after NEFTune's
    model.train()
    model(ids, position_ids=positions)
    noise = (seen["out"] - clean).detach()
    bound = torch.tensor([5.0 / (10 * 32) ** 0.5] * 10 + [5.0 / (20 * 32) ** 0.5] * 20)[:, None]
    assert (noise[0].abs() <= bound + 1e-6).all() and (noise[0].abs() > bound / 100).float().mean() > 0.9
    model.eval()
    model(ids, position_ids=positions)
    assert torch.equal(seen["out"], clean)


LIGER_ACCURACY = """
import torch
from tests.helpers.triton_interpreter import teach_tritons_interpreter_liger

teach_tritons_interpreter_liger()
from models import kernels
from models.lm_head import linear_cross_entropy

torch.manual_seed(0)
hidden, weight = torch.randn(2, 24, 16), torch.randn(50, 16)
targets = torch.randint(0, 50, (2, 24))
targets[0, :5] = -100
targets[1, ::2] = (hidden @ weight.t())[1, ::2].argmax(-1)  # some right guesses
fast = kernels._liger_linear_cross_entropy()
loss, _, accuracy = fast(hidden.requires_grad_(), weight.requires_grad_(), targets, with_accuracy=True)
want_loss, _, want_accuracy = linear_cross_entropy(hidden, weight, targets, with_accuracy=True)
torch.testing.assert_close(loss, want_loss)
assert 0.2 < want_accuracy.item() < 0.8 and accuracy.item() == want_accuracy.item(), (accuracy, want_accuracy)
print("OK")
"""


def test_liger_token_accuracy_agrees_with_the_reference_under_tritons_interpreter():
    """The GPU loss kernel's accuracy (Liger's return_token_accuracy), run on CPU tensors by Triton's
    interpreter in a child process (see tests/test_kernels.py for why a child)."""
    pytest.importorskip("liger_kernel")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    child = subprocess.run(
        [sys.executable, "-c", LIGER_ACCURACY], env=env, capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0 and "OK" in child.stdout, child.stderr[-3000:]
