"""A run's report card rendered: `report.md` and the export's model card (`README.md`, with the Hub's YAML
front matter), both from the facts that training/report.py gathers, so their figures always agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data.job import CURATION_REASONS

LICENSE = "mit"  # the project's (LICENSE); a run on data with other terms should say so in its card
SAMPLE_DOCS = 200  # documents of each source whose bytes per token the report measures
EVALUATE_HINT = "python evaluate.py --model {hf} --output {run}/evaluation.json"


def _num(value: Any, spec: str = ",") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and value != value:  # NaN
        return "n/a"
    return format(value, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _data_lines(facts: dict[str, Any]) -> list[str]:
    data = facts["data"]
    lines: list[str] = []
    if data.get("kind") == "shards":
        for folder in data["folders"]:
            lines.append(
                f"{folder['role'].capitalize()} shards: `{folder['folder']}` ({folder['shards']} shards)"
                + ("" if "sources" in folder else ", no manifest.json")
            )
            if "sources" in folder:
                lines.append("")
                lines += _table(
                    [
                        "source",
                        "records",
                        "documents",
                        "duplicates dropped",
                        "near-duplicates",
                        "filtered (language, quality)",
                        "malformed lines",
                        "invalid UTF-8",
                    ],
                    [
                        [
                            name,
                            _num(s["records"]),
                            _num(s["documents"]),
                            _num(s["duplicate"]),
                            _num(s.get("near_duplicate", 0)),
                            _num(sum(s.get(k, 0) for k in CURATION_REASONS)),
                            _num(s["malformed"]),
                            _num(s["invalid_utf8"]),
                        ]
                        for name, s in folder["sources"].items()
                    ],
                )
            lines.append("")
        if data.get("mixture"):
            lines.append(
                "Mixture (token share): " + ", ".join(f"{k} {v}" for k, v in data["mixture"].items())
            )
    else:
        lines.append(
            f"Prepared data: `{data['folder']}` (from {', '.join(map(str, data['files'])) or 'n/a'})"
        )
        if data.get("sources"):
            keys = sorted({k for s in data["sources"].values() for k in s} - {"records", "kept", "tokens"})
            lines.append("")
            lines += _table(
                ["source", "records", "kept", "tokens", *keys],
                [
                    [
                        name,
                        _num(s.get("records")),
                        _num(s.get("kept")),
                        _num(s.get("tokens")),
                        *(_num(s.get(k)) for k in keys),
                    ]
                    for name, s in data["sources"].items()
                ],
            )
        if data.get("validation"):
            lines.append("")
            lines.append("Held out: " + ", ".join(f"{k} {_num(v)}" for k, v in data["validation"].items()))
    for name, counts in data.get("counted", {}).items():
        lines.append(
            f"- {name.replace('_', ' ')} (trained): " + ", ".join(f"{k} {_num(v)}" for k, v in counts.items())
        )
    return lines


def _tokenizer_lines(facts: dict[str, Any]) -> list[str]:
    tok, train, val = facts["tokenizer"], facts["training"], facts["validation"]
    lines = [f"- vocabulary: {_num(tok.get('vocab_size'))} (`{tok['path']}`)"]
    for source, ratio in tok.get("bytes_per_token", {}).items():
        lines.append(f"- bytes per token, {source}: {ratio:.2f} (its first {SAMPLE_DOCS} documents)")
    if train.get("bytes_per_token"):
        lines.append(f"- bytes per token, trained targets (last step): {train['bytes_per_token']:.2f}")
    if val.get("bytes_per_token"):
        lines.append(f"- bytes per token, held-out targets: {val['bytes_per_token']:.2f}")
    return lines


def _training_lines(facts: dict[str, Any]) -> list[str]:
    t = facts["training"]
    mfu = "n/a (no peak FLOPs for this device)" if t.get("mfu") is None else f"{t['mfu']:.1%}"
    return [
        f"- steps: {_num(t.get('steps'))} of {_num(t.get('max_steps'))}; "
        f"{_num(t.get('micro_batch'))} rows x {_num(t.get('seq_len'))} tokens x "
        f"{_num(t.get('grad_accum_steps'))} accumulation steps per process; peak lr {t.get('lr')}; {t.get('precision')}",
        f"- tokens: {_num(t.get('tokens'))}",
        f"- time: {_duration(t.get('seconds'))}; tokens/s: {_num(t.get('tokens_per_s'), ',.0f')}; MFU: {mfu}",
        f"- peak memory: {_num(t.get('peak_memory_gib'), '.2f')} GiB per process",
        f"- loss: {_num(t.get('first_loss'), '.4f')} at the first step, {_num(t.get('final_loss'), '.4f')} at the last"
        f"; {_num(t.get('nonfinite_steps'))} step(s) skipped for a non-finite loss",
    ]


def _validation_lines(facts: dict[str, Any]) -> list[str]:
    val = facts["validation"]
    if not val:
        return ["No validation (train.eval_every 0, or no held-out data)."]
    lines = [f"At step {val['step']}:"]
    figures = {k: v for k, v in val.items() if k != "step" and not isinstance(v, dict)}
    for key in ("loss", "ppl", "bpb"):
        if key in figures:
            lines.append(f"- {_LABELS[key]}: {_num(figures.pop(key), '.4f')}")
    lines += [
        f"- {k.replace('_', ' ')}: {_num(v, '.4f')}" for k, v in figures.items() if k != "bytes_per_token"
    ]
    for key, per_source in val.items():
        if isinstance(per_source, dict):
            lines.append(
                f"- {key.replace('_', ' ')}: "
                + ", ".join(f"{s} {_num(v, '.4f')}" for s, v in per_source.items())
            )
    return lines


_LABELS = {"loss": "loss", "ppl": "perplexity", "bpb": "bits per byte"}


def _evaluation_lines(facts: dict[str, Any], *, card: bool = False) -> list[str]:
    """evaluate.py's result when one was added, then the training loop's last scores when it logged any."""
    result = facts.get("evaluation")
    in_loop = facts.get("in_loop_evaluation") or {}
    if result:
        lines = _offline_lines(result)
    elif card:
        lines = ["Not evaluated on downstream tasks yet (`python evaluate.py --model PATH`)."]
    else:
        command = EVALUATE_HINT.format(hf=Path(facts["run_dir"]) / "hf", run=facts["run_dir"])
        lines = [
            f"Not evaluated yet: `{command}`; `training.report.add_evaluation(RUN_DIR, result)` then puts its "
            "result here and in the model card."
        ]
    if in_loop:
        lines += ["", f"In the training loop (`eval.tasks`), at step {in_loop['step']}:", ""]
        lines += _in_loop_lines(in_loop)
    return lines


def _in_loop_lines(in_loop: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    tasks = in_loop.get("tasks") or {}
    if tasks:
        lines += _table(
            ["task", "accuracy", "centered", "gold bits per byte"],
            [
                [
                    name,
                    _num(t.get("accuracy"), ".4f"),
                    _num(t.get("centered"), ".4f"),
                    _num(t.get("bpb"), ".4f"),
                ]
                for name, t in tasks.items()
            ],
        )
    return lines + _core_and_bpb_lines(in_loop)


def _offline_lines(result: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    tasks = result.get("tasks") or {}
    if tasks:
        lines += _table(
            ["task", "accuracy", "centered", "documents", "metric"],
            [
                [
                    name,
                    _num(t.get("accuracy"), ".4f"),
                    _num(t.get("centered"), ".4f"),
                    _num(t.get("n")),
                    t.get("metric", ""),
                ]
                for name, t in tasks.items()
            ],
        )
    return lines + _core_and_bpb_lines(result)


def _core_and_bpb_lines(scores: dict[str, Any]) -> list[str]:
    """The CORE line and bits per byte by source, for in-loop and offline scores alike."""
    lines = []
    if scores.get("core") is not None:
        lines.append(f"\nCORE (mean centered accuracy): {_num(scores['core'], '.4f')}")
    if scores.get("bpb"):
        lines.append(
            "\nBits per byte by source: "
            + ", ".join(f"{s} {_num(v, '.4f')}" for s, v in scores["bpb"].items())
        )
    return lines


def _sample_lines(facts: dict[str, Any]) -> list[str]:
    if not facts["samples"]:
        return ["None logged (logging.sample_every 0)."]
    lines = []
    for entry in facts["samples"]:
        lines.append(f"Step {entry['step']}:")
        lines.append("")
        for prompt, text in entry["samples"].items():
            lines.append(f"- `{_inline(prompt)}` → {_inline(text)!r}")
        lines.append("")
    return lines


def _inline(text: str) -> str:
    return text.replace("`", "'").replace("\n", "\\n")


def _model_line(facts: dict[str, Any]) -> str:
    m = facts["model"]
    return (
        f"{_num(m.get('parameters'))} parameters: {m.get('n_layers')} layers, width {m.get('dim')}, "
        f"{m.get('n_heads')} heads ({m.get('n_kv_heads')} key/value), vocabulary {_num(m.get('vocab_size'))}, "
        f"context {_num(m.get('max_seq_len'))}"
    )


def render_report(facts: dict[str, Any]) -> str:
    """report.md: every section of the module docstring."""
    out = [f"# {facts['name']}: {facts['stage']} report", ""]
    out.append(f"Run folder `{facts['run_dir']}`, written {facts['written']}.")
    if facts.get("init"):
        out.append(f"Started from `{facts['init']}` ({facts['base_model']}).")
    out += ["", f"Model: {_model_line(facts)}.", ""]
    out += ["## Data", "", *_data_lines(facts), ""]
    out += ["## Tokenizer", "", *_tokenizer_lines(facts), ""]
    out += ["## Training", "", *_training_lines(facts), ""]
    out += ["## Validation", "", *_validation_lines(facts), ""]
    out += ["## Downstream scores", "", *_evaluation_lines(facts), ""]
    out += ["## Samples", "", *_sample_lines(facts)]
    env = facts.get("environment")
    out += ["## Environment", ""]
    if env:
        out += [
            f"- {k.replace('_', ' ')}: {v if v is not None else 'n/a (not a git checkout)'}"
            for k, v in env.items()
        ]
    else:
        out.append("n/a")
    out += ["", "## Provenance", ""]
    prov = facts.get("provenance") or {}
    for entry in prov.get("shards", []):
        out.append(
            f"- shards `{entry['folder']}`: manifest.json sha256 {entry['manifest_sha256'] or 'n/a (no manifest)'}"
        )
    if "prepared_data" in prov:
        entry = prov["prepared_data"]
        out.append(
            f"- prepared data `{entry['folder']}`: report.json sha256 {entry['report_sha256'] or 'n/a'}"
        )
    if "tokenizer" in prov:
        out.append(
            f"- tokenizer `{prov['tokenizer']['path']}`: tokenizer.model sha256 {prov['tokenizer']['sha256'] or 'n/a'}"
        )
    if "init" in prov:
        out.append(
            f"- initial model `{prov['init']['path']}`: weights sha256 {prov['init']['sha256'] or 'n/a'}"
        )
    return "\n".join(out).rstrip() + "\n"


def render_card(facts: dict[str, Any]) -> str:
    """The export's README.md: the Hub's YAML front matter, then the report's figures in prose."""
    from huggingface_hub import EvalResult, ModelCardData

    result = facts.get("evaluation") or {}
    evals = [
        EvalResult(
            task_type="text-generation",
            dataset_type=name,
            dataset_name=name,
            metric_type=task.get("metric") or "accuracy",
            metric_value=task["accuracy"],
        )
        for name, task in (result.get("tasks") or {}).items()
        if task.get("accuracy") is not None
    ] + [
        EvalResult(
            task_type="text-generation",
            dataset_type=source,
            dataset_name=source,
            metric_type="bits_per_byte",
            metric_value=value,
        )
        for source, value in (result.get("bpb") or {}).items()
        if value is not None
    ]
    card = ModelCardData(
        model_name=facts["name"],
        license=LICENSE,
        language=facts.get("language") or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["llama", "open-llama", facts["stage"].replace(" ", "-")],
        base_model=facts.get("base_model"),
        eval_results=evals or None,
    )
    stage = facts["stage"]
    intro = f"A Llama model ({_model_line(facts)}), trained by Open-Llama's {stage}"
    intro += f" from `{facts['base_model']}`." if facts.get("base_model") else " from scratch."
    out = ["---", card.to_yaml().rstrip(), "---", "", f"# {facts['name']}", "", intro, ""]
    out += [
        "It loads in stock transformers with no custom code:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "```",
        "",
    ]
    out += ["## Training data", "", *_data_lines(facts), ""]
    out += ["## Tokenizer", "", *_tokenizer_lines(facts), ""]
    out += ["## Training", "", *_training_lines(facts), ""]
    out += ["## Evaluation", "", "Held-out data:", "", *_validation_lines(facts), "", "Downstream tasks:", ""]
    out += _evaluation_lines(facts, card=True)
    out += [
        "",
        "## Limitations",
        "",
        "A research model: it has not been aligned for safety, and it repeats the biases and errors of its "
        "training data.",
    ]
    return "\n".join(out).rstrip() + "\n"
