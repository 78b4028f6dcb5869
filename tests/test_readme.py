"""The README cannot drift: every command in its code blocks names files that exist and flags that parse.

Each shell command of a ```bash block is checked without running anything heavy:

- `python X.py ...` and `accelerate launch [OPTIONS] X.py ...`: the script exists, every config file it
  names exists, and its arguments parse: the script's `main()` runs with those arguments until
  common.config.parse_config (every stage and tool parses with it; it also reads and checks the `--config`
  YAML against the config class) returns, then stops. accelerate's own options parse with accelerate's
  launch parser;
- `python -m MODULE`: the module can be found; `python -c CODE`: the code compiles and its imports resolve;
- `bash data/X.sh ...`: the file exists, `bash -n` accepts it and `--help` answers;
- `make X`: the Makefile has the target; `pip install -r F`: F exists;
- tools of other projects (EXTERNAL) are left alone; any other command fails, so a new kind gets a check.

Also: the first screen says what this is and gives `make demo` and `make test`; the stage commands are all
there; the Python blocks' imports resolve; links to files exist; the annotated file tree names real files.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import common.config

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
EXTERNAL = {"vllm", "lm_eval", "llama-cli", "curl"}  # other projects' tools, documented in docs/export.md
PYTHON = {"python", "python3", ".venv/bin/python"}

# The commands the README must show, stage by stage (a prefix of some command; `...` is any options).
STAGE_COMMANDS = [
    "make demo",
    "make test",
    "bash data/download_the_pile.sh",
    "bash data/download_wudao.sh",
    "python dataset/train_tokenizer.py",
    "accelerate launch ... pretrain_llama.py",
    "accelerate launch ... instruction_tuning.py",
    "accelerate launch ... preference_tuning.py",
    "python preference_tuning.py --config configs/dpo/demo.yaml",
    "python dataset/preference_pairs.py",
    "python chat_server.py",
    "python evaluate.py",
]


def code_blocks(language: str) -> list[str]:
    """The text of each fenced block whose info string is `language` ("" for a plain fence)."""
    blocks, current, info = [], None, ""
    for line in README.splitlines(keepends=True):
        fence = re.match(r"```(\w*)\s*$", line)
        if current is None and fence:
            current, info = [], fence[1]
        elif current is not None and fence and not fence[1]:
            if info == language:
                blocks.append("".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def shell_commands() -> list[str]:
    """Each command of the bash blocks: continuation lines joined, comments dropped, `&&` and `;` split."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            command: list[str] = []
            for word in [*words, "&&"]:
                if word in ("&&", ";"):
                    if command:
                        commands.append(shlex.join(command))
                    command = []
                elif command or not re.fullmatch(r"\w+=.*", word):  # leading VAR=value: the environment
                    command.append(word)
    return commands


COMMANDS = shell_commands()


class Parsed(BaseException):  # not an Exception: the scripts' `except` clauses must let it through
    """Stops a script's main() right after its parser has accepted the arguments."""


def check_config_files(args: list[str]) -> None:
    for arg in args:
        if re.fullmatch(r"configs/\S+\.ya?ml", arg):
            assert (REPO / arg).is_file(), f"{arg} does not exist"


