"""A run's report card: `report.md` in the output folder and the model card (`README.md`) of its export.

Both are rendered from one set of facts that `collect` gathers from the run folder alone, so any stage's
run (and a later evaluation) gives the same figures in both:

- data: the sources, documents and tokens (pretraining: the shard folders' `manifest.json`, with the
  duplicate and malformed lines the sharder dropped; tuning: the prepared data's `report.json`), and what
  the training stream counted (`metrics.jsonl`'s last record, e.g. tokens per source);
- tokenizer: vocabulary, bytes per token (per source, measured on the first documents of each source's
  shards, for pretraining; the training and held-out targets' means from the metrics);
- training: steps, tokens, time, tokens/s, MFU, peak memory, losses (`metrics.jsonl`);
- validation: the last held-out loss, perplexity and bits per byte, and each source's bits per byte where a
  metrics record or the evaluation has them;
- downstream scores: `evaluate.py`'s result (`{"model", "tasks": {name: {"accuracy", "centered", "n",
  "metric"}}, "core", "bpb": {source: ..}}`) when given, and the last in-loop scores (`eval.tasks`:
  metrics.jsonl's `eval/<task>/<figure>`, `eval/core`, `eval/bpb/<source>`) when the run logged any;
- samples logged during the run (the first and the last sampling step);
- environment (the report's writer only): git commit, versions, hardware;
- provenance: the sha256 of each shard folder's manifest.json, of the tokenizer's tokenizer.model and of
  the --init model's weight files.

`write_report` (the runner calls it on the main process when a run ends) writes `report.json` (the facts)
and `report.md`; `add_evaluation(run_dir, result)` puts an evaluation into both and into the export's card.
The model's name is the run's (`run_name`): `logging.wandb_run_name` when set, else the output folder's
path below `runs/` joined with `-` (`runs/demo/sft` -> `demo-sft`), else the folder's parent and name.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from common.files import write_atomic
from training.report_markdown import SAMPLE_DOCS, render_card, render_report

REPO = Path(__file__).resolve().parent.parent
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
CARD = "README.md"


# ---------------------------------------------------------------------------------------------------
# The run's name


def run_name(output_dir: str | Path, wandb_run_name: str | None = None) -> str:
    """The run's name (module docstring): `runs/demo/sft` -> `demo-sft`, `runs/sft` -> `sft`."""
    if wandb_run_name:
        return wandb_run_name
    path = Path(os.path.abspath(output_dir))
    parts = path.parts
    if "runs" in parts[:-1]:
        below = parts[len(parts) - 1 - parts[::-1].index("runs") + 1 :]
        return "-".join(below)
    return f"{path.parent.name}-{path.name}" if path.parent.name else path.name


def stage_of(config: dict[str, Any]) -> str:
    """Which stage wrote a run config (its sections tell)."""
    if "loss" in config and "reference" in config:
        return "preference tuning"
    if "shards" in (config.get("data") or {}):
        return "pretraining"
    return "instruction tuning"


# ---------------------------------------------------------------------------------------------------
# Gathering the facts


def collect(
    run_dir: str | Path,
    *,
    evaluation: dict[str, Any] | None = None,
    accelerator: Any = None,
    provenance: bool = True,
) -> dict[str, Any]:
    """The facts of the run in `run_dir` (its config.yaml and metrics.jsonl, and the inputs they name).

    `accelerator` (the run's) adds the environment; `provenance` hashes the inputs (the --init model's
    weights can be large: the model card, written at export time, goes without)."""
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    records = _records(run_dir / "metrics.jsonl")
    data = config.get("data") or {}
    stage = stage_of(config)
    name = run_name(
        config.get("train", {}).get("output_dir") or run_dir, config.get("logging", {}).get("wandb_run_name")
    )
    facts: dict[str, Any] = {
        "name": name,
        "stage": stage,
        "run_dir": str(run_dir),
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "init": config.get("init") or None,
        "base_model": _model_name(config["init"]) if config.get("init") else None,
        "model": _model_facts(config.get("model") or {}),
        "data": _pretraining_data(data) if stage == "pretraining" else _prepared_data(data, run_dir),
        "training": _training(records, config),
        "validation": _validation(records),
        "samples": _samples(records),
        "evaluation": evaluation,
        "in_loop_evaluation": _in_loop_evaluation(records),
    }
    facts["data"]["counted"] = {
        k: v for k, v in (records[-1] if records else {}).items() if isinstance(v, dict) and k != "samples"
    }
    facts["tokenizer"] = _tokenizer(data, stage)
    facts["language"] = _languages(facts)
    if accelerator is not None:
        facts["environment"] = environment(accelerator, config)
    if provenance:
        facts["provenance"] = _provenance(config, facts)
    return facts


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _model_name(path: str) -> str:
    """The name an --init export of ours records, else the path as given."""
    from common.run_folder import checkpoint_folder
    from models.hf import recorded_model_name

    try:
        folder = checkpoint_folder(path)
    except (OSError, ValueError):
        return path
    return recorded_model_name(folder) or recorded_model_name(folder / "hf") or path


