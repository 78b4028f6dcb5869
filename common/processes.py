"""Helper processes that never outlive their parent.

A worker pool's processes wait on a queue for work; when the parent is killed with SIGKILL nobody tells
them, and they would wait forever (re-parented to init, holding their memory), or worse, carry on writing
files that a rerun of the job is writing too. A child program started with subprocess (a training run)
would carry on just the same.

- `exit_with_parent(parent_pid)`, called first thing in a helper process (a pool's initializer), makes it
  exit within about a second of its parent's death, as PyTorch's own DataLoader workers do: on Linux the
  kernel sends it SIGKILL (prctl PR_SET_PDEATHSIG); everywhere a daemon thread also watches the parent id,
  which changes when the parent dies.
- `kill_with_parent()` is a subprocess `preexec_fn` that arms the same signal in a child program.
- `stop_descendants_at_exit()` covers what neither can reach: processes started by a child program of
  someone else's (Ray's agents, which a killed Ray leaves running for a minute while they try to report the
  loss). A guard process stops whatever it saw below this one once this one has ended, however it ended.

Linux sends the death signal when the *thread* that forked the child exits, not when the parent process
does. Fork helpers from a thread that lives as long as they should: the main thread (a Pool's workers
are forked by its constructor; a replacement for a worker that died, by the pool's own handler thread,
which lives as long as the pool; a ProcessPoolExecutor forks its workers in the thread that calls
`submit`, so submit from a long-lived thread). The signal is not inherited by a child's own children:
each level arms its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1
WATCH_INTERVAL_S = 1.0
STOP_GRACE_S = 3.0


def _find_prctl() -> Callable[..., int] | None:
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


# Looked up once, at import: `kill_with_parent`'s preexec_fn then runs no dynamic loading between fork
# and exec (the loader's locks may be held by another thread at the moment of the fork).
_prctl = _find_prctl()


def _arm_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when the thread that forked it exits; False where it cannot."""
    return _prctl is not None and _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0


def exit_with_parent(parent_pid: int | None = None) -> None:
    """Make this process exit when its parent dies.

    `parent_pid` is the parent's `os.getpid()`, taken in the parent and handed over (a pool's initializer
    argument): only then is a parent that died before this call noticed (this process was re-parented
    already, so its current parent looks alive). It must be the direct parent, or this process exits at
    once. Without it the current parent is watched, whoever it is.
    """
    parent_pid = os.getppid() if parent_pid is None else parent_pid
    _arm_death_signal()  # where it fails, the watcher thread below still covers it
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(WATCH_INTERVAL_S):
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def kill_with_parent() -> Callable[[], None] | None:
    """A subprocess `preexec_fn` under which the child is killed (SIGKILL) when this process dies.

        subprocess.run(command, preexec_fn=kill_with_parent())

    Linux only (None elsewhere: the child may outlive a killed parent there). Call it, and start the
    child, from a thread that lives as long as the child should (see the module docstring).

    preexec_fn's caveats, and why they are acceptable here: it runs Python in the forked child before
    exec, which can deadlock if another thread held a lock (malloc's, the dynamic loader's) at the fork,
    so this one does nothing but a prctl call looked up in advance and a getppid; subprocess cannot use
    its faster vfork/posix_spawn path with it (irrelevant for a few long-running children); and it is
    refused in subinterpreters. The signal survives exec, except into a set-user-ID program.
    """
    if _prctl is None:
        return None
    parent_pid = os.getpid()

    def arm() -> None:  # runs in the child, between fork and exec
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before the death signal was armed
            os._exit(1)

    return arm


# The guards started by stop_descendants_at_exit: a guard's stdin is its lifeline, closed (and the guard
# set off) when this process ends, so the pipe must live exactly as long as the process does.
_guards: list[subprocess.Popen] = []


def stop_descendants_at_exit() -> None:
    """Start a guard process that, once this process has ended (at exit, on a signal or by kill -9), stops
    every process it saw below this one that still runs: SIGTERM, then SIGKILL after STOP_GRACE_S.

    The guard samples this process's descendants every WATCH_INTERVAL_S, so call this once what should be
    stopped has started (or will live for longer than that). A process it saw that ended is never mistaken
    for a later one given the same pid (psutil compares start times). Ctrl-C in a terminal reaches the
    guard too; it ignores it, and SIGTERM, so that it is still there when this process ends. A child this
    process forks without exec holds the guard's pipe too: the guard then acts once both have ended.
    """
    root = str(Path(__file__).resolve().parent.parent)
    code = f"import sys; sys.path.insert(0, {root!r}); from common.processes import _guard; _guard({os.getpid()})"
    _guards.append(
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )


def _guard(parent_pid: int) -> None:
    """The guard's body: record the parent's descendants until its stdin closes, then stop them."""
    import psutil  # only the guard needs it

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    me = os.getpid()
    seen: dict[int, psutil.Process] = {}
    parent_gone = threading.Event()

    def record() -> None:
        try:
            parent = psutil.Process(parent_pid)
            while True:
                for process in parent.children(recursive=True):
                    if process.pid != me:
                        seen.setdefault(process.pid, process)
                if parent_gone.wait(WATCH_INTERVAL_S):
                    return
        except psutil.NoSuchProcess:
            return

    recorder = threading.Thread(target=record, daemon=True)
    recorder.start()
    sys.stdin.buffer.read()  # returns at end of file: the parent's end of the pipe is closed, it has ended
    parent_gone.set()
    recorder.join()
    running = [process for process in seen.values() if process.is_running()]
    for process in running:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, still_running = psutil.wait_procs(running, timeout=STOP_GRACE_S)
    for process in still_running:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
