"""The README's commands keep working: every script it runs answers --help, and every file it names exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
CODE_LINES = [
    line.strip()
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    for line in block.splitlines()
    if line.strip() and not line.strip().startswith("#")
]
SCRIPTS = sorted({m for line in CODE_LINES for m in re.findall(r"(?:python|bash) (\S+\.(?:py|sh))", line)})
CONFIG_FILES = sorted({m for line in CODE_LINES for m in re.findall(r"(configs/\S+\.yaml)", line)})


def test_the_readme_names_the_stage_commands() -> None:
    assert {"data/shard.py", "dataset/train_tokenizer.py", "pretrain_llama.py"} <= set(SCRIPTS)
    assert "configs/accelerate/deepspeed_zero1.yaml" in CONFIG_FILES


@pytest.mark.parametrize("script", SCRIPTS)
def test_readme_script_answers_help(script: str) -> None:
    runner = ["bash"] if script.endswith(".sh") else [sys.executable]
    result = subprocess.run(
        [*runner, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()


@pytest.mark.parametrize("path", CONFIG_FILES + re.findall(r"\]\((docs/[^)]+)\)", README))
def test_files_named_by_the_readme_exist(path: str) -> None:
    assert (REPO / path).is_file(), path


def test_make_targets_named_by_the_readme_exist() -> None:
    makefile = (REPO / "Makefile").read_text()
    for target in sorted(set(re.findall(r"`make (\w+)`", README)) | {"test", "demo", "setup"}):
        assert re.search(rf"^{target}:", makefile, flags=re.MULTILINE), target
