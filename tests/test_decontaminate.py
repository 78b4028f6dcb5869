"""Decontamination: 13-gram overlap between task documents and training shards (evaluation/decontaminate)."""

from __future__ import annotations

import random
import string
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from data.shard_io import ShardError
from evaluation.decontaminate import decontaminate, document_texts, ngram_hashes
from evaluation.tasks import Choice, Document, Task
from tests.helpers.shards import write_shard

FEW_SHOT = (
    "Question: What colour is the sky?\nAnswer: blue\n\nQuestion: What do cows drink?\nAnswer: water\n\n"
)
QUESTIONS = {
    "q-leak": "Which gas do the green leaves of the old oak tree take in from the warm summer air",
    "q-twelve": "Which metal is the main part of the red planet core according to most",
    "q-clean": "How many legs does a spider have when it is fully grown and healthy today",
}
ANSWERS = {"q-leak": " carbon dioxide", "q-twelve": " iron", "q-clean": " eight"}


def make_task(name: str = "quiz", questions: dict[str, str] = QUESTIONS) -> Task:
    documents = []
    for doc_id, (native, question) in enumerate(questions.items()):
        context = f"{FEW_SHOT}Question: {question}?\nAnswer:"
        choices = [Choice(context, ANSWERS[native]), Choice(context, " nothing at all")]
        documents.append(Document(doc_id, native, {}, choices, 0))
    return Task(name, Path("quiz"), "acc_per_char", "per_char", documents)


def filler(rng: random.Random, words: int) -> str:
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(words))


def test_normalisation_matches_the_janitor_rule():
    """Lower-cased ASCII, ASCII punctuation deleted, split on whitespace (Unicode too), as lm-eval's Janitor."""
    table = str.maketrans(string.ascii_uppercase, string.ascii_lowercase, string.punctuation)
    rng = random.Random(0)
    pieces = [
        "Don't",
        "STOP!",
        "co-op",
        "naïve",
        "a\u00a0b",
        "x\u3000y",
        "tab\there",
        "(quoted)",
        "中文，句子",
        "end.",
    ]
    for _ in range(50):
        text = " ".join(rng.choices(pieces, k=rng.randint(0, 40)))
        words = text.translate(table).split()
        reference = {tuple(words[i : i + 3]) for i in range(len(words) - 2)}
        assert len(set(ngram_hashes([text], 3)[0].tolist())) == len(reference)
    # The same words however cased and punctuated hash alike; n-grams never span two texts.
    assert set(ngram_hashes(["The QUICK, brown fox!"], 3)[0]) == set(
        ngram_hashes(["the quick brown (fox)"], 3)[0]
    )
    spanning = ngram_hashes(["one two", "three four"], 3)
    assert len(spanning.hashes) == len(spanning.owners) == 0


def test_document_text_drops_few_shot_examples_and_labels():
    texts = dict(document_texts(make_task()))
    assert texts["q-leak"] == f" {QUESTIONS['q-leak']}?\n carbon dioxide"  # the gold choice only


def test_contaminated_across_case_and_punctuation_but_not_twelve_words(tmp_path):
    rng = random.Random(1)
    leak = "THE GREEN LEAVES of the OLD oak tree... take in, from the warm summer air: CARBON dioxide!"
    # The 12-word document: its question's last 11 words and its answer, one word short of an n-gram.
    twelve = "the main part of the red planet core according to most. iron"
    write_shard(
        tmp_path / "part-a-0.jsonl.zst", [filler(rng, 300), f"{filler(rng, 50)} {leak} {filler(rng, 50)}"]
    )
    write_shard(tmp_path / "part-a-1.jsonl.zst", [f"{filler(rng, 20)} {twelve} {filler(rng, 20)}"])
    other = make_task("other", {"q-clean": QUESTIONS["q-clean"]})
    result = decontaminate(str(tmp_path / "*.jsonl.zst"), [make_task(), other], workers=2)
    assert result == {
        "contamination": {
            "quiz": {"docs": 3, "contaminated": 1, "short": 0, "ids": ["q-leak"]},
            "other": {"docs": 1, "contaminated": 0, "short": 0, "ids": []},
        }
    }
    # Inline (0 workers) gives the same; a 13th word makes the near miss contaminated.
    assert decontaminate(tmp_path, [make_task(), other], workers=0) == result
    write_shard(tmp_path / "part-a-1.jsonl.zst", [f"the metal is {twelve}"])
    assert decontaminate(tmp_path, [make_task()], workers=0)["contamination"]["quiz"]["ids"] == [
        "q-leak",
        "q-twelve",
    ]