def parse_like_the_script(script: str, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Run `script`'s main() with `args` until its parser returns; fail with its message if it refuses."""
    assert (REPO / script).is_file(), f"{script} does not exist"
    check_config_files(args)
    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    assert hasattr(module, "main"), f"{script} has no main() to parse its arguments"
    real_parse_config = common.config.parse_config

    def parse_config_then_stop(*a, **k):
        real_parse_config(*a, **k)
        raise Parsed

    monkeypatch.setattr(common.config, "parse_config", parse_config_then_stop)
    # `from common.config import parse_config` at the top of the script, or of the runner a stage script calls
    for holder in (module, importlib.import_module("training.runner")):
        if hasattr(holder, "parse_config"):
            monkeypatch.setattr(holder, "parse_config", parse_config_then_stop)
    monkeypatch.setattr(sys, "argv", [script, *args])
    try:
        code = module.main()
    except Parsed:
        return
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    pytest.fail(
        f"python {shlex.join([script, *args])}: the arguments do not parse (exit {code}): {err[-2000:]}"
    )


def check_python_code(code: str) -> None:
    """The code compiles, and every `from M import a, b` / `import M` in it resolves."""
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert importlib.util.find_spec(alias.name) is not None, f"no module {alias.name}"


def check_python(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    if args[0] == "-m":
        assert importlib.util.find_spec(args[1]) is not None, f"no module {args[1]}"
    elif args[0] == "-c":
        check_python_code(args[1])
    elif args[0].startswith(
        ".venv/"
    ):  # a third-party tool that `make setup` installs (llama.cpp's converter)
        assert re.search(rf"\b{re.escape(Path(args[0]).name)}\b", (REPO / "Makefile").read_text()), args[0]
    else:
        parse_like_the_script(args[0], args[1:], monkeypatch, capsys)


def check_accelerate(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from accelerate.commands.launch import launch_command_parser

    assert args[0] == "launch", f"accelerate {args[0]}: only `accelerate launch` is expected"
    try:
        launch = launch_command_parser().parse_args(args[1:])
    except SystemExit:
        pytest.fail(f"accelerate launch: its options do not parse: {capsys.readouterr().err[-2000:]}")
    if launch.config_file:
        assert (REPO / launch.config_file).is_file(), f"{launch.config_file} does not exist"
    parse_like_the_script(launch.training_script, launch.training_script_args, monkeypatch, capsys)


def check_bash(args: list[str]) -> None:
    script = REPO / args[0]
    assert script.is_file(), f"{args[0]} does not exist"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    helped = subprocess.run(
        ["bash", str(script), "--help"], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert helped.returncode == 0 and helped.stdout.strip(), helped.stderr


def makefile_has(target: str) -> bool:
    return (
        re.search(rf"^{re.escape(target)}:", (REPO / "Makefile").read_text(), flags=re.MULTILINE) is not None
    )


@pytest.mark.parametrize("command", COMMANDS, ids=[command[:100] for command in COMMANDS])
def test_readme_command(command: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    program, *args = shlex.split(command)
    if program in PYTHON:
        check_python(args, monkeypatch, capsys)
    elif program == "accelerate":
        check_accelerate(args, monkeypatch, capsys)
    elif program == "bash":
        check_bash(args)
    elif program == "make":
        for target in (arg for arg in args if "=" not in arg):
            assert makefile_has(target), f"the Makefile has no target {target}"
    elif program == "pip":
        for flag, value in itertools.pairwise(args):
            if flag == "-r":
                assert (REPO / value).is_file(), f"{value} does not exist"
    else:
        assert program in EXTERNAL, f"{program}: a command this test does not know how to check; add a check"


TOOLS = {  # each tool and the arguments before its --help
    "data/shard.py": [],
    "data/download.py": ["fetch"],
    "data/demo_corpus.py": [],
    "dataset/train_tokenizer.py": [],
    "dataset/preference_pairs.py": [],
    "dataset/pretrain_dataset.py": [],
    "chat_server.py": [],
    "evaluate.py": [],
}


@pytest.mark.parametrize("script", TOOLS)
def test_tools_answer_help_from_any_folder(script: str, tmp_path: Path) -> None:
    """Run from elsewhere, a tool finds the installed packages (no sys.path edits) and its --help names the
    aliases it accepts."""
    helped = subprocess.run(
        [sys.executable, str(REPO / script), *TOOLS[script], "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0 and "usage:" in helped.stdout, helped.stderr[-2000:]
    aliases = getattr(importlib.import_module(script.removesuffix(".py").replace("/", ".")), "ALIASES", {})
    unwrapped = "".join(helped.stdout.split())  # the help is wrapped, also at hyphens
    missing = [alias for alias in aliases if f"--{alias}isshortfor--{aliases[alias]}" not in unwrapped]
    assert not missing, helped.stdout


def test_readme_names_every_stage_command() -> None:
    def shown(expected: str) -> bool:
        pattern = "".join(
            r"(?:\S+\s+)*?" if word == "..." else re.escape(word) + r"(?:\s+|$)" for word in expected.split()
        )
        return any(re.match(pattern, command) for command in COMMANDS)

    missing = [expected for expected in STAGE_COMMANDS if not shown(expected)]
    assert not missing, f"the README's code blocks lack {missing}"


def test_first_screen_says_what_this_is_and_gives_the_two_commands() -> None:
    first_screen = "\n".join(README.splitlines()[:25])
    assert first_screen.startswith("# Open-Llama\n")
    assert re.search(r"^make demo\b", first_screen, flags=re.MULTILINE)
    assert re.search(r"^make test\b", first_screen, flags=re.MULTILINE)
    assert re.search(r"!\[[^\]]+\]\(\S+\.png\)", first_screen), "a picture on the first screen"


def test_make_targets_named_in_the_text_exist() -> None:
    for target in sorted(set(re.findall(r"`make (\w+)`", README))):
        assert makefile_has(target), f"the Makefile has no target {target}"


def test_python_blocks_compile_and_import() -> None:
    for block in code_blocks("python"):
        check_python_code(block)


def test_linked_files_exist() -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    missing = [link for link in links if "://" not in link and not (REPO / link).exists()]
    assert not missing, f"the README links to files that do not exist: {missing}"


def test_file_tree_names_real_files() -> None:
    """Each entry of the annotated tree exists, and so does each `name.py`/`name.sh` its note names in it."""
    files_section = README.split("\n## Files\n", 1)[-1]
    tree = re.search(r"^```\n(.*?)^```", files_section, flags=re.DOTALL | re.MULTILINE)[1]
    missing, folder = [], REPO
    for line in tree.splitlines():
        entry, _, note = line.partition("  ")
        if entry.strip():  # a new entry; a line starting with spaces continues the previous one's note
            folder = REPO / entry if entry.endswith("/") else REPO
            if not (REPO / entry).exists():
                missing.append(entry)
        missing += [
            f"{folder.relative_to(REPO)}/{name}"
            for name in re.findall(r"\b\w+\.(?:py|sh)\b", note)
            if folder != REPO and not (folder / name).exists()
        ]
    assert not missing, f"the README's file tree names what does not exist: {missing}"


@pytest.mark.parametrize(
    "command",
    [
        "python pretrain_llama.py --config configs/pretrain/demo.yaml --optim.lrr 3e-4",  # a misspelt key
        "python pretrain_llama.py --config configs/pretrain/missing.yaml",
        "python dataset/train_tokenizer.py --input shards --vocab-sise 8000 --output-dir tokenizer",
        "python data/missing.py --help",
        "accelerate launch --num_procs 2 pretrain_llama.py --config configs/pretrain/demo.yaml",
        "bash data/missing.sh",
        "make no_such_target",
        "wget https://example.com/x",
    ],
)
def test_the_checks_catch_drift(command: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    with pytest.raises((pytest.fail.Exception, AssertionError)):
        test_readme_command(command, monkeypatch, capsys)
