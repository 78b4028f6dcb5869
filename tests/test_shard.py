"""The sharder: formats, normalisation, filters, bad input, resume after kill -9, determinism, real data."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data.shard import DROP_REASONS, LINES_PER_SHARD, shard_inputs
from data.shard import main as shard_main
from data.shard_io import ShardError, iter_shard_records
from tests.helpers.shards import make_corpus, shard_hashes

REPO = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, records: list, compress: str | None = None) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    return write_bytes(path, data, compress)


def write_bytes(path: Path, data: bytes, compress: str | None = None) -> Path:
    if compress == "zst":
        data = zstandard.ZstdCompressor(level=3).compress(data)
    elif compress == "gz":
        data = gzip.compress(data)
    elif compress == "bz2":
        data = bz2.compress(data)
    elif compress == "xz":
        data = lzma.compress(data)
    path.write_bytes(data)
    return path


def read_docs(output_dir: Path) -> list[dict]:
    """Every document of every shard in manifest (input) order, read with the project's shard reader."""
    manifest = json.loads((output_dir / "manifest.json").read_text())
    assert sorted(s["name"] for s in manifest["shards"]) == sorted(p.name for p in output_dir.glob("part-*"))
    return [r for s in manifest["shards"] for r in iter_shard_records(output_dir / s["name"])]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "data" / "shard.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def pile_docs(n: int, prefix: str = "doc") -> list[dict]:
    return [{"text": f"{prefix} {i}", "meta": {"pile_set_name": "Test"}} for i in range(n)]


# --- shard sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "expected"), [(LINES_PER_SHARD, [LINES_PER_SHARD]), (LINES_PER_SHARD + 1, [LINES_PER_SHARD, 1])]
)
def test_shard_boundaries(tmp_path, n, expected):
    src = write_jsonl(tmp_path / "in.jsonl", pile_docs(n))
    summary = shard_inputs([src], tmp_path / "out")
    assert [s["lines"] for s in summary.manifest["shards"]] == expected
    docs = read_docs(tmp_path / "out")
    assert [d["text"] for d in docs] == [f"doc {i}" for i in range(n)]
    assert docs[0]["meta"] == {"pile_set_name": "Test", "source": "pile"}  # derived from pile_set_name
    for entry, path in zip(summary.manifest["shards"], summary.shards, strict=True):
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_shards_are_standard_zstd(tmp_path):
    """The zstd command-line tool (a reader we did not write) accepts the shards, checksums included."""
    if shutil.which("zstd") is None:
        pytest.skip("zstd command-line tool not installed (apt-get install zstd)")
    src = write_jsonl(tmp_path / "in.jsonl", pile_docs(300))
    summary = shard_inputs([src], tmp_path / "out", lines_per_shard=100)
    for path in summary.shards:
        out = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
        assert len(out.splitlines()) == 100


# --- normalisation of each format ------------------------------------------------------------------


def test_wudao_json_arrays(tmp_path):
    records = [
        {
            "id": 0,
            "uniqueKey": "a",
            "titleUkey": "b",
            "dataType": "百科",
            "title": "标题",
            "content": "正文一",
        },
        {"id": 1, "uniqueKey": "c", "titleUkey": "d", "dataType": "诗词", "title": "", "content": "正文二"},
    ]
    (tmp_path / "in").mkdir()
    compact = tmp_path / "in" / "part-0.json"
    compact.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n")
    pretty = tmp_path / "in" / "part-1.json"  # one object over many lines: still parsed incrementally
    pretty.write_text(json.dumps([{**records[0], "content": "正文三"}], ensure_ascii=False, indent=2))
    summary = shard_inputs([tmp_path / "in"], tmp_path / "out", fmt="wudao")
    docs = read_docs(tmp_path / "out")
    assert [d["text"] for d in docs] == ["标题\n正文一", "正文二", "标题\n正文三"]
    assert [d["meta"] for d in docs] == [
        {"dataType": "百科", "source": "wudao"},
        {"dataType": "诗词", "source": "wudao"},
        {"dataType": "百科", "source": "wudao"},
    ]
    assert summary.totals["documents"] == 3
    # auto-detection gives the same result
    assert read_docs(tmp_path / "out") == read_docs(
        shard_inputs([tmp_path / "in"], tmp_path / "auto").output_dir
    )


