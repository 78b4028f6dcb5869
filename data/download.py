"""Resumable, verified downloads for the corpora, and WuDao archive extraction.

    python data/download.py fetch URL... --output_dir DIR [--sha256 HEX] [--checksums FILE_OR_URL]
    python data/download.py pile --output_dir DIR          # PILE_BASE_URL, PILE_PARTS
    python data/download.py wudao SOURCE --output_dir DIR  # SOURCE: URL, archive or folder

A download goes to `NAME.part` and is renamed to `NAME` only after its size and (when known) its
sha256 have been checked. An interrupted download resumes with an HTTP Range request; a server that
ignores Range and answers 200 restarts the file from zero instead of appending to it. Failures are
retried a bounded number of times with exponential backoff; a checksum mismatch is an error that
deletes the partial file and leaves no final file.

Expected checksums come from `--sha256`, a checksum list in `sha256sum` format (`--checksums`, a path
or URL), or the server: Hugging Face sends the sha256 of large files in `X-Linked-Etag`.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from jsonargparse.typing import NonNegativeInt, PositiveFloat

from common.config import ConfigError, parse_config

PILE_BASE_URL = "https://huggingface.co/datasets/monology/pile-uncopyrighted/resolve/main/train/"
PILE_PARTS = [f"{i:02d}" for i in range(30)]
WUDAO_HELP = """WuDaoCorpora 2.0 needs you to accept its licence before downloading:
  1. Sign in at https://data.baai.ac.cn/details/WuDaoCorporaText (BAAI) and accept the agreement.
  2. Download WuDaoCorpus2.0_base_200G.rar there (or copy the link the site gives you).
  3. Run one of:
       bash data/download_wudao.sh OUT_DIR /path/to/WuDaoCorpus2.0_base_200G.rar
       bash data/download_wudao.sh OUT_DIR 'https://...the download link...'
       bash data/download_wudao.sh OUT_DIR /path/to/folder/of/json/files
     (or set WUDAO_SOURCE instead of the second argument).
Extracting .rar needs an unrar backend: apt-get install unrar (or libarchive-tools for bsdtar)."""
CHUNK_BYTES = 1 << 20
USER_AGENT = "open-llama-downloader/1.0"
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


class DownloadError(Exception):
    """A download that cannot complete (HTTP error, retries exhausted, size or checksum mismatch)."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) from a Content-Range header such as 'bytes 100-199/1000' or 'bytes */1000'."""
    match = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _linked_sha256(headers) -> str | None:
    """The sha256 Hugging Face sends for large files (X-Linked-Etag), if the response has one."""
    value = (headers.get("X-Linked-Etag") or "").strip().strip('"').removeprefix("W/").strip('"')
    return value.lower() if _HEX64.match(value) else None


def download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download `url` to `dest`, resuming `dest.part`; returns `dest` once size and checksum match.

    `retries` bounds the consecutive failed attempts (an attempt that received data resets the count);
    the wait doubles from `backoff` seconds. An existing `dest` is kept (and checked if `sha256` is given).
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    expected = sha256.lower() if sha256 else None
    if dest.exists():
        if expected and _sha256_file(dest) != expected:
            raise DownloadError(
                f"{dest}: exists but its sha256 does not match {expected}; delete it to download again"
            )
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    # The largest .part size seen: only growth beyond it resets the failure count, so a server that
    # keeps failing gets exactly `retries` retries.
    best = part.stat().st_size if part.exists() else 0
    total: int | None = None
    while True:
        offset = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        received = 0
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                expected = expected or _linked_sha256(response.headers)
                if response.status == 206:
                    start, total = _content_range(response.headers.get("Content-Range"))
                    if start != offset:
                        raise DownloadError(f"{url}: server resumed at byte {start}, asked for {offset}")
                    mode = "ab"
                else:  # 200: the whole file, also when the server ignored our Range header
                    if offset:
                        _log(f"{url}: server ignored the range request; restarting from zero")
                    offset, mode = 0, "wb"
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                with open(part, mode) as out:
                    while chunk := response.read(CHUNK_BYTES):
                        out.write(chunk)
                        received += len(chunk)
                        if progress is not None:
                            progress(offset + received, total)
            size = part.stat().st_size
            if total is not None and size < total:
                raise ConnectionError(f"connection closed at byte {size} of {total}")
            if total is not None and size > total:
                part.unlink()
                raise DownloadError(f"{url}: received {size} bytes, more than the announced {total}")
            break
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:
                # Nothing left to send: either the part file is complete or it is longer than the file.
                _, total = _content_range(exc.headers.get("Content-Range"))
                if total == offset:
                    break
                part.unlink()
                failures += 1
            elif exc.code in (408, 429) or exc.code >= 500:
                failures += 1
            else:
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
            if failures > retries:
                raise DownloadError(
                    f"{url}: HTTP {exc.code} {exc.reason} ({retries} retries failed)"
                ) from exc
        except (OSError, http.client.HTTPException) as exc:  # URLError, resets, IncompleteRead, timeouts
            size = part.stat().st_size if part.exists() else 0
            failures = 0 if size > best else failures + 1
            best = max(best, size)
            if failures > retries:
                raise DownloadError(f"{url}: {exc} (gave up after {retries} retries)") from exc
            _log(f"{url}: {exc}; retrying from byte {size}")
        time.sleep(min(backoff * 2 ** max(failures - 1, 0), 60.0))
    if expected:
        actual = _sha256_file(part)
        if actual != expected:
            part.unlink()
            raise DownloadError(
                f"{url}: sha256 mismatch (expected {expected}, got {actual}); the partial file was removed"
            )
    os.replace(part, dest)
    return dest


