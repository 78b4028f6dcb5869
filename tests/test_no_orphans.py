"""A training run killed with SIGKILL leaves no process behind: its data workers exit by themselves.

Nobody tells a worker process that its parent was SIGKILLed (OOM killer, a scheduler's hard stop); without
`common.processes.exit_with_parent` the data workers would wait on their queue forever, holding memory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from common.processes import kill_with_parent
from dataset.train_tokenizer import train_tokenizer
from tests.helpers.shards import generated_corpus

REPO = Path(__file__).resolve().parent.parent
EXIT_WITHIN_S = 10.0


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie (a dead child waiting for whoever adopted it to reap it)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def tiny_run_config(tmp_path: Path) -> Path:
    shards = generated_corpus(tmp_path / "shards")
    tokenizer = train_tokenizer([str(p) for ps in shards.values() for p in ps], 400, tmp_path / "tok")
    config = {
        "model": {
            "preset": "tiny",
            "vocab_size": 0,
            "dim": 32,
            "n_layers": 1,
            "n_heads": 2,
            "max_seq_len": 32,
        },
        "data": {
            "shards": [str(tmp_path / "shards")],
            "tokenizer": str(tokenizer),
            "seq_len": 32,
            "batch_size": 2,
            "num_workers": 1,  # a training worker, and a validation worker while the held-out batches are read
            "unit_docs": 4,  # many small units: the training worker has work until the end
            "validation_fraction": 0.1,
        },
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 100_000,  # runs until killed
            "precision": "fp32",
            "checkpoint_every": 100_000,
            "eval_every": 100_000,
            "eval_batches": 2,
            "export_hf": False,
        },
        "logging": {"log_every": 1, "progress_bar": False, "sample_every": 0, "plot": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_killed_run_leaves_no_worker_processes(tmp_path):
    """SIGKILL the main process of a run with data workers: every process it started is gone 10 s later."""
    config = tiny_run_config(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log = (tmp_path / "run.log").open("w")
    run = subprocess.Popen(
        [sys.executable, str(REPO / "pretrain_llama.py"), "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so that clean-up can kill everything it started
        preexec_fn=kill_with_parent(),  # and it dies with this test process
    )
    seen: dict[int, psutil.Process] = {}
    try:
        main = psutil.Process(run.pid)
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 60
        # Training has started (so the validation batches have been read) and a data worker is running.
        while True:
            assert run.poll() is None, f"the run ended early:\n{(tmp_path / 'run.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no training step or no data worker within 60 s"
            children = main.children(recursive=True)
            seen.update((child.pid, child) for child in children if child.pid not in seen)
            if children and metrics.exists() and metrics.read_text().strip():
                break
            time.sleep(0.1)

        run.send_signal(signal.SIGKILL)  # the main process only
        run.wait(timeout=10)
        deadline = time.monotonic() + EXIT_WITHIN_S
        while any(alive(p) for p in seen.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [pid for pid, p in seen.items() if alive(p)]
        assert not survivors, (
            f"still alive {EXIT_WITHIN_S:.0f} s after the main process was killed: {survivors}"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        for process in seen.values():
            if alive(process):
                process.kill()
        run.wait(timeout=10)
        log.close()
