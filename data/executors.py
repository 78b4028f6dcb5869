"""Where the sharding pipeline runs: datatrove's executors, one per stage, each depending on the last.

- `local` (the default): datatrove's local executor on this machine, --workers processes, nothing to
  start. Its pool is replaced by one whose processes exit with this one (kill -9 included: see
  common/processes.py); datatrove's own pool sits behind a Manager process and workers that would
  outlive a killed parent. Which tasks are done, and their logs and stats, stay datatrove's.
- `ray`: datatrove's Ray executor (`RayExecutor`), on the cluster at --ray-address or on a Ray started
  for the run on this machine's loopback interface (`start_ray`).
- `slurm`: datatrove's Slurm executor (`SlurmExecutor`); each stage is a job array that waits for the one
  before it (sbatch --dependency=afterok), and this command returns once they are submitted.

Every executor runs the same steps on the same tasks, so the output is the same bytes on each; a rerun
runs only the tasks datatrove has not marked complete (docs/data.md, "Running on a cluster").
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import pickle
import shutil
import socket
import sys
import tempfile
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from datatrove.executor.base import PipelineExecutor
from datatrove.executor.local import LocalPipelineExecutor
from datatrove.executor.ray import RayPipelineExecutor
from datatrove.executor.slurm import SlurmPipelineExecutor
from datatrove.utils.logging import logger

from common.processes import exit_with_parent, stop_descendants_at_exit
from data.job import ShardingError

EXECUTORS = ("local", "ray", "slurm")


def _cache_loguru_library_folders() -> None:
    """datatrove adds three loguru handlers for every task, and loguru works out the library folders for
    each handler's traceback formatter anew: 6 ms each, 18 ms a task, a fifth of a small corpus's run. The
    folders cannot change within a process, so the answer is kept (where loguru still has that method)."""
    with contextlib.suppress(ImportError):
        from loguru._better_exceptions import ExceptionFormatter

        find = getattr(ExceptionFormatter, "_get_lib_dirs", None)
        if isinstance(ExceptionFormatter.__dict__.get("_get_lib_dirs"), staticmethod) and callable(find):
            ExceptionFormatter._get_lib_dirs = staticmethod(functools.cache(find))


_cache_loguru_library_folders()


@dataclass(frozen=True)
class ExecutorOptions:
    """How and where the stages run (nothing here changes the output)."""

    kind: Literal[EXECUTORS] = "local"
    workers: int = 1
    ray_address: str | None = None
    slurm_partition: str | None = None
    slurm_time: str = "24:00:00"
    slurm_cpus: int = 1
    slurm_mem_gb: int = 4
    slurm_job_name: str = "open-llama-shard"


class LocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor, whose worker processes never outlive this process."""

    def run(self):
        if self.depends is not None and not self.depends._launched:
            self.depends.run()
        self._launched = True
        ranks = self.get_incomplete_ranks(range(self.tasks))
        if not ranks:
            return
        self.save_executor_as_json()
        workers = min(self.workers, len(ranks))
        if workers == 1:
            pipeline = self.pipeline
            for rank in ranks:
                self.pipeline = deepcopy(pipeline)  # as datatrove does: a step's counters start at zero
                self._quietly_run_for_rank(rank)
            self.pipeline = pipeline
            return
        import multiprocessing

        # fork: the workers start in milliseconds, before any thread exists in this process; the main
        # thread forks them, so the death signal that exit_with_parent arms fires when this process dies.
        context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with context.Pool(workers, exit_with_parent, (os.getpid(),)) as pool:
            # imap_unordered raises the first task's exception here (an input error under --strict);
            # leaving the with block then terminates the other workers.
            for _ in pool.imap_unordered(self._run_rank, ranks):
                pass

    def _run_rank(self, rank: int) -> None:
        self.pipeline = deepcopy(self.pipeline)
        self._quietly_run_for_rank(rank)

    def _quietly_run_for_rank(self, rank: int) -> None:
        """datatrove's run of one task, its log in the stage's logs/ folder only: local_rank 1 keeps its
        info lines off stderr, and the tqdm bars of its dedup stages go to the null device (an error
        still reaches the caller as the task's exception)."""
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            self._run_for_rank(rank, local_rank=1)


