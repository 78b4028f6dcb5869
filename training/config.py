"""Typed run configuration: dataclasses loaded from YAML, overridden from the command line.

One run config is a dataclass whose fields are sections (themselves dataclasses: model, data, optim,
train, logging). Values come, in increasing priority, from the dataclass defaults, the YAML file given
with `--config`, and `--section.key value` (or `--section.key=value`) arguments::

    python pretrain_llama.py --config configs/pretrain/demo.yaml --optim.lr 3e-4 --model.n_layers 2

A section whose class has a `from_preset(name, **overrides)` constructor (ModelConfig) accepts a
`preset:` key; every other key of that section overrides the preset. Values are converted to the
field's declared type (YAML reads `3e-4` as a string; the declared `float` wins). An unknown key is an
error that names the valid keys. `--help` lists every key with its type, default and the field's
docstring. The resolved config is written beside every checkpoint (`config.yaml`) and read back with
`load_config`, so later stages rebuild exactly the same model.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from common.files import write_atomic

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the key, the file and the valid keys."""


def parse_config(
    cls: type[T], argv: list[str] | None = None, *, aliases: dict[str, str] | None = None, prog: str = ""
) -> T:
    """Build `cls` from `--config FILE` plus `--dotted.key value` overrides in `argv` (default sys.argv).

    `aliases` maps short flags to dotted keys (e.g. {"resume": "train.resume"}). `--help` prints the
    keys and exits.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    aliases = aliases or {}
    if "-h" in argv or "--help" in argv:
        print(config_help(cls, prog=prog, aliases=aliases))
        raise SystemExit(0)
    config_path: str | None = None
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: expected --config FILE or --section.key VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            config_path = value
        else:
            overrides.append((aliases.get(key, key), value))
    raw: dict[str, Any] = {}
    source = "defaults"
    if config_path is not None:
        raw = read_yaml(config_path)
        source = config_path
    for dotted, value in overrides:
        _check_dotted(cls, dotted)
        _set_dotted(raw, dotted, _CliValue(value))
    return build_dataclass(cls, raw, source=source)


def load_config(cls: type[T], path_or_dict: str | Path | dict[str, Any]) -> T:
    """Rebuild a config from a saved `config.yaml` (or an already loaded dict)."""
    if isinstance(path_or_dict, dict):
        return build_dataclass(cls, path_or_dict, source="dict")
    return build_dataclass(cls, read_yaml(path_or_dict), source=str(path_or_dict))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain dict (YAML/JSON serialisable) of a config dataclass, nested sections included."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`, with a clear error for a missing file or a non-mapping document."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------------
# Building dataclasses from nested dicts


class _CliValue(str):
    """A value typed on the command line: parsed as YAML when the field type is not a plain str."""


def build_dataclass(cls: type[T], raw: dict[str, Any], *, source: str, prefix: str = "") -> T:
    """Instantiate dataclass `cls` from a nested dict, converting every value to its declared type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    raw = dict(raw)
    preset = raw.pop("preset", None) if hasattr(cls, "from_preset") else None
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        valid = sorted(fields) + (["preset"] if hasattr(cls, "from_preset") else [])
        raise ConfigError(
            f"{source}: unknown key '{prefix}{key}'{hint}; valid keys in "
            f"'{prefix.rstrip('.') or 'config'}': {', '.join(valid)}"
        )
    kwargs = {name: _convert(raw[name], hints[name], source, prefix + name) for name in raw}
    try:
        if preset is not None:
            return cls.from_preset(str(preset), **kwargs)  # type: ignore[attr-defined]
        return cls(**kwargs)
    except (TypeError, ValueError, KeyError) as exc:
        if isinstance(exc, ConfigError):
            raise
        where = prefix.rstrip(".") or "config"
        if any(isinstance(v, _CliValue) for v in [*raw.values(), preset]):
            source = "command line" if source == "defaults" else f"{source} with the command-line overrides"
        raise ConfigError(f"{source}: invalid '{where}' section: {exc}") from exc