def test_parquet_input(tmp_path):
    table = pa.table(
        {"text": ["alpha", "beta", "", "gamma"], "id": [1, 2, 3, 4], "url": ["u1", "u2", "u3", "u4"]}
    )
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=2)
    summary = shard_inputs([tmp_path / "data.parquet"], tmp_path / "out")
    docs = read_docs(tmp_path / "out")
    assert [d["text"] for d in docs] == ["alpha", "beta", "gamma"]
    assert docs[0]["meta"] == {"id": 1, "url": "u1", "source": "data"}
    assert summary.totals["empty"] == 1


def test_text_units(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text("first para\nline two\n\n\nsecond para\r\n\nthird\n")
    lines = shard_inputs([src], tmp_path / "lines", text_unit="line")
    assert [d["text"] for d in read_docs(tmp_path / "lines")] == [
        "first para",
        "line two",
        "second para",
        "third",
    ]
    assert lines.totals["empty"] == 3
    shard_inputs([src], tmp_path / "paras", text_unit="paragraph")
    assert [d["text"] for d in read_docs(tmp_path / "paras")] == [
        "first para\nline two",
        "second para",
        "third",
    ]
    shard_inputs([src], tmp_path / "file", text_unit="file")
    assert [d["text"] for d in read_docs(tmp_path / "file")] == [src.read_bytes().decode()]


@pytest.mark.parametrize("compress", ["zst", "gz", "bz2", "xz"])
def test_compressed_inputs_read_like_plain(tmp_path, compress):
    records = [*pile_docs(50), {"text": "中文 ünïcode"}]
    (tmp_path / "plain").mkdir()
    plain = write_jsonl(tmp_path / "plain" / "x.jsonl", records)
    packed = write_jsonl(tmp_path / f"x.jsonl.{compress}", records, compress)
    shard_inputs([plain], tmp_path / "a")
    shard_inputs([packed], tmp_path / "b")
    assert read_docs(tmp_path / "a") == read_docs(tmp_path / "b")
    assert len(read_docs(tmp_path / "b")) == 51


# --- filters ---------------------------------------------------------------------------------------


def test_empty_length_bounds_and_dedup(tmp_path):
    a = write_jsonl(
        tmp_path / "a.jsonl", [{"text": t} for t in ["keep one", "", "  \n\t", "dup", "x", "dup", "y" * 50]]
    )
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in ["dup", "keep two", "keep one"]])
    summary = shard_inputs([a, b], tmp_path / "out", source="t", min_chars=2, max_chars=20)
    assert [d["text"] for d in read_docs(tmp_path / "out")] == ["keep one", "dup", "keep two"]
    t = summary.totals
    assert (t["records"], t["documents"], t["empty"], t["too_short"], t["too_long"], t["duplicate"]) == (
        10,
        3,
        2,
        1,
        1,
        3,
    )
    per_input = {Path(i["path"]).name: i for i in summary.manifest["inputs"]}
    assert per_input["a.jsonl"]["duplicate"] == 1 and per_input["b.jsonl"]["duplicate"] == 2
    kept = shard_inputs([a, b], tmp_path / "all", dedup=False)
    assert kept.totals["duplicate"] == 0 and kept.totals["documents"] == 8


def test_cross_file_duplicate_whose_shard_empties(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "same"}, {"text": "other"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "same"}, {"text": "other"}, {"text": "new"}])
    summary = shard_inputs([a, b], tmp_path / "out", lines_per_shard=2)
    assert [d["text"] for d in read_docs(tmp_path / "out")] == ["same", "other", "new"]
    assert [s["name"] for s in summary.manifest["shards"]] == [
        "part-a-00000-00000.jsonl.zst",
        "part-b-00001-00001.jsonl.zst",
    ]


# --- bad input -------------------------------------------------------------------------------------


