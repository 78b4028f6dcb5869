"""A live elapsed-time line for work that reports no progress of its own (a download, SentencePiece's
merges, a trainer in a subprocess): tqdm redraws it twice a second from a background thread."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

from tqdm import tqdm


@contextlib.contextmanager
def ticking(desc: str, enabled: bool = True) -> Iterator[None]:
    """Show `desc: 0:12 elapsed` on stderr while the body runs (nothing when not `enabled`)."""
    if not enabled:
        yield
        return
    bar = tqdm(desc=desc, bar_format="{desc}: {elapsed} elapsed", dynamic_ncols=True, file=sys.stderr)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