def _convert(value: Any, tp: Any, source: str, key: str) -> Any:
    if isinstance(value, _CliValue):  # errors name where the value came from
        source = f"command line (--{key})"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        is_null = value is None or (isinstance(value, _CliValue) and value.lower() in ("none", "null", "~"))
        if is_null and type(None) in typing.get_args(tp):
            return None
        errors = []
        for option in options:
            try:
                return _convert(value, option, source, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{source}: bad value for '{key}': {value!r}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        return build_dataclass(tp, value, source=source, prefix=key + ".")
    if isinstance(value, _CliValue) and tp is not str and tp is not Any:
        value = yaml.safe_load(str(value))
    try:
        if tp is Any:
            return value
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin in (list, tuple):
            if isinstance(value, str):  # one string for a list of strings: `--data.shards 'dir/*.zst'`
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            (item_tp, *_) = typing.get_args(tp) or (Any,)
            items = [_convert(v, item_tp, source, key) for v in value]
            return items if origin is list else tuple(items)
        if origin is dict or tp is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if origin is typing.Literal:
            if value not in typing.get_args(tp):
                raise ConfigError(f"{source}: '{key}' must be one of {typing.get_args(tp)}, got {value!r}")
            return value
    except (TypeError, ValueError) as exc:
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{source}: '{key}' must be {name}, got {value!r}") from exc
    return value


def _check_dotted(cls: type, dotted: str) -> None:
    """Reject a command-line key that names no field, listing the valid keys where it went wrong."""
    node: Any = cls
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"--{dotted}: '{prefix}' is a value, not a section")
        fields = {f.name: f for f in dataclasses.fields(node) if f.init}
        if part == "preset" and hasattr(node, "from_preset") and depth == len(parts) - 1:
            return
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown option --{dotted}{hint}; valid keys in '{prefix or 'config'}': {', '.join(sorted(fields))}"
            )
        node = typing.get_type_hints(node)[part]
        if depth < len(parts) - 1 and not dataclasses.is_dataclass(node):
            raise ConfigError(f"--{dotted}: '{'.'.join(parts[: depth + 1])}' is a value, not a section")
    if dataclasses.is_dataclass(node):
        raise ConfigError(f"--{dotted} is a section; set one of its keys, e.g. --{dotted}.KEY VALUE")


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted}: '{part}' is not a section")
        node = child
    node[leaf] = value


# ---------------------------------------------------------------------------------------------------
# Help text from the fields' docstrings