def test_malformed_lines_and_missing_fields(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(
        b'{"text": "good"}\n{"text": broken\n[1, 2]\n\n{"body": "x", "id": 3}\n{"text": 5}\n{"text": "end"}\n'
    )
    summary = shard_inputs([src], tmp_path / "out")
    assert [d["text"] for d in read_docs(tmp_path / "out")] == ["good", "end"]
    t = summary.totals
    assert (t["records"], t["malformed"], t["missing_text"], t["documents"]) == (6, 2, 2, 2)
    assert t["records"] - t["documents"] == sum(t[reason] for reason in DROP_REASONS)  # every drop counted
    examples = summary.manifest["inputs"][0]["examples"]
    assert examples[0].startswith(f"{src}:2: malformed JSON")
    assert examples[1].startswith(f"{src}:3: expected a JSON object")
    assert examples[2] == f"{src}:5: no 'text' field (fields found: body, id)"
    assert "is int, not a string" in examples[3]

    result = run_cli(str(src), "--output-dir", str(tmp_path / "strict"), "--strict", "--no-progress")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {src}:2: malformed JSON (" + result.stderr.split("(", 1)[1].strip()
    ]
    assert "Traceback" not in result.stderr


def test_invalid_utf8_replaced_and_counted(tmp_path):
    src = tmp_path / "u.jsonl"
    src.write_bytes(b'{"text": "caf\xe9 ok"}\n{"text": "lone \\ud800 surrogate"}\n{"text": "fine"}\n')
    txt = write_bytes(tmp_path / "t.txt", b"good line\nbad \xff\xfe line\n")
    summary = shard_inputs([src, txt], tmp_path / "out")
    texts = [d["text"] for d in read_docs(tmp_path / "out")]
    assert texts == ["caf\ufffd ok", "lone \ufffd surrogate", "fine", "good line", "bad \ufffd\ufffd line"]
    assert summary.totals["invalid_utf8"] == 3


def test_invalid_utf8_in_json_array(tmp_path):
    src = tmp_path / "w.json"
    src.write_bytes(b'[{"title": "", "content": "a\xffb"},\n{"title": "t", "content": "ok"}]')
    summary = shard_inputs([src], tmp_path / "out", fmt="wudao")
    assert [d["text"] for d in read_docs(tmp_path / "out")] == ["a\ufffdb", "t\nok"]
    assert summary.totals["invalid_utf8"] == 1


@pytest.mark.parametrize("compress", ["zst", "gz", "bz2", "xz"])
def test_truncated_compressed_input(tmp_path, compress):
    records = [{"text": f"document number {i} " + "filler " * 30} for i in range(400)]
    full = write_jsonl(tmp_path / f"full.jsonl.{compress}", records, compress)
    cut = tmp_path / f"cut.jsonl.{compress}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    summary = shard_inputs([cut], tmp_path / "out")
    [entry] = summary.manifest["inputs"]
    assert entry["status"] == "error" and str(cut) in entry["error"]
    texts = [d["text"] for d in read_docs(tmp_path / "out")]
    assert texts == [r["text"] for r in records[: len(texts)]]  # complete records only, in order
    assert len(texts) < 400
    assert entry["error"].endswith(f"(the {len(texts):,} records before it were read and kept)")

    result = run_cli(str(cut), "--output-dir", str(tmp_path / "cli"), "--no-progress")
    assert result.returncode == 3 and str(cut) in result.stderr and "Traceback" not in result.stderr
    strict = run_cli(str(cut), "--output-dir", str(tmp_path / "strict"), "--strict", "--no-progress")
    assert strict.returncode == 1 and len(strict.stderr.strip().splitlines()) == 1


def test_cli_fatal_errors_are_one_line(tmp_path):
    missing = run_cli(str(tmp_path / "nope*.jsonl"), "--output-dir", str(tmp_path / "o"))
    assert (
        missing.returncode == 1
        and missing.stderr.strip() == f"error: no input files match '{tmp_path / 'nope*.jsonl'}'"
    )
    src = write_jsonl(tmp_path / "a.jsonl", pile_docs(3))
    assert run_cli(str(src), "--output-dir", str(tmp_path / "o"), "--no-progress").returncode == 0
    other = run_cli(str(src), "--output-dir", str(tmp_path / "o"), "--lines-per-shard", "2", "--no-progress")
    assert (
        other.returncode == 1
        and "lines_per_shard" in other.stderr
        and len(other.stderr.strip().splitlines()) == 1
    )


def test_cli_bad_arguments_are_one_line(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", pile_docs(3))
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "no_data").mkdir()
    (tmp_path / "no_data" / "notes.md").write_text("not a data file")
    cases = {
        "is a file, not a folder": [str(src), "--output-dir", str(tmp_path / "a_file")],
        "cannot create --output-dir": [str(src), "--output-dir", str(tmp_path / "a_file" / "sub")],
        "no data files in folder": [str(tmp_path / "no_data"), "--output-dir", str(tmp_path / "o1")],
        "--workers must be at least 1": [str(src), "--output-dir", str(tmp_path / "o2"), "--workers", "0"],
        "is not a file": [
            str(src),
            "--output-dir",
            str(tmp_path / "o3"),
            "--languages",
            "en",
            "--language-model",
            "x",
        ],
        "give the languages to keep": [
            str(src),
            "--output-dir",
            str(tmp_path / "o4"),
            "--language-model",
            str(src),
        ],
        "must each be at least 1": [
            str(src),
            "--output-dir",
            str(tmp_path / "o5"),
            "--near-dedup-buckets",
            "0",
        ],
    }
    for message, args in cases.items():
        result = run_cli(*args, "--no-progress", "--near-dedup")
        assert result.returncode == 1, (message, result.stderr)
        assert result.stderr.startswith("error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # Option values outside their choices are bad arguments: status 2, one line naming the valid ones.
    for args, message in (
        (["--filters", "gopher,c4_quality"], "unknown filter 'gopher': choose from all, gopher_repetition"),
        (["--languages", "en,e1"], "'e1' is not a language code"),
        (["--executor", "slurm"], "--executor slurm needs --slurm-partition"),
        (["--executor", "spark"], "executor"),
    ):
        result = run_cli(str(src), "--output-dir", str(tmp_path / "o6"), *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "o6").exists()


def test_cli_keys_aliases_and_bad_values(tmp_path, capsys):
    """The keys (--output_dir), their dash aliases (--output-dir) and the --no-X / bare --strict shorthands
    give the same job; a bad option is one line naming it, exit status 2, before anything is written."""
    src = write_jsonl(tmp_path / "a.jsonl", pile_docs(3) + pile_docs(3))  # every document twice
    keys = [
        str(src),
        "--output_dir",
        str(tmp_path / "keys"),
        "--lines_per_shard",
        "2",
        "--text_field",
        "text",
    ]
    keys += ["--dedup", "false", "--progress", "false", "--strict=true"]
    aliases = [str(src), "--output-dir", str(tmp_path / "aliases"), "--lines-per-shard", "2", "--text-field"]
    aliases += ["text", "--no-dedup", "--no-progress", "--strict"]
    assert shard_main(keys) == shard_main(aliases) == 0
    assert shard_hashes(tmp_path / "keys") == shard_hashes(tmp_path / "aliases")
    options = json.loads((tmp_path / "keys" / "manifest.json").read_text())["config"]["options"]
    assert (options["lines_per_shard"], options["dedup"], options["strict"]) == (2, False, True)
    assert len(read_docs(tmp_path / "keys")) == 6

    bad = {
        "format": ["--format", "xml"],
        "text_unit": ["--text_unit", "page"],
        "lines_per_shard": ["--lines_per_shardd", "2"],  # a misspelt key: "did you mean"
        "min_chars": ["--min-chars", "many"],
        "--output_dir": [],
    }
    capsys.readouterr()
    for named, args in bad.items():
        out = [] if named == "--output_dir" else ["--output_dir", str(tmp_path / "bad")]
        assert shard_main([str(src), *out, *args]) == 2, named
        err = capsys.readouterr().err
        assert err.startswith("data/shard.py: error: ") and named in err, (named, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("kind", ["parquet", "json"])
def test_input_without_the_text_field_fails_clearly(tmp_path, kind):
    """A file none of whose records has the field (wrong --text-field) is a failed input, not 0 documents."""
    rows = {"body": ["first", "second"], "n": [1, 2]}
    if kind == "parquet":
        src = tmp_path / "x.parquet"
        pq.write_table(pa.table(rows), src)
    else:
        src = tmp_path / "x.json"
        src.write_text(json.dumps([{"body": b, "n": n} for b, n in zip(rows["body"], rows["n"])]))
    result = run_cli(str(src), "--output-dir", str(tmp_path / "out"), "--no-progress")
    assert result.returncode == 3 and "Traceback" not in result.stderr
    where = "row" if kind == "parquet" else "item"
    assert f"{src}: {where} 1: no 'text' field (fields found: body, n)" in result.stderr
    assert (
        f"{src}: none of its 2 records has the text field" in result.stderr
        and "--text-field" in result.stderr
    )
    fixed = run_cli(
        str(src), "--output-dir", str(tmp_path / "fixed"), "--no-progress", "--text-field", "body"
    )
    assert fixed.returncode == 0, fixed.stderr
    assert [d["text"] for d in read_docs(tmp_path / "fixed")] == ["first", "second"]


def _peak_rss_of_cli(*args: str) -> int:
    """Peak RSS (bytes) of the sharder CLI run in a fresh interpreter (Linux VmHWM, read at its exit)."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(REPO / 'data' / 'shard.py')!r}, *sys.argv[1:]]\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1])"
    )
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for peak RSS")
def test_memory_does_not_grow_with_input_size(tmp_path):
    """A 5x larger JSON array (and jsonl) file leaves the sharder's peak memory where it was."""
    doc = "word " * 400
    sizes = {}
    for n in (4_000, 20_000):  # ~8 MB and ~40 MB of JSON
        array = tmp_path / f"a{n}.json"
        with open(array, "w") as fh:
            fh.write(
                "["
                + ",".join(json.dumps({"title": f"t{i}", "content": f"{i} {doc}"}) for i in range(n))
                + "]"
            )
        lines = write_jsonl(tmp_path / f"l{n}.jsonl", [{"text": f"{i} {doc}"} for i in range(n)])
        sizes[n] = [
            _peak_rss_of_cli(
                str(path), "--output-dir", str(tmp_path / f"out-{path.name}"), "--no-progress", "--no-dedup"
            )
            for path in (array, lines)
        ]
    growth = [large - small for small, large in zip(sizes[4_000], sizes[20_000])]
    assert max(growth) < 12 << 20, (sizes, growth)  # the input grew by ~32 MB


# --- resume, idempotence, determinism --------------------------------------------------------------


def test_idempotent_rerun_and_workers_determinism(tmp_path):
    inputs = make_corpus(tmp_path / "in")
    one = shard_inputs(inputs, tmp_path / "w1", lines_per_shard=128, workers=1)
    hashes = shard_hashes(tmp_path / "w1")
    assert one.bytes_read == one.totals["bytes_in"]  # a fresh run reads everything: MB/s over all of it
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "w1").iterdir()}
    again = shard_inputs(inputs, tmp_path / "w1", lines_per_shard=128, workers=2)
    assert again.nothing_to_do and shard_hashes(tmp_path / "w1") == hashes
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "w1").iterdir()} == mtimes
    shard_inputs(inputs, tmp_path / "w2", lines_per_shard=128, workers=2)
    assert shard_hashes(tmp_path / "w2") == hashes
    assert one.totals["duplicate"] == 100 + 115  # 100 repeats inside a, b's multiples of 7 below 900 repeat a
    assert one.totals["documents"] == 900 + 685 + 700