def _model_facts(model: dict[str, Any]) -> dict[str, Any]:
    keys = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "tie_embeddings")
    facts = {k: model[k] for k in keys if k in model}
    try:
        import torch

        from models.llama import Llama, ModelConfig

        with torch.device("meta"):  # the shape alone: no memory, no time
            facts["parameters"] = Llama(ModelConfig.from_dict(model)).num_parameters()
    except Exception:  # a shape the config cannot rebuild: the report goes without the count
        pass
    return facts


def _pretraining_data(data: dict[str, Any]) -> dict[str, Any]:
    """Each shard folder's manifest: per source the records, documents, duplicates and bad lines."""
    folders = []
    for role, patterns in (
        ("training", data.get("shards") or []),
        ("held out", data.get("validation_shards") or []),
    ):
        for folder in _shard_folders(patterns):
            entry: dict[str, Any] = {"folder": str(folder), "role": role, "shards": len(_shards_in(folder))}
            manifest = folder / "manifest.json"
            if manifest.is_file():
                content = json.loads(manifest.read_text())
                entry["manifest_sha256"] = _sha256(manifest)
                entry["totals"] = content.get("totals", {})
                entry["sources"] = _manifest_sources(content)
            folders.append(entry)
    return {"kind": "shards", "folders": folders, "mixture": data.get("mixture") or {}}


def _shard_folders(patterns: Iterable[str]) -> list[Path]:
    from data.shard_io import expand_shard_paths

    try:
        paths = expand_shard_paths(list(patterns)) if patterns else []
    except FileNotFoundError:  # moved since the run: the report says what it still finds
        paths = []
    return list(dict.fromkeys(p.resolve().parent for p in paths))


def _shards_in(folder: Path) -> list[Path]:
    from data.shard_io import shards_in

    return shards_in(folder)


