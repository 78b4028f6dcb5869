"""A pool of worker processes that computes results ahead of need, looked up by request.

Every data stream here does its expensive work (read shard records, tokenize or render them) in worker
processes and everything that decides the order of the data in the main process. The pool is what makes
that split safe for exact resume: a result is identified by its request (any hashable, picklable value),
so which worker computes it and in which order workers finish never matter; the workers only decide how
early a result is ready. With 0 workers the work runs inline, with the same results.

    pool = WorkerPool(tokenize_unit, tokenizer, num_workers=2)   # tokenize_unit(request, tokenizer)
    pool.prefetch([r1, r2, r3])   # most urgent first; forgets pending requests no longer listed
    unit = pool.get(r1)           # waits for (or starts) r1
    pool.close()

The processes are forked (as torch's DataLoader does on Linux) so that `state`, e.g. the tokenizer, is
handed over without pickling; where fork does not exist they are spawned and `work` and `state` must
pickle. They exit by themselves within seconds when the main process dies, even by SIGKILL
(`common.processes.exit_with_parent`). On Linux that uses PR_SET_PDEATHSIG, which fires when the *thread*
that forked the worker exits, so a pool with workers must be started from the main thread (checked).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Generic, TypeVar

from common.processes import exit_with_parent

Request = TypeVar("Request", bound=Hashable)
Result = TypeVar("Result")

# Queued or running requests per worker: enough to keep every worker busy, few enough that a request which
# becomes urgent waits for little more than one request's work.
IN_FLIGHT_PER_WORKER = 2


class WorkerDiedError(RuntimeError):
    """A worker process died (killed, out of memory) while computing `request`."""

    def __init__(self, request: Hashable):
        super().__init__(
            f"a data worker process died (killed, or out of memory?) while working on {request}; "
            "fewer workers or smaller pieces of work need less memory"
        )
        self.request = request


# Set in each worker process by `_start_worker`.
_work: Callable[[Any, Any], Any] | None = None
_state: Any = None


def _start_worker(parent_pid: int, work: Callable[[Any, Any], Any], state: Any) -> None:
    global _work, _state
    exit_with_parent(parent_pid)
    _work, _state = work, state
    # A worker is one core's worth of work; torch's own thread pool would oversubscribe the cores.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _run_in_worker(request: Any) -> Any:
    assert _work is not None, "worker started without _start_worker"
    return _work(request, _state)


class WorkerPool(Generic[Request, Result]):
    """Computes `work(request, state)` in `num_workers` processes (0: inline, in the caller)."""

    def __init__(self, work: Callable[[Request, Any], Result], state: Any, num_workers: int):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.work = work
        self.state = state
        self.num_workers = num_workers
        self._executor: ProcessPoolExecutor | None = None
        self._pending: dict[Request, Future[Result]] = {}

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            if threading.current_thread() is not threading.main_thread():
                # The workers would be killed as soon as this thread ends (PR_SET_PDEATHSIG is per thread).
                raise RuntimeError("start a WorkerPool with workers from the main thread (or use 0 workers)")
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            # With fork, ProcessPoolExecutor starts all its processes in the first submit(), so in this thread.
            self._executor = ProcessPoolExecutor(
                self.num_workers,
                mp_context=context,
                initializer=_start_worker,
                initargs=(os.getpid(), self.work, self.state),
            )
        return self._executor

    def prefetch(self, requests: Sequence[Request]) -> None:
        """Start computing `requests` (most urgent first) ahead of need; drop pending ones no longer listed.

        At most IN_FLIGHT_PER_WORKER requests per worker are queued or running; finished results wait
        here until taken with `get`. Does nothing with 0 workers.
        """
        if not self.num_workers:
            return
        wanted = set(requests)
        for request in [r for r in self._pending if r not in wanted]:
            self._pending.pop(request).cancel()
        busy = sum(not f.done() for f in self._pending.values())
        for request in requests:
            if busy >= IN_FLIGHT_PER_WORKER * self.num_workers:
                break
            if request not in self._pending:
                self._pending[request] = self._pool().submit(_run_in_worker, request)
                busy += 1

    def get(self, request: Request) -> Result:
        """The result for `request`, waiting for (or starting) its computation. An exception raised by
        `work` is raised here as it was raised in the worker."""
        future = self._pending.pop(request, None)
        if future is None:
            if not self.num_workers:
                return self.work(request, self.state)
            future = self._pool().submit(_run_in_worker, request)
        try:
            return future.result()
        except BrokenProcessPool as exc:
            raise WorkerDiedError(request) from exc

    def close(self) -> None:
        """Stop the worker processes (they start again on the next use)."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> WorkerPool[Request, Result]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