@pytest.mark.parametrize(("workers", "kill_when"), [(1, "work"), (2, "work"), (1, "final")])
def test_kill_9_and_rerun_gives_the_same_shards(tmp_path, workers, kill_when):
    inputs = make_corpus(tmp_path / "in")
    args = [*map(str, inputs), "--lines-per-shard", "64", "--no-progress", "--workers", str(workers)]
    assert run_cli(*args, "--output-dir", str(tmp_path / "ref")).returncode == 0
    reference = shard_hashes(tmp_path / "ref")

    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "data" / "shard.py"), *args, "--output-dir", str(out)],
        env={**os.environ, "OPEN_LLAMA_SHARD_DELAY": "0.05"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # so the kill reaches the worker processes too
    )
    # "work": once the first input's task is complete (datatrove's completion marker) and others are under
    # way; "final": once three shards have their final names.
    pattern = ".shard-state/logs/read/completions/*" if kill_when == "work" else "part-*.jsonl.zst"
    enough = 1 if kill_when == "work" else 3
    deadline = time.monotonic() + 60
    while len(list(out.glob(pattern))) < enough and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the job finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists()
    for shard in out.glob("part-*.jsonl.zst"):  # whatever is under a final name is complete
        list(iter_shard_records(shard))

    result = run_cli(*args, "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert shard_hashes(out) == reference
    assert not (out / ".shard-state").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())
    # The rerun's MB/s covers only what it read itself, not the inputs the killed run had finished.
    assert "MB of it read by this run" in result.stdout + result.stderr