def read_checksums(source: str) -> dict[str, str]:
    """{file name: sha256} from a `sha256sum`-format list (path or URL)."""
    if re.match(r"^https?://", source):
        with urllib.request.urlopen(urllib.request.Request(source, headers={"User-Agent": USER_AGENT})) as r:
            text = r.read().decode("utf-8")
    else:
        text = Path(source).read_text(encoding="utf-8")
    sums = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and _HEX64.match(fields[0]):
            sums[Path(fields[-1].lstrip("*")).name] = fields[0].lower()
    return sums


def _progress_bar(name: str):
    from tqdm import tqdm

    bar = tqdm(desc=name, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, mininterval=0.5)

    def update(done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return bar, update


def fetch_all(
    urls: list[str],
    output_dir: Path,
    *,
    checksums: dict[str, str] | None = None,
    sha256: str | None = None,
    **kwargs,
) -> list[Path]:
    """Download each URL into `output_dir` under its file name; checksums looked up by file name."""
    paths = []
    for url in urls:
        name = Path(urllib.request.url2pathname(url.split("?")[0])).name
        bar, update = _progress_bar(name)
        try:
            expected = sha256 or (checksums or {}).get(name)
            paths.append(download(url, output_dir / name, sha256=expected, progress=update, **kwargs))
        finally:
            bar.close()
    return paths


def pile_urls(base_url: str | None = None, parts: str | list[str] | None = None) -> list[str]:
    """The Pile part URLs: PILE_BASE_URL (default: the Hugging Face mirror) + NN.jsonl.zst for PILE_PARTS."""
    base = base_url or os.environ.get("PILE_BASE_URL") or PILE_BASE_URL
    if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", base):  # a local folder (a mounted copy of the parts)
        base = Path(base).resolve().as_uri()
    parts = parts or os.environ.get("PILE_PARTS") or PILE_PARTS
    if isinstance(parts, str):
        parts = parts.split()
    return [f"{base.rstrip('/')}/{part}.jsonl.zst" for part in parts]


# --- WuDao ----------------------------------------------------------------------------------------


def _safe_target(root: Path, member: str) -> Path | None:
    """Where an archive member goes under `root`, or None for absolute/parent-escaping names."""
    target = (root / member).resolve()
    return target if target.is_relative_to(root.resolve()) else None


def extract_json_files(archive: Path, output_dir: Path) -> list[Path]:
    """Extract the .json files of a rar/zip/tar archive into `output_dir` (resumable: each file is
    written to a temporary name and renamed; files already there with the right size are skipped)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    name = archive.name.lower()
    if name.endswith(".rar"):
        import rarfile

        try:
            rarfile.tool_setup()
        except rarfile.RarCannotExec as exc:
            raise DownloadError(
                f"{archive}: extracting .rar needs the unrar, unar, 7z or bsdtar program "
                "(apt-get install unrar, or apt-get install libarchive-tools); or extract it yourself "
                "and pass the folder"
            ) from exc
        handle = rarfile.RarFile(archive)
        members = [(m.filename, m.file_size, m) for m in handle.infolist() if not m.is_dir()]
    elif name.endswith(".zip"):
        handle = zipfile.ZipFile(archive)
        members = [(m.filename, m.file_size, m) for m in handle.infolist() if not m.is_dir()]
    elif tarfile.is_tarfile(archive):
        handle = tarfile.open(archive)  # noqa: SIM115 (closed by the with-block below)
        members = [(m.name, m.size, m) for m in handle.getmembers() if m.isfile()]
    else:
        raise DownloadError(f"{archive}: not a rar, zip or tar archive")
    extracted = []
    with handle:
        for member_name, size, member in members:
            if not member_name.lower().endswith(".json"):
                continue
            target = _safe_target(output_dir, member_name)
            if target is None:
                _log(f"{archive}: skipping unsafe member name {member_name!r}")
                continue
            if not (target.exists() and target.stat().st_size == size):
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".part")
                source = (
                    handle.extractfile(member) if isinstance(handle, tarfile.TarFile) else handle.open(member)
                )
                with source, open(tmp, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK_BYTES)
                os.replace(tmp, target)
            extracted.append(target)
    if not extracted:
        raise DownloadError(f"{archive}: no .json files inside")
    return extracted


def prepare_wudao(source: str, output_dir: Path, **kwargs) -> Path:
    """WuDao JSON files (a folder, or one file) from a URL, a local archive, or a folder/file as is."""
    if re.match(r"^https?://", source):
        archive = fetch_all([source], output_dir / "download", **kwargs)[0]
    else:
        archive = Path(source)
        if archive.is_dir():
            return archive
        if not archive.exists():
            raise DownloadError(f"{source}: no such file or folder")
    if archive.name.lower().endswith(".json"):
        return archive
    extract_json_files(archive, output_dir / "json")
    return output_dir / "json"


# --- command line ---------------------------------------------------------------------------------


@dataclass
class DownloadConfig:
    """Download resumably and verified (fetch URL..., pile) or get WuDao's JSON files (wudao SOURCE)."""

    sources: list[str] = field(default_factory=list)
    """The arguments after the command: fetch: the URLs; wudao: a URL, archive or folder (default: the
    WUDAO_SOURCE environment variable); pile: none (PILE_BASE_URL, PILE_PARTS)."""
    output_dir: str = ""
    """Where the downloads go (required)."""
    sha256: str | None = None
    """Expected sha256 (one URL only)."""
    checksums: str | None = None
    """A sha256sum-format list, path or URL (e.g. SHA256SUMS.txt)."""
    retries: NonNegativeInt = 5
    """Consecutive failures allowed."""
    timeout: PositiveFloat = 60.0
    """Seconds per network read."""

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("give the folder for the downloads: --output_dir DIR")


PROG = "data/download.py"
COMMANDS = {
    "fetch": "download URLs (resumable, verified)",
    "pile": "download The Pile parts (PILE_BASE_URL, PILE_PARTS)",
    "wudao": "get WuDao JSON files from a URL, archive or folder",
}
ALIASES = {"output-dir": "output_dir"}  # the dash spelling, the usual style of command-line tools
USAGE = (
    f"usage: {PROG} {{{','.join(COMMANDS)}}} [SOURCE...] --output_dir DIR [OPTIONS]; {PROG} COMMAND --help"
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        about = __doc__.split("\n\n")[0]
        commands = "\n".join(f"  {name:6} {text}" for name, text in COMMANDS.items())
        print(f"{USAGE}\n\n{about}\n\n{commands}", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, argv = argv[0], argv[1:]
    try:
        if command not in COMMANDS:
            raise ConfigError(f"unknown command {command!r}; the commands: {', '.join(COMMANDS)}")
        config = parse_config(
            DownloadConfig, argv, aliases=ALIASES, prog=f"{PROG} {command}", positional="sources"
        )
        sources = config.sources
        if command == "fetch" and not sources:
            raise ConfigError("fetch: give the URLs to download")
        if command == "pile" and sources:
            raise ConfigError(f"pile takes no URLs (PILE_BASE_URL and PILE_PARTS choose them), got {sources}")
        if command == "wudao" and len(sources) > 1:
            raise ConfigError(f"wudao takes one source (a URL, archive or folder), got {sources}")
        if config.sha256 and (command == "pile" or len(sources) > 1):
            raise ConfigError("--sha256 applies to one URL; use --checksums for several")
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    output_dir = Path(config.output_dir)
    try:
        options = {
            "checksums": read_checksums(config.checksums) if config.checksums else None,
            "sha256": config.sha256,
            "retries": config.retries,
            "timeout": config.timeout,
        }
        if command == "fetch":
            fetch_all(sources, output_dir, **options)
        elif command == "pile":
            fetch_all(pile_urls(), output_dir, **options)
        else:
            source = sources[0] if sources else os.environ.get("WUDAO_SOURCE")
            if not source:
                print(WUDAO_HELP, file=sys.stderr)
                return 2
            print(prepare_wudao(source, output_dir, **options))
    except (DownloadError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