class RayExecutor(RayPipelineExecutor):
    """datatrove's Ray executor, with three changes:

    - a stage whose tasks did not all complete raises the first failed task's own exception (an input
      error under --strict, say) where datatrove only logs a warning, after which the next stage would
      wait for the missing tasks forever, two minutes at a time;
    - each task runs in a process that datatrove's actor forks; it exits when the actor does, so a run
      killed with kill -9 leaves no process writing into the output folder;
    - datatrove's info lines on this side go nowhere (data/pipeline.py prints the progress; each task's
      log is in the stage's logs/ folder).
    """

    def run(self) -> None:
        if self.logging_dir.isdir("errors"):
            self.logging_dir.rm("errors", recursive=True)
        with _quiet_datatrove_ray():
            super().run()
        if failed := self.get_incomplete_ranks(range(self.tasks)):
            raise self._failure(failed)

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        exit_with_parent()
        # datatrove writes a task's log to <temporary folder>/ray_logs/logs/task_<rank>.log, then copies it
        # into the stage's logs/ folder. A temporary folder of the task's own, in the run's state folder
        # and removed after, keeps two runs on one node from writing the same file and leaves nothing in
        # /tmp: what a kill -9 leaves goes with the state folder when the run completes.
        system_tempdir = tempfile.tempdir
        tasks_tempdir = self.logging_dir.resolve_paths("tmp")
        os.makedirs(tasks_tempdir, exist_ok=True)
        tempfile.tempdir = task_tempdir = tempfile.mkdtemp(prefix=f"task{rank:05d}-", dir=tasks_tempdir)
        try:
            return super()._run_for_rank(rank, local_rank, node_rank)
        except Exception as exc:
            try:
                saved = pickle.dumps(exc)
            except Exception:  # an exception that does not pickle: its type and message
                saved = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
            with self.logging_dir.open(f"errors/{rank:05d}.pickle", "wb") as fh:
                fh.write(saved)
            raise
        finally:
            tempfile.tempdir = system_tempdir
            shutil.rmtree(task_tempdir, ignore_errors=True)

    def _failure(self, failed: list[int]) -> Exception:
        logs = self.logging_dir.resolve_paths("logs")
        for rank in failed:
            if not self.logging_dir.isfile(f"errors/{rank:05d}.pickle"):
                continue
            with self.logging_dir.open(f"errors/{rank:05d}.pickle", "rb") as fh:
                try:
                    exc = pickle.load(fh)
                except Exception:
                    continue
            exc.add_note(f"(task {rank} on Ray; its log: {logs}/task_{rank:05d}.log)")
            return exc
        return ShardingError(
            f"{len(failed)} of {self.tasks} Ray tasks did not complete (lost workers or nodes); "
            f"their logs are in {logs}; rerun the same command to resume"
        )


@contextlib.contextmanager
def _quiet_datatrove_ray():
    logger.disable("datatrove.executor.ray")
    try:
        yield
    finally:
        logger.enable("datatrove.executor.ray")


class SlurmExecutor(SlurmPipelineExecutor):
    """datatrove's Slurm executor, submitting one job array per stage and nothing else: datatrove's extra
    job per stage that merges its tasks' stats into stats.json is left out (the manifest stage does the
    summing that matters; each task's stats stay in the stage's stats/ folder)."""

    def launch_merge_stats(self) -> None:
        return


def make_executor(
    options: ExecutorOptions,
    pipeline: list,
    tasks: int,
    logging_dir: str,
    depends: PipelineExecutor | None,
    name: str,
) -> PipelineExecutor:
    """One stage's executor of the kind asked for; `tasks` tasks, at most --workers at a time."""
    if options.kind == "local":
        return LocalExecutor(
            pipeline, tasks=tasks, workers=options.workers, logging_dir=logging_dir, depends=depends
        )
    if options.kind == "ray":
        # Quiet: datatrove warns that logging_dir is local; docs/data.md says the output folder must be shared.
        with _quiet_datatrove_ray():
            return RayExecutor(
                pipeline,
                tasks=tasks,
                workers=options.workers,
                logging_dir=logging_dir,
                depends=depends,
                cpus_per_task=1,
            )
    return SlurmExecutor(
        pipeline,
        tasks=tasks,
        time=options.slurm_time,
        partition=options.slurm_partition,
        cpus_per_task=options.slurm_cpus,
        mem_per_cpu_gb=math.ceil(options.slurm_mem_gb / options.slurm_cpus),
        workers=options.workers,
        job_name=f"{options.slurm_job_name}-{name}",
        qos="",  # the partition's default QOS (datatrove asks for one named "normal", which not every cluster has)
        logging_dir=logging_dir,
        depends=depends,
        venv_path=_venv_activate(),
    )


def _venv_activate() -> str | None:
    """The activate script of the virtual environment this Python runs in (activated or not), which each
    Slurm job sources: it puts datatrove's launch_pickled_pipeline and this project on the job's PATH."""
    activate = Path(sys.prefix, "bin", "activate")
    return str(activate) if sys.prefix != sys.base_prefix and activate.is_file() else None


# Ray rewrites 127.0.0.1 to this machine's network address, and its servers then listen on every interface,
# unless this is 0 (read once, when ray is imported).
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_ray(address: str | None) -> None:
    """Connect to the Ray cluster at `address` (host:port), or start a Ray on this machine for the run.

    The Ray started here listens on 127.0.0.1 only, and its processes end with this one: at exit, and on
    Linux when this one is killed (Ray's fate sharing). After a kill -9, two of Ray's agents would first
    spend a minute trying to report the loss to the Ray that is gone; a guard process stops them
    (common/processes.py). It starts afresh whatever /tmp/ray holds (address "local": a stale cluster file
    there is never attached to).
    """
    if address is None and "ray" not in sys.modules:
        os.environ.setdefault(RAY_LOOPBACK_ENV, "0")
    if address is not None:
        _check_reachable(address)
    import ray

    if not ray.is_initialized():
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)
        if address is None:  # Ray's agents are up once init returns (and the guard looks again each second)
            stop_descendants_at_exit()


def _check_reachable(address: str) -> None:
    """Fail at once when nothing listens at a host:port --ray-address (Ray itself retries for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in host:
        return  # Ray's other address forms ("auto", "ray://..."): Ray's own error
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise ShardingError(
            f"--ray-address {address}: no Ray cluster answers there ({exc.strerror or exc}); start one "
            "with `ray start --head`, or leave --ray-address out to start a Ray for the run"
        ) from exc