# --- the real corpus -------------------------------------------------------------------------------


def test_real_corpus_end_to_end(shared_corpus, tmp_path):
    raw = shared_corpus / "raw"
    summary = shard_inputs([raw / "pile", raw / "wudao"], tmp_path / "out", workers=2)
    by_source = Counter()
    sets, types = Counter(), Counter()
    for path in summary.shards:
        try:
            records = list(iter_shard_records(path))
        except ShardError as exc:  # pragma: no cover - a failure message worth reading
            pytest.fail(str(exc))
        for r in records:
            by_source[r["meta"]["source"]] += 1
            sets[r["meta"].get("pile_set_name")] += 1
            types[r["meta"].get("dataType")] += 1
    # Counts from the corpus README (which reports no exact duplicates or empty documents).
    assert summary.totals["duplicate"] == summary.totals["empty"] == summary.totals["malformed"] == 0
    assert by_source == {"pile": 915 + 915 + 916, "wudao": 3 * 2561}
    assert {k: sets[k] for k in ("Gutenberg (PG-19)", "Bible-WEB", "PythonDocs", "Github")} == {
        "Gutenberg (PG-19)": 269,
        "Bible-WEB": 1391,
        "PythonDocs": 497,
        "Github": 589,
    }
    assert {k: types[k] for k in ("百科", "诗词", "谚语", "经典", "技术", "语录")} == {
        "百科": 2036,
        "诗词": 2184,
        "谚语": 1474,
        "经典": 949,
        "技术": 674,
        "语录": 366,
    }
    assert (
        summary.totals["bytes_in"] == 10_331_985 + 10_560_324 + 9_330_473 + 1_988_453 + 2_193_957 + 2_112_454
    )