def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: the string literal right after it, or its trailing `#` comment."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, [*body[1:], None]):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            name = node.target.id
            if (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[name] = " ".join(nxt.value.value.split())
            elif "#" in lines[node.end_lineno - 1]:  # type: ignore[operator]
                docs[name] = lines[node.end_lineno - 1].split("#", 1)[1].strip()  # type: ignore[operator]
    return docs


def config_help(cls: type, *, prog: str = "", aliases: dict[str, str] | None = None) -> str:
    """Usage text listing every key of `cls` (recursively) with its type, default and documentation."""
    out = [
        f"usage: {prog or 'python script.py'} --config FILE.yaml [--section.key VALUE ...]",
        "",
        "Values: dataclass defaults < the YAML file < command-line overrides (`--key value` or `--key=value`).",
    ]
    if aliases:
        out.append("Aliases: " + ", ".join(f"--{a} = --{k}" for a, k in aliases.items()))
    _help_lines(cls, "", out)
    return "\n".join(out)


def _help_lines(cls: type, prefix: str, out: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    is_section = {f.name: dataclasses.is_dataclass(hints[f.name]) for f in dataclasses.fields(cls)}
    values = [f for f in dataclasses.fields(cls) if not is_section[f.name]]
    if values:
        preset = f" (also: --{prefix}preset NAME)" if hasattr(cls, "from_preset") else ""
        out.extend(["", f"[{prefix.rstrip('.') or 'top level'}]{preset}"])
        section_doc = inspect.getdoc(cls)
        if section_doc and prefix:
            out.append("  " + section_doc.splitlines()[0])
    for f in values:
        tp = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        type_name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        out.append(f"  --{prefix}{f.name} ({type_name}, default {default})")
        if f.name in docs:
            out.append(textwrap.fill(docs[f.name], 100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    for f in dataclasses.fields(cls):
        if is_section[f.name]:
            _help_lines(hints[f.name], prefix + f.name + ".", out)


# ---------------------------------------------------------------------------------------------------
# The shared loop's own sections (the model and data sections belong to models/ and dataset/)


@dataclasses.dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr * min_lr_ratio (at train.max_steps)."""
    warmup_steps: int = 2000
    """Optimizer steps of linear warmup from lr/warmup_steps to lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay for matrices (norms, biases and embeddings get none)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    fused: bool | None = None
    """Use torch's fused AdamW kernel; None = yes where the training device has one (CUDA, CPU, ...)."""


@dataclasses.dataclass
class TrainConfig:
    """Length, batch, precision, checkpointing and evaluation cadence."""

    output_dir: str = "runs/pretrain"
    """Checkpoints (step-N/), metrics.jsonl, the loss curve and the final Hugging Face export go here."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; global batch = micro batch x grad_accum_steps x processes."""
    precision: str = "bf16"
    """fp32, bf16 or fp16 (autocast; master weights stay fp32). Overrides accelerate's mixed_precision."""
    seed: int = 0
    """Seed for model initialisation and every random number generator (per rank: seed + rank)."""
    compile: bool = False
    """torch.compile the model (GPU speed feature; works on CPU too but compiles slowly)."""
    checkpoint_every: int = 1000
    """Save a resumable checkpoint every N optimizer steps (and always at the end); 0 = only at the end."""
    keep_last: int = 3
    """Keep only the newest K checkpoints (0 keeps all)."""
    resume: str = ""
    """'auto' resumes from the newest complete checkpoint in output_dir (fresh start when none), a path
    resumes from that step-N folder, empty starts fresh (refusing to overwrite existing checkpoints)."""
    eval_every: int = 500
    """Validation loss and perplexity every N steps (and at the end); 0 disables validation."""
    eval_batches: int = 20
    """Batches of the held-out stream per validation (the same batches every time)."""
    max_nonfinite_steps: int = 5
    """Stop the run after this many consecutive steps with a non-finite loss (each one is skipped)."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for the MFU figure; None = look the GPU up in the table (n/a on CPU)."""
    export_hf: bool = True
    """Export the final model (and tokenizer) in Hugging Face format to output_dir/hf."""
    debug_nan_steps: list[int] = dataclasses.field(default_factory=list)
    """Testing aid: replace the loss with NaN at these optimizer steps (1-based) to exercise the skip logic."""


@dataclasses.dataclass
class LoggingConfig:
    """Where metrics go: the progress bar, metrics.jsonl, wandb, sample generations."""

    log_every: int = 10
    """Write a metrics line (and refresh the progress bar figures) every N steps."""
    progress_bar: bool = True
    """Show a tqdm progress bar on the main process."""
    wandb_project: str | None = None
    """Log to this Weights & Biases project (offline mode without WANDB_API_KEY); None disables wandb."""
    wandb_run_name: str | None = None
    """wandb run name (default: the output folder's name)."""
    sample_every: int = 0
    """Generate from sample_prompts every N steps and log the text; 0 disables sampling."""
    sample_prompts: list[str] = dataclasses.field(
        default_factory=lambda: ["The meaning of life is", "def fibonacci(n):", "今天天气"]
    )
    """Fixed prompts for the periodic sample generations."""
    sample_max_new_tokens: int = 32
    """Tokens generated per sample."""
    plot: bool = True
    """Write loss_curve.png (train and validation loss) at the end."""
