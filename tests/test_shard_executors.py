"""data/shard.py on Ray and Slurm gives the local executor's bytes, and leaves nothing running.

- Ray: a two-node cluster on 127.0.0.1 (`ray start --head`, then `ray start --address`), every Ray process
  listening on loopback only; a Ray started for the run; a run killed with kill -9, then rerun; a task's
  error reaching the command. The cluster is stopped by the PIDs the test started.
- Slurm: the job scripts submitted to a fake `sbatch`, then run in order as Slurm runs each array task.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from data.shard import main as shard_main
from tests.helpers.shards import make_corpus, shard_hashes

REPO = Path(__file__).resolve().parent.parent
SHARD = [sys.executable, str(REPO / "data" / "shard.py")]
ARGS = ["--lines-per-shard", "64", "--no-progress"]
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="ray is not installed (requirements.txt: ray[default])"
)


def run_shard(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SHARD, *map(str, args), *ARGS],
        capture_output=True,
        text=True,
        env=env or os.environ,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[Path], Path]:
    """The small corpus with duplicates and its output from --executor local --workers 2."""
    root = tmp_path_factory.mktemp("corpus")
    inputs = make_corpus(root / "in")
    result = run_shard(*inputs, "--output-dir", root / "local", "--executor", "local", "--workers", "2")
    assert result.returncode == 0, result.stderr
    return inputs, root / "local"


# --- Slurm -------------------------------------------------------------------------------------------


FAKE_SBATCH = """#!/bin/sh
# Saves each job script (its last argument) with the other arguments, and answers as sbatch does.
n=$(( $(cat "$SBATCH_DIR/count" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$SBATCH_DIR/count"
for arg; do script="$arg"; done
cp "$script" "$SBATCH_DIR/job-$n.sh"
for arg; do [ "$arg" = "$script" ] || echo "$arg"; done > "$SBATCH_DIR/job-$n.args"
echo "Submitted batch job $((1000 + n))"
"""
# srun -l -n 1 COMMAND...: one task on this node, so COMMAND itself.
FAKE_SRUN = """#!/bin/sh
while [ "${1#-}" != "$1" ]; do case "$1" in -n|-N) shift;; esac; shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/sh
echo "$3"
"""


def _fake_slurm(folder: Path) -> dict:
    folder.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    # This Python's bin folder is left out of PATH: the job scripts must activate the environment themselves.
    path = [p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != Path(sys.executable).parent]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV" and not k.startswith("SLURM_")}
    return env | {"PATH": os.pathsep.join([str(folder), *path]), "SBATCH_DIR": str(folder)}


def _sbatch_directives(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script, re.MULTILINE))


def test_slurm_job_scripts_and_running_them_as_slurm_would(reference, tmp_path):
    inputs, local = reference
    out = tmp_path / "out"
    env = _fake_slurm(tmp_path / "bin")
    command = [*inputs, "--output-dir", out, "--executor", "slurm", "--slurm-partition", "cpu-small"]
    command += ["--slurm-time", "01:00:00", "--slurm-cpus", "2", "--workers", "3"]
    result = run_shard(*command, env=env)
    assert result.returncode == 0, result.stderr
    assert "submitted to Slurm" in result.stderr and not (out / "manifest.json").exists()

    logs = out / ".shard-state" / "logs"
    stages = [("read", 3), ("exact", 1), ("final", 3), ("manifest", 1)]
    jobs = Path(env["SBATCH_DIR"])
    assert int((jobs / "count").read_text()) == len(stages)  # one job per stage
    in_venv = sys.prefix != sys.base_prefix
    for number, (stage, tasks) in enumerate(stages, 1):
        script = (jobs / f"job-{number}.sh").read_text()
        assert _sbatch_directives(script) == {
            "partition": "cpu-small",
            "time": "01:00:00",
            "cpus-per-task": "2",
            "mem-per-cpu": "2G",  # --slurm-mem-gb 4 over 2 CPUs
            "nodes": "1",
            "job-name": f"open-llama-shard-{stage}",
            "array": f"0-{tasks - 1}%3",  # a task per input (or one), at most --workers at once
            "output": f"{logs / stage}/slurm_logs/%A_%a.out",
            "error": f"{logs / stage}/slurm_logs/%A_%a.out",
            "requeue": "",
        }
        assert (f"source {Path(sys.prefix, 'bin', 'activate')}" in script) == in_venv
        assert re.search(
            rf"^srun .*launch_pickled_pipeline {logs / stage}/executor\.pik$", script, re.MULTILINE
        )
        args = (jobs / f"job-{number}.args").read_text().split()
        dependency = [f"--dependency=afterok:{1000 + number - 1}"] if number > 1 else []
        assert args == ["--export=ALL,RUN_OFFSET=0", *dependency]

    # Each array task as Slurm would start it: the job script with its SLURM_ARRAY_TASK_ID, in order.
    for number, (stage, tasks) in enumerate(stages, 1):
        for task in range(tasks):
            slurm = {"SLURM_ARRAY_TASK_ID": str(task), "RUN_OFFSET": "0", "SLURM_NODELIST": "node1"}
            job = subprocess.run(
                ["bash", jobs / f"job-{number}.sh"],
                env=env | slurm,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert job.returncode == 0, f"{stage} task {task}: {job.stderr[-3000:]}"
    assert shard_hashes(out) == shard_hashes(local)

    again = run_shard(*command, env=env)  # the same command once the jobs are done: the summary, no new job
    assert again.returncode == 0, again.stderr
    assert "nothing to do: already complete" in again.stderr
    assert int((jobs / "count").read_text()) == len(stages)
    assert not (out / ".shard-state").exists()


def test_slurm_without_a_partition_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    argv = [str(tmp_path / "in.jsonl"), "--output-dir", str(tmp_path / "out"), "--executor", "slurm"]
    assert shard_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--executor slurm needs --slurm-partition" in err


# --- watching the processes a test starts ----------------------------------------------------------


class ProcessWatch:
    """Every process below `roots` (PIDs or psutil.Process), sampled in a thread while the `with` block
    runs: each under the root it was seen below, with every name it had (Ray renames its workers) and the
    addresses it listened on. Processes are remembered from the moment they are first seen, since Ray's
    outlive their parents."""

    def __init__(self, *roots: int | psutil.Process) -> None:
        self.roots = [r if isinstance(r, psutil.Process) else psutil.Process(r) for r in roots]
        self.seen: dict[int, psutil.Process] = {}
        self.titles: dict[int, set[str]] = {}
        self.under: dict[int, set[int]] = {}
        self.listening: dict[int, set[tuple[str, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample(listening=True)

    def _watch(self) -> None:
        ticks = 0
        while not self._stop.wait(0.1):
            ticks += 1
            self.sample(listening=ticks % 3 == 0)

    def sample(self, listening: bool = False) -> None:
        for root in self.roots:
            try:
                children = root.children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                self.seen.setdefault(child.pid, child)
                self.under.setdefault(root.pid, set()).add(child.pid)
                self.titles.setdefault(child.pid, set()).add(_title(child))
        if listening:  # one read of the system's socket table, not one per process
            for conn in psutil.net_connections("inet"):
                if conn.status == psutil.CONN_LISTEN and conn.pid in self.seen:
                    self.listening.setdefault(conn.pid, set()).add((conn.laddr.ip, conn.laddr.port))

    def forget(self, pids) -> None:
        for pid in pids:
            self.seen.pop(pid, None)

    def names(self, root: int | None = None) -> set[str]:
        pids = self.seen if root is None else self.under.get(root, set()) & self.seen.keys()
        return {title for pid in pids for title in self.titles.get(pid, ())}

    def alive(self, within: float = 10.0) -> list[str]:
        """The processes seen that are still running `within` seconds from now (a zombie is not running)."""
        deadline = time.monotonic() + within
        while True:
            alive = [p for p in self.seen.values() if _running(p)]
            if not alive or time.monotonic() > deadline:
                return [f"{p.pid} {sorted(self.titles.get(p.pid, ()))}" for p in alive]
            time.sleep(0.2)

    def kill_leftovers(self) -> None:
        for proc in self.seen.values():
            if _running(proc):
                proc.kill()

    def non_loopback(self) -> dict[str, set]:
        return {
            f"{pid} {sorted(self.titles.get(pid, ()))}": {a for a in addrs if a[0] not in LOOPBACK}
            for pid, addrs in self.listening.items()
            if pid in self.seen and any(a[0] not in LOOPBACK for a in addrs)
        }


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _title(proc: psutil.Process) -> str:
    """The process's name and first words of its command line (Ray sets its workers' to `ray::<actor or
    IDLE>`). The name comes first: a long install path would push a program's own name out of the cut."""
    try:
        return f"{proc.name()} {' '.join(proc.cmdline())[:80]}"
    except psutil.Error:
        return "?"


# --- Ray ---------------------------------------------------------------------------------------------


def ray_env(root: Path, loopback: bool = True) -> dict:
    """Usage stats off; token auth with a token of the test's own (nothing written to ~/.ray); Ray's files
    under `root`. `loopback`: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, without which Ray rewrites 127.0.0.1 to
    this machine's network address and listens on every interface."""
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_TMPDIR": str(root),
    }
    env.pop("RAY_ADDRESS", None)
    if loopback:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