def test_json_array_that_breaks_off(tmp_path):
    src = tmp_path / "w.json"
    src.write_text(
        '[{"title": "a", "content": "one"},\n{"title": "b", "content": "two"},\n{"title": "c", "cont'
    )
    summary = shard_inputs([src], tmp_path / "out")
    assert [d["text"] for d in read_docs(tmp_path / "out")] == ["a\none", "b\ntwo"]
    [entry] = summary.manifest["inputs"]
    assert entry["status"] == "error" and entry["error"].startswith(
        f"{src}: malformed JSON array after item 2"
    )


def test_json_lines_read_as_a_json_array_says_which_format_it_is(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", pile_docs(3))
    summary = shard_inputs([src], tmp_path / "out", fmt="wudao")
    [entry] = summary.manifest["inputs"]
    assert entry["status"] == "error" and "use --format jsonl (or pile)" in entry["error"]


# --- near duplicates and removed documents ------------------------------------------------------------


def _variant(text: str, kind: int, rng) -> str:
    """A near-duplicate of `text`: a few words changed, the lines re-wrapped, or a header added."""
    if kind == 0:
        chinese = sum("\u4e00" <= c <= "\u9fff" for c in text) > len(text) / 3
        units = list(text) if chinese else text.split(" ")
        for i in rng.sample(range(len(units)), 3):
            units[i] = "变" if chinese else "changed"
        return "".join(units) if chinese else " ".join(units)
    if kind == 1:
        return textwrap.fill(text.replace("\n", " "), 60, break_long_words=False)
    return f"Retrieved from the archive on 2024-05-01 by a crawler\n\n{text}"


def test_near_duplicates_removed_from_the_real_corpus(shared_corpus, tmp_path):
    """Near-duplicates planted in real text (The Pile and WuDao): at least 90% removed, and no more than 1%
    of the distinct documents with them."""
    import random

    raw = shared_corpus / "raw"
    # The distinct documents: the corpus with its own exact and near duplicates removed.
    distinct = shard_inputs([raw / "pile", raw / "wudao"], tmp_path / "distinct", workers=2, near_dedup=True)
    assert distinct.totals["near_duplicate"] > 0  # the corpus has some (templated help pages, quotes)
    docs = read_docs(tmp_path / "distinct")
    rng = random.Random(0)
    # Documents long enough for 5-grams to mean something (a Chinese ideograph counts as a word).
    candidates = [i for i, d in enumerate(docs) if 300 <= len(d["text"]) <= 20_000]
    planted = rng.sample(candidates, 300)
    corpus = tmp_path / "planted.jsonl"
    variants = {}
    with open(corpus, "w") as fh:
        for i, doc in enumerate(docs):
            fh.write(json.dumps({"text": doc["text"], "id": i}, ensure_ascii=False) + "\n")
        for n, i in enumerate(planted):
            variants[i] = _variant(docs[i]["text"], n % 3, rng)
            fh.write(json.dumps({"text": variants[i], "id": f"v{i}"}, ensure_ascii=False) + "\n")
    summary = shard_inputs(
        [corpus], tmp_path / "out", workers=2, near_dedup=True, keep_removed=tmp_path / "removed"
    )
    kept = {d["meta"]["id"] for d in read_docs(tmp_path / "out")}
    caught = sum((i in kept) != (f"v{i}" in kept) for i in planted)
    assert caught >= 0.9 * len(planted), caught
    lost = [i for i in range(len(docs)) if i not in planted and i not in kept]
    assert len(lost) <= 0.01 * len(docs), len(lost)
    # Every removed document is kept aside with its reason, and the counts agree.
    assert summary.totals["near_duplicate"] == len(docs) + len(planted) - len(kept)
    removed = list(iter_shard_records(tmp_path / "removed" / "near_duplicate" / "planted-00000.jsonl.zst"))
    assert len(removed) == summary.totals["near_duplicate"]
    assert {r["reason"] for r in removed} == {"near_duplicate"}
    assert {r["meta"]["id"] for r in removed}.isdisjoint(kept)


def test_manifest_counts_every_step_per_source_and_keeps_removed(tmp_path):
    """Exact duplicates across inputs, length drops and malformed lines: counted per input, per source and in
    total; --keep-removed holds each removed document under its reason."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in ["one", "two", "one", "", "x" * 50]])
    b = write_bytes(tmp_path / "b.jsonl", b'{"text": "two"}\n{bad\n{"text": "three"}\n')
    summary = shard_inputs([a, b], tmp_path / "out", max_chars=20, keep_removed=tmp_path / "removed")
    manifest = summary.manifest
    assert [d["text"] for d in read_docs(tmp_path / "out")] == ["one", "two", "three"]
    assert {
        k: manifest["sources"]["a"][k] for k in ("records", "documents", "duplicate", "empty", "too_long")
    } == {
        "records": 5,
        "documents": 2,
        "duplicate": 1,
        "empty": 1,
        "too_long": 1,
    }
    assert {k: manifest["sources"]["b"][k] for k in ("records", "documents", "duplicate", "malformed")} == {
        "records": 3,
        "documents": 1,
        "duplicate": 1,
        "malformed": 1,
    }
    t = manifest["totals"]
    assert t["records"] - t["documents"] == sum(t[r] for r in DROP_REASONS)
    assert t["bytes_out"] == sum(s["bytes"] for s in manifest["shards"]) > 0
    removed = {}
    for path in sorted((tmp_path / "removed").rglob("*.jsonl.zst")):
        removed.setdefault(path.parent.name, []).extend(
            (r["text"], r["reason"], r["where"]) for r in iter_shard_records(path)
        )
    # The first copy in input order is kept: the later "one" of a and the "two" of b are removed.
    assert sorted(removed["duplicate"]) == [
        ("one", "duplicate", "part-a-00000-00000.jsonl.zst:3"),
        ("two", "duplicate", "part-b-00001-00000.jsonl.zst:1"),
    ]
    assert "manifest" not in {p.name for p in (tmp_path / "removed").iterdir()}
    assert "near_duplicate: " not in summary.format() and "duplicate 2" in summary.format()
