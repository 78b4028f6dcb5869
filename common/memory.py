"""Peak resident memory of this process: what the training loop, the tokenizer trainer and the benchmarks
report. (No torch import here: the corpus tools use it and should not pay for torch.)"""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes.

    Linux's VmHWM belongs to the process image, whereas ru_maxrss survives exec and would report the
    parent's peak for a freshly started `python` (e.g. a subprocess of a large test runner).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux kilobytes