def _manifest_sources(manifest: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per source: records, documents, and what was removed (the manifest's own per-source counts; older
    manifests only had them per input)."""
    if "sources" in manifest:
        return {name: {k: int(v) for k, v in counts.items()} for name, counts in manifest["sources"].items()}
    counts = (
        "records",
        "documents",
        "duplicate",
        "malformed",
        "invalid_utf8",
        "empty",
        "too_short",
        "too_long",
    )
    sources: dict[str, dict[str, int]] = {}
    for entry in manifest.get("inputs", []):
        source = sources.setdefault(entry.get("source") or "?", dict.fromkeys(counts, 0))
        for key in counts:
            source[key] += int(entry.get(key) or 0)
    return sources


def _prepared_data(data: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The prepared data's report (what each source gave, what was dropped and why)."""
    folder = Path(data.get("cache_dir") or run_dir / "data")
    path = folder / "report.json"
    facts: dict[str, Any] = {"kind": "prepared", "folder": str(folder), "files": data.get("files") or []}
    if path.is_file():
        report = json.loads(path.read_text())
        facts["report_sha256"] = _sha256(path)
        facts["seq_len"] = report.get("seq_len")
        facts["sources"] = {
            name: {k: v for k, v in source.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            for name, source in report.get("sources", {}).items()
        }
        facts["validation"] = {
            name: source.get("kept", 0) for name, source in report.get("validation", {}).items()
        }
    return facts


def _training(records: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    train, data = config.get("train") or {}, config.get("data") or {}
    facts: dict[str, Any] = {
        "max_steps": train.get("max_steps"),
        "precision": train.get("precision"),
        "seq_len": data.get("seq_len"),
        "micro_batch": data.get("batch_size"),
        "grad_accum_steps": train.get("grad_accum_steps"),
        "lr": (config.get("optim") or {}).get("lr"),
    }
    steps = [r for r in records if "tokens_seen" in r]
    if not steps:
        return facts
    last = steps[-1]
    losses = [r["loss"] for r in steps if r.get("loss") is not None]
    mfus = [r["mfu"] for r in steps if r.get("mfu") is not None]
    memory = [r["memory_gib"] for r in steps if r.get("memory_gib") is not None]
    facts.update(
        steps=last["step"],
        tokens=last["tokens_seen"],
        seconds=last.get("elapsed_s"),
        tokens_per_s=last["tokens_seen"] / last["elapsed_s"] if last.get("elapsed_s") else None,
        mfu=sum(mfus) / len(mfus) if mfus else None,
        peak_memory_gib=max(memory) if memory else None,
        first_loss=losses[0] if losses else None,
        final_loss=losses[-1] if losses else None,
        nonfinite_steps=last.get("nonfinite_steps", 0),
        bytes_per_token=last.get("bytes_per_token"),
    )
    return facts


def _validation(records: list[dict[str, Any]]) -> dict[str, Any]:
    validated = [r for r in records if r.get("val_loss") is not None]
    if not validated:
        return {}
    last = validated[-1]
    facts = {
        "step": last["step"],
        **{k.removeprefix("val_"): v for k, v in last.items() if k.startswith("val_")},
    }
    return facts


def _in_loop_evaluation(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The last record's downstream scores from the training loop: {"step", "tasks": {task: {"accuracy",
    "centered", "bpb"}}, "core", "bpb": {source: ..}}; empty when the run scored none."""
    scored = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not scored:
        return {}
    last = scored[-1]
    tasks: dict[str, dict[str, float]] = {}
    bpb: dict[str, float] = {}
    for key, value in last.items():
        parts = key.split("/")
        if parts[0] != "eval" or len(parts) != 3:
            continue
        if parts[1] == "bpb":
            bpb[parts[2]] = value
        else:
            tasks.setdefault(parts[1], {})[parts[2]] = value
    return {"step": last.get("step"), "tasks": tasks, "core": last.get("eval/core"), "bpb": bpb}


def _samples(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    sampled = [r for r in records if r.get("samples")]
    chosen = sampled[:1] + sampled[-1:] if len(sampled) > 1 else sampled
    return [{"step": r["step"], "samples": r["samples"]} for r in chosen]


def _tokenizer(data: dict[str, Any], stage: str) -> dict[str, Any]:
    path = Path(data.get("tokenizer") or "")
    facts: dict[str, Any] = {"path": str(path)}
    try:
        from dataset.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(path)
    except Exception:  # moved or removed since the run
        return facts
    facts["vocab_size"] = tokenizer.vocab_size
    if stage == "pretraining":
        facts["bytes_per_token"] = _bytes_per_token(tokenizer, data.get("shards") or [])
    return facts


def _bytes_per_token(tokenizer: Any, patterns: list[str]) -> dict[str, float]:
    """UTF-8 bytes per token of the first SAMPLE_DOCS documents of each source's first shard."""
    from data.shard_io import expand_shard_paths, iter_shard_records
    from dataset.rank_shards import shard_source

    try:
        paths = expand_shard_paths(patterns)
    except FileNotFoundError:
        return {}
    first: dict[str, Path] = {}
    for path in paths:
        first.setdefault(shard_source(path), path)
    ratios = {}
    for source, path in sorted(first.items()):
        n_bytes = n_tokens = 0
        for i, record in enumerate(iter_shard_records(path)):
            if i == SAMPLE_DOCS:
                break
            text = record.get("text") or ""
            n_bytes += len(text.encode("utf-8"))
            n_tokens += len(tokenizer.encode(text))
        if n_tokens:
            ratios[source] = n_bytes / n_tokens
    return ratios


def _languages(facts: dict[str, Any]) -> list[str]:
    """The card's languages: a tuned model keeps its base's card's; otherwise English, and Chinese when a
    source is the project's Chinese corpus (WuDao, or a source named zh*)."""
    init = facts.get("init")
    if init:
        card = _front_matter(Path(init) / CARD)
        if card.get("language"):
            return list(card["language"])
    sources: set[str] = set()
    for folder in facts["data"].get("folders", []):
        sources.update(folder.get("sources", {}))
    sources.update(facts["data"].get("sources", {}))
    languages = ["en"]
    if any("wudao" in s.lower() or s.lower().startswith("zh") for s in sources):
        languages.append("zh")
    return languages


def _front_matter(path: Path) -> dict[str, Any]:
    """The YAML front matter of a model card (empty when there is none)."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    return (yaml.safe_load(text[4:end]) or {}) if end > 0 else {}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(folder: str | Path) -> str | None:
    """sha256 over a model folder's weight files (each file's name and content, in name order); None when
    it holds none."""
    from common.run_folder import checkpoint_folder

    try:
        folder = checkpoint_folder(folder)
    except (OSError, ValueError):
        return None
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + _sha256(path).encode() + b"\n")
    return digest.hexdigest()


def _provenance(config: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    data = config.get("data") or {}
    facts_data = facts["data"]
    provenance: dict[str, Any] = {}
    if facts_data.get("kind") == "shards":
        provenance["shards"] = [
            {"folder": f["folder"], "manifest_sha256": f.get("manifest_sha256")}
            for f in facts_data["folders"]
        ]
    else:
        provenance["prepared_data"] = {
            "folder": facts_data["folder"],
            "report_sha256": facts_data.get("report_sha256"),
        }
    model_file = Path(data.get("tokenizer") or "") / "tokenizer.model"
    provenance["tokenizer"] = {
        "path": data.get("tokenizer"),
        "sha256": _sha256(model_file) if model_file.is_file() else None,
    }
    if config.get("init"):
        provenance["init"] = {"path": config["init"], "sha256": fingerprint(config["init"])}
    return provenance


def environment(accelerator: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Where the run ran: git commit, versions, hardware."""
    import accelerate
    import torch
    import transformers

    device = accelerator.device
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = _cpu_name()
    return {
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "platform": platform.platform(),
        "processes": accelerator.num_processes,
        "distributed": str(accelerator.distributed_type).split(".")[-1],
        "device": f"{device.type}: {hardware}",
        "cpu_count": os.cpu_count(),
        "precision": (config.get("train") or {}).get("precision"),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The checkout's commit (`+changes` when files differ from it); None outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if dirty else "")


# ---------------------------------------------------------------------------------------------------
# Writing


def write_report(
    run_dir: str | Path, *, accelerator: Any = None, evaluation: dict[str, Any] | None = None
) -> Path:
    """Write report.json and report.md in `run_dir` (atomically); returns report.md's path."""
    run_dir = Path(run_dir)
    return _write(run_dir, collect(run_dir, evaluation=evaluation, accelerator=accelerator))


def add_evaluation(run_dir: str | Path, evaluation: dict[str, Any]) -> Path:
    """Put `evaluation` (evaluate.py's result) into the run's report and its export's model card."""
    run_dir = Path(run_dir)
    facts = json.loads((run_dir / REPORT_JSON).read_text())
    facts["evaluation"] = evaluation
    path = _write(run_dir, facts)
    hf_dir = run_dir / "hf"
    if (hf_dir / "config.json").is_file():
        write_atomic(hf_dir / CARD, render_card(facts))
    return path


def _write(run_dir: Path, facts: dict[str, Any]) -> Path:
    write_atomic(run_dir / REPORT_JSON, json.dumps(facts, indent=1, ensure_ascii=False) + "\n")
    write_atomic(run_dir / REPORT_MD, render_report(facts))
    return run_dir / REPORT_MD


def model_card(run_dir: str | Path, *, evaluation: dict[str, Any] | None = None) -> str:
    """The model card of the run in `run_dir` (for its export, written at the end of training)."""
    return render_card(collect(run_dir, evaluation=evaluation, provenance=False))