# With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the only way Ray 2.60 keeps a node on 127.0.0.1), `ray start
# --address` refuses to add a node, multi-node clusters being unsupported on Windows and macOS; on Linux
# that refusal is all there is, so the second node's `ray start` runs with it lifted.
RAY_START_SECOND_NODE = (
    "import sys, types, ray.scripts.scripts as cli; "
    "cli.ray_constants = types.SimpleNamespace(**{**vars(cli.ray_constants), 'ENABLE_RAY_CLUSTER': True}); "
    "sys.argv[0] = 'ray'; cli.main()"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_start(command: list[str], log: Path, env: dict) -> subprocess.Popen:
    """A `ray start --block` node; its Ray processes are its children, stopped with it by SIGTERM."""
    with open(log, "w") as fh:
        process = subprocess.Popen(
            [*command, "--block"], env=env, stdout=fh, stderr=subprocess.STDOUT, cwd="/"
        )
    deadline = time.monotonic() + 60
    while "Ray runtime started" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    return process


@needs_ray
def test_ray_started_for_the_run_stays_on_loopback_and_leaves_nothing(reference, tmp_path_factory):
    inputs, local = reference
    root = tmp_path_factory.mktemp("rayrun")
    out = root / "out"
    env = ray_env(root, loopback=False)  # data/executors.py's start_ray keeps it on 127.0.0.1 by itself
    (root / "tmp").mkdir()
    env["TMPDIR"] = str(root / "tmp")  # where datatrove puts its Ray tasks' logs before copying them
    process = subprocess.Popen(
        [*SHARD, *map(str, inputs), "--output-dir", str(out), "--executor", "ray", "--workers", "2", *ARGS],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watch = ProcessWatch(process.pid)
    try:
        with watch:
            _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        assert shard_hashes(out) == shard_hashes(local)
        names = " ".join(watch.names())
        assert "gcs_server" in names and "raylet" in names and "RankWorker" in names, names
        assert not watch.alive(), "Ray processes outlived the command"
        assert watch.listening and not watch.non_loopback(), watch.non_loopback()
        assert list((root / "tmp").iterdir()) == []  # each task's temporary folder is gone
    finally:
        watch.kill_leftovers()


@needs_ray
def test_kill_9_of_a_run_that_started_its_ray_leaves_nothing(reference, tmp_path_factory):
    """Ray's agents would spend a minute reporting the loss of their Ray; the run's guard stops them."""
    inputs, _ = reference
    root = tmp_path_factory.mktemp("raykill")  # a short path: Ray's socket paths have a length limit
    out = root / "out"
    process = subprocess.Popen(
        [*SHARD, *map(str, inputs), "--output-dir", str(out), "--executor", "ray", "--workers", "2", *ARGS],
        env={**ray_env(root), "OPEN_LLAMA_SHARD_DELAY": "0.05"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    watch = ProcessWatch(process.pid)
    try:
        with watch:
            deadline = time.monotonic() + 90
            while not list(out.glob(".shard-state/work/*.jsonl.zst")) and time.monotonic() < deadline:
                assert process.poll() is None, "the job finished before it could be killed"
                time.sleep(0.01)
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        names = " ".join(watch.names())
        assert "DashboardAgent" in names and "RuntimeEnvAgent" in names and "RankWorker" in names, names
        assert not watch.alive(within=15), "processes of the killed run still running"
    finally:
        watch.kill_leftovers()


class RayCluster:
    def __init__(self, address: str, env: dict, nodes: list[subprocess.Popen], watch: ProcessWatch) -> None:
        self.address, self.env, self.nodes, self.watch = address, env, nodes, watch
        self.args = ["--executor", "ray", "--ray-address", address]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Two Ray nodes of one CPU each on 127.0.0.1, each with a temp dir of its own; stopped at the end by
    the PIDs started (not `ray stop`, which kills every Ray process of the machine by name)."""
    root = tmp_path_factory.mktemp("ray")
    env = ray_env(root)
    nodes: list[subprocess.Popen] = []
    ray = str(Path(sys.executable).parent / "ray")
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--dashboard-agent-listen-port", "0"]
    watch = ProcessWatch()
    try:
        head = [ray, "start", "--head", "--port", "0", "--include-dashboard", "false", *common]
        head += ["--ray-client-server-port", str(_free_port()), "--temp-dir", str(root / "head")]
        nodes.append(_ray_start(head, root / "head.log", env))
        watch.roots.append(psutil.Process(nodes[0].pid))
        address = (root / "head" / "ray_current_cluster").read_text().strip()
        second = [sys.executable, "-c", RAY_START_SECOND_NODE, "start", "--address", address, *common]
        nodes.append(_ray_start([*second, "--temp-dir", str(root / "node2")], root / "node2.log", env))
        watch.roots.append(psutil.Process(nodes[1].pid))
        with watch:
            yield RayCluster(address, env, nodes, watch)
        for node in reversed(nodes):
            node.send_signal(signal.SIGTERM)
            node.wait(60)
        assert not watch.alive(), "Ray processes left after stopping the cluster"
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
        watch.kill_leftovers()


@needs_ray
def test_two_node_ray_cluster_on_loopback_gives_the_local_bytes(ray_cluster, reference, tmp_path):
    inputs, local = reference
    out = tmp_path / "ray"
    args = [*inputs, "--output-dir", out, *ray_cluster.args, "--workers", "2"]
    result = run_shard(*args, env=ray_cluster.env)
    assert result.returncode == 0, result.stderr
    assert shard_hashes(out) == shard_hashes(local)
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert set(config) == {"version", "options", "inputs"}
    assert not {"executor", "workers", "ray_address"} & set(config["options"])

    watch = ray_cluster.watch
    watch.sample(listening=True)
    for node in ray_cluster.nodes:  # each node ran tasks: an actor of datatrove's in its process tree
        assert any("RankWorker" in name for name in watch.names(node.pid)), watch.names()
    assert len(watch.listening) >= 6, watch.listening  # GCS, raylets, agents, workers: all were seen
    assert not watch.non_loopback(), watch.non_loopback()


@needs_ray
def test_kill_9_on_ray_and_rerun_gives_the_same_bytes(ray_cluster, reference, tmp_path):
    inputs, local = reference
    out = tmp_path / "out"
    args = [*inputs, "--output-dir", out, *ray_cluster.args, "--workers", "2"]
    before = {p.pid for root in ray_cluster.watch.roots for p in root.children(recursive=True)}
    process = subprocess.Popen(
        [*SHARD, *map(str, args), *ARGS],
        env={**ray_cluster.env, "OPEN_LLAMA_SHARD_DELAY": "0.05"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    watch = ProcessWatch(process.pid, *ray_cluster.watch.roots)  # what the run starts, there and here
    try:
        with watch:
            deadline = time.monotonic() + 60
            while len(list(out.glob(".shard-state/work/*.jsonl.zst"))) < 3 and time.monotonic() < deadline:
                assert process.poll() is None, "the job finished before it could be killed"
                time.sleep(0.01)
            os.kill(process.pid, signal.SIGKILL)  # the command only: the cluster's own processes stay
            process.wait()
        watch.forget(before)
        assert any("RankWorker" in name for name in watch.names()), watch.names()
        assert not watch.alive(), "processes of the killed run still running"
    finally:
        watch.forget(before)
        watch.kill_leftovers()
    files = sorted(p.relative_to(out) for p in out.rglob("*"))
    time.sleep(0.5)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == files  # nothing writes there any more
    assert not (out / "manifest.json").exists()

    result = run_shard(*args, env=ray_cluster.env)
    assert result.returncode == 0, result.stderr
    assert shard_hashes(out) == shard_hashes(local)
    assert not (out / ".shard-state").exists()


@needs_ray
def test_a_failed_ray_task_stops_the_run_with_its_error(ray_cluster, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    args = [bad, "--output-dir", tmp_path / "out", *ray_cluster.args]
    began = time.monotonic()
    result = run_shard(*args, "--strict", env=ray_cluster.env)
    assert result.returncode == 1
    assert f"error: {bad}:2: malformed JSON" in result.stderr and "(--strict)" in result.stderr
    assert time.monotonic() - began < 60  # not datatrove's wait for the failed stage, two minutes at a time
    log = tmp_path / "out/.shard-state/logs/read/logs/task_00000.log"  # copied from the task's own folder
    assert f"(task 0 on Ray; its log: {log})" in result.stderr and "malformed JSON" in log.read_text()


def test_a_ray_address_where_nothing_listens_fails_at_once(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    address = f"127.0.0.1:{_free_port()}"  # closed again: nothing listens there
    argv = [str(tmp_path / "in.jsonl"), "--output-dir", str(tmp_path / "out"), "--executor", "ray"]
    began = time.monotonic()
    assert shard_main([*argv, "--ray-address", address, "--no-progress"]) == 1
    assert f"error: --ray-address {address}: no Ray cluster answers there" in capsys.readouterr().err
    assert time.monotonic() - began < 10  # Ray itself would retry for minutes
