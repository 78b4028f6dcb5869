"""Helper processes that never outlive their parent.

A worker pool's processes wait on a queue for work; when the parent is killed with SIGKILL nobody tells
them, and they would wait forever (re-parented to init, holding their memory). `exit_with_parent()`, called
first thing in a helper process, makes it exit within about a second of its parent's death, as PyTorch's
own DataLoader workers do: on Linux the kernel sends it SIGKILL (prctl PR_SET_PDEATHSIG); everywhere a
daemon thread also watches the parent id, which changes when the parent dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
WATCH_INTERVAL_S = 1.0


def exit_with_parent(parent_pid: int | None = None) -> None:
    """Make this process exit when `parent_pid` (default: the current parent) dies."""
    parent_pid = os.getppid() if parent_pid is None else parent_pid
    if sys.platform == "linux":
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watcher thread below still covers it
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(WATCH_INTERVAL_S):
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