def test_same_documents_as_a_brute_force_set_of_ngrams(tmp_path, monkeypatch):
    """Against every training 13-gram held as a tuple of Janitor-normalised words: the same contaminated
    documents, with case, punctuation, Unicode whitespace, Chinese runs, spans across two training
    documents, many small batches, and training words that differ from a task word only in their length or
    their last letter."""
    rng = random.Random(3)
    longest = "q" * 30 + "r" * 42
    # Training words and the task words in their place, which differ only in length or the last letter.
    near = {longest + "zz": longest, longest[:-1] + "s": longest, "q" * 8 + "z" * 70: "q" * 8}
    vocabulary = [filler(rng, 1) for _ in range(40)] + [
        "Don't",
        "STOP!",
        "--",
        "naïve",
        "a\u00a0b",
        "x\u3000y",
        "tab\there",
        "中文，句子",
        "Ωμέγα",
    ]
    training = [" ".join(rng.choices([*vocabulary, *near], k=rng.randint(0, 200))) for _ in range(60)]
    shard_words = [text.split(" ") for text in training]
    questions = {}
    for number in range(80):
        kind, source = number % 4, shard_words[number % len(shard_words)]
        start = rng.randint(0, max(0, len(source) - 16))
        if kind == 0:  # a span of a training document (often long enough for a 13-gram)
            words = source[start : start + rng.randint(10, 16)]
        elif kind == 1:  # the end of one training document and the start of the next in its shard
            words = source[-7:] + shard_words[(number + 3) % len(shard_words)][:7]
        elif kind == 2:  # 13 words of a training document around one of its longest words
            long = [i for i, word in enumerate(source[6:-6], start=6) if word in near] or [6]
            words = source[long[0] - 6 : long[0] + 7]
        else:
            words = rng.choices(vocabulary, k=rng.randint(5, 30))
        questions[f"d{number}"] = " ".join(near.get(word, word) for word in words)
    task = Task(
        "brute",
        Path("brute"),
        "acc_per_char",
        "per_char",
        [
            Document(i, native, {}, [Choice(f"{FEW_SHOT}Question: {question}?\nAnswer:", " it")], 0)
            for i, (native, question) in enumerate(questions.items())
        ],
    )
    table = str.maketrans(string.ascii_uppercase, string.ascii_lowercase, string.punctuation + "\x00")

    def ngrams(text: str) -> set[tuple[str, ...]]:
        words = text.translate(table).split()
        return {tuple(words[i : i + 13]) for i in range(len(words) - 12)}

    seen = set().union(*map(ngrams, training))
    texts = document_texts(task)
    expected = [doc_id for doc_id, text in texts if ngrams(text) & seen]
    short = sum(len(text.translate(table).split()) < 13 for _, text in texts)
    assert 5 < len(expected) < len(texts) - short - 5  # both kinds are there to tell apart
    assert any(longest in text for doc_id, text in texts if doc_id not in expected)
    for index in range(3):
        write_shard(tmp_path / f"part-a-{index}.jsonl.zst", training[index::3])
    monkeypatch.setattr("evaluation.decontaminate.BATCH_CHARS", 2_000)
    for workers in (0, 2):
        report = decontaminate(tmp_path, [task], workers=workers)["contamination"]["brute"]
        assert report == {"docs": 80, "contaminated": len(expected), "short": short, "ids": expected}


