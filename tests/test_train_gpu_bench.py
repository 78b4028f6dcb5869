"""bench/train_gpu.py works without a GPU: its CPU smoke run gives a row for every configuration, and a
missing optional library marks a row skipped instead of failing the run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "train_gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("train_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_gpu"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
        check=False,
    )


def test_cpu_smoke_run_has_a_row_for_every_configuration(tmp_path):
    done = run_script("--cpu-smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "train_gpu.json").read_text())
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == [c.name for c in bench.CONFIGS]
    for name, row in rows.items():
        assert row["preset"] == "tiny" and row["batch_size"] == 2 and row["seq_len"] == 128
        if name in ("flash_attn", "xformers", "docs_flash_attn"):  # attention kernels with no CPU path
            assert row["status"] == "skipped" and "needs a CUDA GPU" in row["reason"]
            continue
        if name == "docs_flex":
            assert row["status"] == "skipped" and "no backward on the CPU" in row["reason"]
            continue
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0 and row["loss_first"] > 0
        assert row["speed_vs_baseline"] == pytest.approx(row["tokens_per_s"] / rows["hf"]["tokens_per_s"])
        assert row["mfu_measured_peak"] > 0 and row["mfu_datasheet"] is None  # no datasheet peak for a CPU
    # The Liger rows ran their PyTorch fallbacks (Liger is GPU only) and say so.
    assert "fell back" in rows["all"]["notes"] and rows["all"]["kernels"]["fused_cross_entropy"] == "chunked"
    assert rows["chunked_ce"]["kernels"] == {"fused_cross_entropy": "chunked"}
    # Same seed, same weights: every switch's path starts from the plain model's loss and stays with it.
    for row in rows.values():
        if row["status"] == "ok" and row["config"] not in ("hf", "docs_sdpa"):
            assert row["loss_first"] == pytest.approx(rows["ours"]["loss_first"], abs=1e-4), row["config"]
            assert row["loss_last"] == pytest.approx(rows["ours"]["loss_last"], abs=1e-2), row["config"]
    # Document masking changes what each token sees: the same tokens give another loss.
    assert rows["docs_sdpa"]["loss_first"] != pytest.approx(rows["ours"]["loss_first"], abs=1e-4)
    # The baseline (normal init, no stable embedding) starts near the uniform loss log(512) = 6.24.
    assert abs(rows["hf"]["loss_first"] - 6.238) < 0.5
    table = (tmp_path / "train_gpu.md").read_text()
    for name in rows:
        assert f"| tiny | {name} |" in table
    assert table in done.stdout


@pytest.mark.slow
def test_subprocess_isolation_and_append(tmp_path):
    first = run_script("--cpu-smoke", "--only", "hf,ours", "--out", str(tmp_path), "--isolate")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_script(
        "--cpu-smoke", "--only", "chunked_ce", "--out", str(tmp_path), "--append", "--isolate"
    )
    assert second.returncode == 0, second.stderr[-3000:]
    rows = json.loads((tmp_path / "train_gpu.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["hf", "ours", "chunked_ce"]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows)
    assert rows[2]["speed_vs_baseline"] is not None  # ratios span calls


def test_missing_optional_library_marks_the_row_skipped(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        bench.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a),
    )
    result = bench.run_one(
        bench.CONFIG_BY_NAME["fused_norm"],
        preset="tiny",
        vocab_size=64,
        batch_size=1,
        seq_len=16,
        warmup=0,
        steps=1,
        device="cpu",
        smoke=False,
        compile_backend="eager",
    )
    assert result == {
        "status": "skipped",
        "reason": "liger-kernel not installed (pip install -r requirements-gpu.txt)",
    }


def test_bad_arguments_are_reported(tmp_path, capsys):
    assert bench.main(["--cpu-smoke", "--only", "hf,warp", "--out", str(tmp_path)]) == 2
    assert "unknown configuration(s) ['warp']" in capsys.readouterr().err
    assert bench.main(["--cpu-smoke", "--presets", "13b", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit, match="PRESET=N"):
        bench.main(["--cpu-smoke", "--batch-size", "1b", "--out", str(tmp_path)])


def test_ratios_pair_each_row_with_the_baseline_of_its_own_shape():
    def row(config, seq_len, tokens_per_s, memory, datasheet):
        return {
            "preset": "1b", "config": config, "batch_size": 4, "seq_len": seq_len, "status": "ok",
            "tokens_per_s": tokens_per_s, "peak_memory_gib": memory, "flops_per_token": 1e9,
            "datasheet_peak_flops": datasheet, "matmul_peak_flops": None,
        }  # fmt: skip

    rows = [  # rows of two runs kept together by --append: other sequence lengths, other devices
        row("hf", 2048, 1000.0, 40.0, 989e12),
        row("ours", 2048, 3000.0, 20.0, 989e12),
        row("hf", 4096, 500.0, 70.0, 835e12),
        row("ours", 4096, 2000.0, 35.0, 835e12),
    ]
    bench.add_ratios(rows)
    assert [r["speed_vs_baseline"] for r in rows] == [1.0, 3.0, 1.0, 4.0]
    assert [r["memory_vs_baseline"] for r in rows] == [1.0, 0.5, 1.0, 0.5]
    assert rows[1]["mfu_datasheet"] == pytest.approx(3000e9 / 989e12)
    assert rows[3]["mfu_datasheet"] == pytest.approx(2000e9 / 835e12)  # its own run's device
    assert rows[3]["mfu_measured_peak"] is None


def test_document_positions_restart_per_document():
    import torch

    positions = bench.document_positions(4, 2048, torch.Generator().manual_seed(0))
    assert positions.shape == (4, 2048)
    for row in positions:
        starts = (row == 0).nonzero().flatten().tolist()
        assert starts[0] == 0 and len(starts) > 1
        lengths = [b - a for a, b in zip(starts, [*starts[1:], 2048])]
        assert all(n >= 16 for n in lengths[:-1])  # only the last document is cut by the row's end
        for start, n in zip(starts, lengths):
            assert torch.equal(row[start : start + n], torch.arange(n))
    mean = 4 * 2048 / sum(int((row == 0).sum()) for row in positions)
    assert 200 < mean < 1000  # around DOCUMENT_MEAN_TOKENS + 16, cut by the row ends
