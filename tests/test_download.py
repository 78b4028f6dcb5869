"""Downloads against a local HTTP server: resume with Range, servers ignoring Range, checksums, retries."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import zstandard

from data.download import (
    PILE_BASE_URL,
    DownloadError,
    download,
    extract_json_files,
    main,
    pile_urls,
    prepare_wudao,
    read_checksums,
)
from data.shard_io import iter_shard_records

REPO = Path(__file__).resolve().parent.parent
PAYLOAD = os.urandom(300_000)


class Handler(BaseHTTPRequestHandler):
    """Serves `server.files` by path; `server.modes[path]` picks a misbehaviour:

    drop: the first request sends half the body then closes the connection (later ones honour Range);
    ignore-range: always answers 200 with the whole body; fail: always 500; etag: sends X-Linked-Etag.
    """

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        body = server.files.get(self.path)
        mode = server.modes.get(self.path, "normal")
        if body is None:
            self.send_error(404)
            return
        if mode == "fail":
            self.send_error(500)
            return
        start = 0
        match = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and mode != "ignore-range":
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if mode == "etag":
            self.send_header("X-Linked-Etag", f'"{server.etags[self.path]}"')
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if mode == "drop" and not server.dropped.get(self.path):
            server.dropped[self.path] = True
            self.wfile.write(body[start : start + (len(body) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.modes, httpd.requests, httpd.dropped, httpd.etags = {}, {}, [], {}, {}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_normal_download_with_checksum(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    path = download(f"{server.url}/f.bin", tmp_path / "f.bin", sha256=sha(PAYLOAD), backoff=0)
    assert path.read_bytes() == PAYLOAD and not (tmp_path / "f.bin.part").exists()
    # A finished file is not downloaded again.
    download(f"{server.url}/f.bin", tmp_path / "f.bin", sha256=sha(PAYLOAD), backoff=0)
    assert len(server.requests) == 1


def test_dropped_connection_resumes_with_range(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    server.modes["/f.bin"] = "drop"
    path = download(f"{server.url}/f.bin", tmp_path / "f.bin", sha256=sha(PAYLOAD), backoff=0)
    assert path.read_bytes() == PAYLOAD
    assert server.requests[0] == ("/f.bin", None)
    assert server.requests[1] == ("/f.bin", f"bytes={len(PAYLOAD) // 2}-")


def test_existing_part_file_is_resumed(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:1000])
    assert download(f"{server.url}/f.bin", tmp_path / "f.bin", backoff=0).read_bytes() == PAYLOAD
    assert server.requests == [("/f.bin", "bytes=1000-")]


def test_complete_part_file_answered_416(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD)
    assert download(f"{server.url}/f.bin", tmp_path / "f.bin", backoff=0).read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    server.modes["/f.bin"] = "ignore-range"
    (tmp_path / "f.bin.part").write_bytes(b"stale bytes that must not stay in front")
    path = download(f"{server.url}/f.bin", tmp_path / "f.bin", sha256=sha(PAYLOAD), backoff=0)
    assert path.read_bytes() == PAYLOAD


def test_checksum_mismatch_leaves_no_file(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download(f"{server.url}/f.bin", tmp_path / "f.bin", sha256="0" * 64, backoff=0)
    assert list(tmp_path.iterdir()) == []


def test_server_checksum_header_is_checked(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    server.modes["/f.bin"] = "etag"
    server.etags["/f.bin"] = "1" * 64
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download(f"{server.url}/f.bin", tmp_path / "f.bin", backoff=0)
    server.etags["/f.bin"] = sha(PAYLOAD)
    assert download(f"{server.url}/f.bin", tmp_path / "f.bin", backoff=0).read_bytes() == PAYLOAD


def test_http_errors(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server.url}/missing", tmp_path / "m", backoff=0)
    assert len(server.requests) == 1  # not retried
    server.files["/broken"] = PAYLOAD
    server.modes["/broken"] = "fail"
    with pytest.raises(DownloadError, match=r"HTTP 500.*2 retries"):
        download(f"{server.url}/broken", tmp_path / "b", retries=2, backoff=0)
    assert len(server.requests) == 1 + 3
    assert not (tmp_path / "b").exists()


def test_retries_are_bounded_with_exponential_backoff(server, tmp_path, monkeypatch):
    import data.download as download_module

    waits: list[float] = []
    monkeypatch.setattr(download_module.time, "sleep", waits.append)
    server.files["/broken"] = PAYLOAD
    server.modes["/broken"] = "fail"
    with pytest.raises(DownloadError, match="3 retries"):
        download(f"{server.url}/broken", tmp_path / "b", retries=3, backoff=0.5)
    assert waits == [0.5, 1.0, 2.0] and len(server.requests) == 4

    # A refused connection (nothing listening) is retried the same way, then reported.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    waits.clear()
    with pytest.raises(DownloadError, match="gave up after 2 retries"):
        download(f"http://127.0.0.1:{closed_port}/x", tmp_path / "x", retries=2, backoff=0.5)
    assert waits == [0.5, 1.0]
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists()


def test_pile_urls_default_mirror_and_overrides(monkeypatch):
    monkeypatch.delenv("PILE_BASE_URL", raising=False)
    monkeypatch.delenv("PILE_PARTS", raising=False)
    urls = pile_urls()
    assert (
        len(urls) == 30 and urls[0] == PILE_BASE_URL + "00.jsonl.zst" and urls[-1].endswith("/29.jsonl.zst")
    )
    assert PILE_BASE_URL.startswith("https://")
    monkeypatch.setenv("PILE_BASE_URL", "http://mirror.example/pile")
    monkeypatch.setenv("PILE_PARTS", "03 17")
    assert pile_urls() == [
        "http://mirror.example/pile/03.jsonl.zst",
        "http://mirror.example/pile/17.jsonl.zst",
    ]
    monkeypatch.setenv("PILE_BASE_URL", "/data/pile/train/")  # a local folder: a file:// URL
    assert pile_urls() == ["file:///data/pile/train/03.jsonl.zst", "file:///data/pile/train/17.jsonl.zst"]


def test_checksum_list_and_cli(server, tmp_path):
    server.files["/a.bin"], server.files["/b.bin"] = PAYLOAD, PAYLOAD[::-1]
    sums = tmp_path / "SHA256SUMS.txt"
    sums.write_text(f"{sha(PAYLOAD)}  a.bin\n{'2' * 64} *sub/b.bin\n")
    assert read_checksums(str(sums)) == {"a.bin": sha(PAYLOAD), "b.bin": "2" * 64}
    out = tmp_path / "out"
    argv = [
        "fetch",
        f"{server.url}/a.bin",
        f"{server.url}/b.bin",
        "--output-dir",
        str(out),
        "--checksums",
        str(sums),
    ]
    assert main(argv) == 1  # b.bin does not match its listed checksum
    assert (out / "a.bin").read_bytes() == PAYLOAD and not (out / "b.bin").exists()


def make_pile_part(records: list[dict]) -> bytes:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    return zstandard.ZstdCompressor(level=3).compress(data)


def run_pile_script(out_dir: str, cwd: Path | None = None, **env_vars: str) -> list[str]:
    """`bash data/download_the_pile.sh OUT_DIR` with these variables; the texts of the shards it made."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"} | {"SHARD_WORKERS": "1", **env_vars}
    script = REPO / "data" / "download_the_pile.sh"
    result = subprocess.run(
        ["bash", str(script), out_dir], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    shards = sorted((Path(cwd or ".") / out_dir / "shards").glob("part-pile-*.jsonl.zst"))
    return [r["text"] for p in shards for r in iter_shard_records(p)]


def test_download_the_pile_script(server, tmp_path):
    """The user's command end to end: parts from PILE_BASE_URL/PILE_PARTS, then shards."""
    for part in ("00", "01"):
        docs = [{"text": f"part {part} doc {i}", "meta": {"pile_set_name": "Test"}} for i in range(30)]
        server.files[f"/pile/train/{part}.jsonl.zst"] = make_pile_part(docs)
    texts = run_pile_script(
        str(tmp_path / "pile"), PILE_BASE_URL=f"{server.url}/pile/train/", PILE_PARTS="00 01"
    )
    assert len(texts) == 60 and texts[0] == "part 00 doc 0"
    assert (
        json.loads((tmp_path / "pile" / "shards" / "manifest.json").read_text())["totals"]["documents"] == 60
    )


def test_download_the_pile_script_from_elsewhere_with_a_local_mirror_folder(tmp_path):
    """Run from another folder, with PILE_BASE_URL a folder path relative to it (a mounted copy)."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    docs = [{"text": f"local doc {i}", "meta": {"pile_set_name": "Test"}} for i in range(5)]
    (mirror / "07.jsonl.zst").write_bytes(make_pile_part(docs))
    texts = run_pile_script("out", cwd=tmp_path, PILE_BASE_URL="mirror", PILE_PARTS="07")
    assert texts == [d["text"] for d in docs]


def wudao_json(n: int) -> bytes:
    rows = [{"id": i, "dataType": "百科", "title": f"题{i}", "content": f"内容{i}"} for i in range(n)]
    return ("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]").encode()


def test_wudao_without_source_prints_instructions(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "WUDAO_SOURCE"}
    result = subprocess.run(
        ["bash", str(REPO / "data" / "download_wudao.sh"), str(tmp_path / "w")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "data.baai.ac.cn" in result.stderr and "download_wudao.sh OUT_DIR" in result.stderr


def test_wudao_archives_and_url(server, tmp_path):
    zip_path = tmp_path / "wudao.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("WuDao/part-0.json", wudao_json(3))
        zf.writestr("WuDao/readme.txt", "not data")
        zf.writestr("../evil.json", "[]")
    files = extract_json_files(zip_path, tmp_path / "z")
    assert [p.relative_to(tmp_path / "z").as_posix() for p in files] == ["WuDao/part-0.json"]
    assert not (tmp_path / "evil.json").exists()

    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:gz") as tf:
        info = tarfile.TarInfo("part-1.json")
        data = wudao_json(2)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    server.files["/wudao.tar.gz"] = tar_bytes.getvalue()
    folder = prepare_wudao(f"{server.url}/wudao.tar.gz", tmp_path / "t", backoff=0)
    assert (folder / "part-1.json").read_bytes() == data

    result = subprocess.run(
        ["bash", str(REPO / "data" / "download_wudao.sh"), str(tmp_path / "w"), str(zip_path)],
        env={**os.environ, "SHARD_WORKERS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    texts = [
        r["text"]
        for p in (tmp_path / "w" / "shards").glob("part-wudao-*.jsonl.zst")
        for r in iter_shard_records(p)
    ]
    assert texts == ["题0\n内容0", "题1\n内容1", "题2\n内容2"]


def test_rar_without_backend_says_what_to_install(tmp_path):
    import rarfile

    try:
        rarfile.tool_setup()
        pytest.skip("an unrar backend is installed here")
    except rarfile.RarCannotExec:
        pass
    fake = tmp_path / "x.rar"
    fake.write_bytes(b"Rar!\x1a\x07\x00" + b"\x00" * 20)
    with pytest.raises(DownloadError, match="unrar"):
        extract_json_files(fake, tmp_path / "out")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "data" / "download.py"),
            "wudao",
            str(fake),
            "--output-dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        result.returncode == 1
        and "apt-get install unrar" in result.stderr
        and "Traceback" not in result.stderr
    )