def test_short_documents_are_counted_not_checked(tmp_path):
    write_shard(tmp_path / "part-a-0.jsonl.zst", ["Question: How many legs? Answer: eight"])
    task = make_task("tiny", {"q-clean": "How many legs"})
    report = decontaminate(tmp_path, [task], workers=0)["contamination"]["tiny"]
    assert report == {"docs": 1, "contaminated": 0, "short": 1, "ids": []}


def test_training_side_is_streamed_in_bounded_memory(tmp_path):
    """Peak memory is the same for 4 shards as for 24: nothing of the training side accumulates."""
    rng = random.Random(2)
    text = [filler(rng, 20_000) for _ in range(4)]
    for index in range(24):
        write_shard(tmp_path / f"part-a-{index:02d}.jsonl.zst", text)
    peaks = []
    for count in (4, 24):
        paths = sorted(tmp_path.glob("*.jsonl.zst"))[:count]
        tracemalloc.start()
        decontaminate(paths, [make_task()], workers=0)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < peaks[0] * 1.2, peaks


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard files match"):
        decontaminate(str(tmp_path / "missing-*.jsonl.zst"), [make_task()])
    bad = tmp_path / "part-a-0.jsonl.zst"
    bad.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "fine"}\n{not json\n'))
    with pytest.raises(ShardError, match=r"part-a-0\.jsonl\.zst:2: malformed JSON"):
        decontaminate(tmp_path, [make_task()], workers=1)
    with pytest.raises(ValueError, match="no tasks"):
        decontaminate(tmp_path, [])


def test_real_corpus_chapter_is_found():
    """A chapter of a real shard's text, cut into a task document, is found in the real corpus."""
    corpus = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "raw" / "pile" / "00.jsonl.zst"
    if not corpus.is_file():
        pytest.skip("the shared corpus is not here")
    from data.readers import iter_decompressed

    first = b"".join(iter_decompressed(corpus)).split(b"\n", 1)[0]
    import orjson

    words = orjson.loads(first)["text"].split()[100:130]
    task = make_task("real", {"q-leak": " ".join(words[:25])})
    found = decontaminate(corpus, [task], workers=0)["contamination"]["real"]
    assert found["ids"] == ["q-leak"]


def test_evaluate_py_decontaminate_reports_the_leaked_documents(tmp_path, capsys):
    """`python evaluate.py --decontaminate GLOB --tasks ... --output FILE`: the JSON report and the table,
    with the document ids the task files give, and no model needed."""
    import json

    import evaluate
    from tests.helpers.eval_tasks import colour_documents, write_task

    # Questions long enough to hold a 13-gram (the colour questions alone are ten words).
    documents = [
        {**doc, "query": f"Question: {filler(random.Random(i), 14)} {doc['query'].removeprefix('Question ')}"}
        for i, doc in enumerate(colour_documents(20))
    ]
    task_root = tmp_path / "tasks"
    write_task(task_root, "colours", "rc_0shot", documents)
    leaked = documents[3]
    gold = leaked["choices"][leaked["gold"]]
    text = f"{leaked['query'].replace(chr(10), ' ')} {gold} and then some words nobody asked for"
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "part-web-0.jsonl.zst", [filler(random.Random(99), 100), text])
    out = tmp_path / "out" / "contamination.json"
    argv = ["--decontaminate", str(tmp_path / "shards" / "*.jsonl.zst"), "--tasks", "colours"]
    argv += ["--task_dir", str(task_root), "--output", str(out)]
    assert evaluate.main(argv) == 0
    report = json.loads(out.read_text())["contamination"]["colours"]
    assert report == {"docs": 20, "contaminated": 1, "short": 0, "ids": [leaked["id"]]}
    assert "colours" in capsys.readouterr().out
    # An empty glob is one line, exit 2, and nothing written.
    out.unlink()
    assert evaluate.main([*argv[:1], str(tmp_path / "none" / "*.zst"), *argv[2:]]) == 2
    assert not out.exists()
