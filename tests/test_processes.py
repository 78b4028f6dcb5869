"""No orphaned processes: helpers and child programs die with their parent, even when it is killed with -9.

Each test starts a parent process, kills it with SIGKILL and checks that what it started is gone soon
after (a process killed after its parent is re-parented; one that is dead but not yet reaped is gone).
Whatever a test started is killed at its end, also when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and process tree")


def still_running(processes: list[psutil.Process], within: float) -> list[psutil.Process]:
    """The processes still running (zombies count as gone) after waiting up to `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        alive = []
        for process in processes:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def kill_all(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def parent_and_child(parent_code: str) -> tuple[subprocess.Popen, psutil.Process]:
    """Start `python -c parent_code`, which prints its child's pid, then 'ready' once the child is set up."""
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True, env=ENV, cwd=REPO
    )
    lines = [parent.stdout.readline().strip() for _ in range(2)]
    assert "ready" in lines, lines
    (pid,) = [int(line) for line in lines if line != "ready"]
    return parent, psutil.Process(pid)


def assert_child_dies_with_parent(parent_code: str, within: float = 5.0) -> None:
    parent, child = parent_and_child(parent_code)
    try:
        assert still_running([child], within=0.3) == [child], "the child exited on its own"
        parent.kill()  # SIGKILL: the parent gets no chance to clean up
        parent.wait()
        assert still_running([child], within=within) == [], f"child {child.pid} outlived its parent"
    finally:
        parent.kill()
        kill_all([child])
        parent.wait()
        parent.stdout.close()


# --- exit_with_parent ---------------------------------------------------------------------------------

CHILD_PROGRAM = """
import sys, time
import common.processes as processes
if sys.argv[2] == "watcher only":  # as where there is no parent-death signal (not Linux)
    processes._prctl = None
processes.exit_with_parent(int(sys.argv[1]))
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["death signal", "watcher only"])
def test_exit_with_parent_child_program(how):
    if how == "death signal" and sys.platform != "linux":
        pytest.skip("the parent-death signal is Linux's")
    parent = f"""
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {CHILD_PROGRAM!r}, str(os.getpid()), {how!r}])
print(child.pid, flush=True)
time.sleep(60)
"""
    assert_child_dies_with_parent(parent)


def test_exit_with_parent_in_a_pool_initializer():
    """The sharder's pattern: fork workers whose initializer gets the parent's pid. The worker is busy: an
    idle one would also stop when its task pipe closes, a busy one would carry on with its task."""
    parent = """
import multiprocessing, os, time
from common.processes import exit_with_parent

def busy():
    print(os.getpid(), flush=True)
    print("ready", flush=True)
    time.sleep(60)

context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
pool = context.Pool(1, exit_with_parent, (os.getpid(),))
pool.apply_async(busy)
time.sleep(60)
"""
    assert_child_dies_with_parent(parent)


def test_exit_with_parent_after_the_parent_died():
    """A parent that died before the call is noticed: the parent id differs from the one handed over."""
    code = "from common.processes import exit_with_parent; exit_with_parent(1); import time; time.sleep(30)"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], env=ENV, cwd=REPO, timeout=20)
    assert result.returncode == 1 and time.monotonic() - started < 10


# --- kill_with_parent: child programs started with subprocess -------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_kill_with_parent_preexec_fn():
    parent = """
import subprocess, sys, time
from common.processes import kill_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=kill_with_parent())
print(child.pid, flush=True)  # the signal is armed once Popen returns: it is set before the exec
print("ready", flush=True)
time.sleep(60)
"""
    assert_child_dies_with_parent(parent)


# --- stop_descendants_at_exit: what a child program of someone else's leaves behind ------------------------

# A grandchild of the kind the guard exists for: in a session of its own, armed with no death signal, so
# nothing but the guard stops it; `ignore_term` makes it shrug off SIGTERM, leaving SIGKILL to the guard.
GUARDED_PARENT = """
import subprocess, sys, time
from common.processes import stop_descendants_at_exit
code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)" if {ignore_term} else "import time; time.sleep(60)"
child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
stop_descendants_at_exit()
print(child.pid, flush=True)
print("ready", flush=True)
time.sleep({parent_lives})
"""


@pytest.mark.parametrize("ignore_term", [False, True], ids=["plain", "ignores SIGTERM"])
def test_stop_descendants_at_exit_after_kill_9(ignore_term):
    # within: the guard's SIGTERM, then its SIGKILL STOP_GRACE_S later
    assert_child_dies_with_parent(GUARDED_PARENT.format(ignore_term=ignore_term, parent_lives=60), within=8)


def test_stop_descendants_at_exit_after_a_normal_exit():
    parent, child = parent_and_child(GUARDED_PARENT.format(ignore_term=False, parent_lives=1))
    try:
        assert parent.wait(timeout=20) == 0
        assert still_running([child], within=5) == [], f"child {child.pid} outlived its parent"
    finally:
        parent.kill()
        kill_all([child])
        parent.wait()
        parent.stdout.close()


# --- the sharder's worker pool -------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_shard_workers_die_with_the_sharder(tmp_path):
    """kill -9 of `python data/shard.py --workers 2` alone (not its process group) leaves no worker."""
    inputs = []
    for i in range(3):  # ~1.5 MB each
        path = tmp_path / f"in{i}.jsonl"
        path.write_text("".join(json.dumps({"text": f"{i} {n} " + "word " * 60}) + "\n" for n in range(5000)))
        inputs.append(str(path))
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "data" / "shard.py"), *inputs, "--output-dir", str(out)]
    sharder = subprocess.Popen(
        [*command, "--workers", "2", "--lines-per-shard", "100", "--no-progress"],
        env={**os.environ, "OPEN_LLAMA_SHARD_DELAY": "0.3"},  # orphans would shard on for ~15 s
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, for the clean-up below
    )
    descendants: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 15
        while not list(out.glob(".shard-state/work/*.json")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sharder.poll() is None, "the job ended before it could be killed"
        descendants = psutil.Process(sharder.pid).children(recursive=True)
        assert len(descendants) >= 2, descendants  # the workers, busy writing work shards
        os.kill(sharder.pid, signal.SIGKILL)
        sharder.wait()
        survivors = still_running(descendants, within=10)
        assert survivors == [], f"workers outlived the sharder: {[p.pid for p in survivors]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sharder.pid, signal.SIGKILL)
        kill_all(descendants)
        sharder.wait()
