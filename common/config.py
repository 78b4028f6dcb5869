"""Typed run configuration: dataclass sections from a YAML file, overridden from the command line.

Values come, in increasing priority, from the dataclass defaults, a section's preset, the `--config` file
and `--section.key value`. jsonargparse (litgpt's choice) layers and parses them: exact types (`7.9e0` is
not an int), the choices (`Literal[...]`) and ranges (`PositiveInt`, ...) the fields declare, `--help` from
the fields' docstrings, presets as a section's defaults (`set_defaults`). This layer adds: every problem as
one `ConfigError` line naming the key, its source and, for an unknown key, a "did you mean" and the valid
keys; one value for a list key as a one-item list; a tool's command line (arguments without `--`, `--flag`
and `--no-flag`, aliases); `given_keys`; `save_config` / `load_config` for the copy beside a checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import docstring_parser
import yaml
from jsonargparse import ArgumentParser, Namespace, set_parsing_settings

from common.files import write_atomic

# The string literal after each field is its help text (off by default in jsonargparse: it reads source).
set_parsing_settings(docstring_parse_attribute_docstrings=True)

T = TypeVar("T")
COMMAND_LINE = "command line"
BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "null"}  # what jsonargparse reads as a bool or None
_GIVEN = "_config_given_keys"


class ConfigError(ValueError):
    """A config that cannot be loaded; the one-line message names the key, where it came from, the valid keys."""


def parse_config(
    cls: type[T],
    argv: list[str] | None = None,
    *,
    aliases: dict[str, str] | None = None,
    prog: str = "",
    allow_extra_sections: bool = False,
    positional: str | None = None,
) -> T:
    """Build `cls` from `--config FILE` plus `--dotted.key value` overrides in `argv` (default sys.argv).

    `aliases` maps other flag names to keys ({"resume": "train.resume"}). A bool key is true given alone or
    before an argument that is not a bool word (`--strict`), false as `--no-KEY`. `positional` names the
    top-level field that the arguments without `--` and its own `--FIELD VALUE`s fill, in order (one value
    unless it is a list). `allow_extra_sections` ignores the file's sections that `cls` has no field for (a
    tool reading one section of a run config). `--help` prints every key, its type, default and docs.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = config_parser(cls, prog, aliases or {}, positional)
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        raise SystemExit(0)
    config_path, overrides = _read_argv(cls, argv, aliases or {}, positional)
    file = _read_yaml(config_path) if config_path is not None else {}
    if allow_extra_sections:
        file = {key: value for key, value in file.items() if key in config_fields(cls)}
    config, given = _resolve(cls, parser, file, config_path or "", overrides)
    object.__setattr__(config, _GIVEN, frozenset(given))  # not a field: never saved, compared or printed
    return config


def given_keys(config: Any) -> frozenset[str]:
    """The keys (`model.dim`, ...) the file, the command line or a preset there set, for `parse_config`'s."""
    return getattr(config, _GIVEN, frozenset())


def load_config(cls: type[T], path_or_dict: str | Path | dict[str, Any]) -> T:
    """Rebuild a config from a saved `config.yaml` (or an already loaded dict)."""
    source = "dict" if isinstance(path_or_dict, dict) else str(path_or_dict)
    values = path_or_dict if isinstance(path_or_dict, dict) else _read_yaml(path_or_dict)
    return _resolve(cls, config_parser(cls), values, source, [])[0]


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain dict (YAML/JSON serialisable) of a config dataclass, nested sections included."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True))


def config_parser(
    cls: type, prog: str = "", aliases: dict[str, str] | None = None, positional: str | None = None
) -> ArgumentParser:
    """`--key` per value, a group of `--section.key` per section (added here: jsonargparse's own nesting also
    offers a `--section FILE` that this layer does not take), and a description of what `cls` takes."""
    sections = {name: tp for name, tp in config_fields(cls).items() if dataclasses.is_dataclass(tp)}
    key = "--section.key" if sections else "--key"
    preset = ["a section's preset"] if any(hasattr(s, "preset_fields") for s in sections.values()) else []
    layers = " < ".join(["the dataclass defaults", *preset, "the --config file", f"{key} VALUE"])
    notes = [f"Values: {layers} (or {key}=VALUE)."]
    notes += [f"--{alias} is short for --{target}." for alias, target in (aliases or {}).items()]
    if flags := [name for name, tp in _leaves(cls) if bool in _options(tp)]:
        notes.append(f"A yes/no key alone is true (--{flags[0]}), --no-KEY is false (--no-{flags[0]}).")
    usage = f"{prog or '%(prog)s'} [--config FILE.yaml] [{key} VALUE ...]"
    if positional:
        many = _is_list(config_fields(cls)[positional])
        usage += f" [{positional.upper()} ...]" if many else f" {positional.upper()}"
        notes.append(f"Arguments without -- set {positional}.")
    description = f"{class_doc(cls).split(chr(10))[0]} {' '.join(notes)}".strip()
    # Errors become one-line ConfigErrors, not a usage dump and exit 2.
    parser = ArgumentParser(prog=prog or None, usage=usage, description=description, exit_on_error=False)
    what = "one mapping per section (model:, data:, ...)" if sections else "the keys below"
    parser.add_argument("--config", help=f"YAML run config: {what}.")
    parser.add_class_arguments(cls, as_group=False, skip=set(sections))
    docs, factories = field_docs(cls), {f.name: f.default_factory for f in dataclasses.fields(cls)}
    for name, section in sections.items():
        title = " ".join((docs.get(name) or class_doc(section) or name).split()).rstrip(".")
        group = parser.add_argument_group(title, name=name)
        # The values a default factory sets (SFTConfig's train.output_dir), not all of its fields: a field
        # left to __post_init__ (ModelConfig's derived ones) must be derived from the final values.
        made = dataclasses.asdict(factories[name]() if callable(factories[name]) else section())
        plain = dataclasses.asdict(section())
        default = {key: value for key, value in made.items() if value != plain[key]}
        group.add_class_arguments(section, name, as_group=False, default=default)
        if hasattr(section, "preset_fields"):
            group.add_argument(f"--{name}.preset", type=str | None, default=None, help=preset_help(section))
    return parser


def _read_argv(
    cls: type, argv: list[str], aliases: dict[str, str], positional: str | None
) -> tuple[str | None, list[tuple[str, str]]]:
    """`--config FILE` and the (dotted key, value) overrides in order: aliases, flags (`--strict`,
    `--no-dedup`) and the positional field's values (its `--FIELD VALUE`s, the arguments without --)."""
    config_path, overrides, bare, args = None, [], [], list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            if positional is None:
                raise ConfigError(f"unexpected argument {arg!r}: expected --config FILE or --KEY VALUE")
            bare.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        key = aliases.get(name, name)
        if not eq and (negated := _negation(cls, name, aliases)):
            key, value = negated, "false"
        elif not eq and bool in _options(_lookup(cls, key, None)):  # a flag, unless a bool word follows
            value = args.pop(0) if args and args[0].lower() in BOOL_WORDS else "true"
        elif not eq:
            if not args:
                raise ConfigError(f"--{name} needs a value")
            value = args.pop(0)
        if key == "config":
            config_path = value
        elif key == positional:
            bare.append(value)
        else:
            overrides.append((key, value))
    if bare:
        many = _is_list(_lookup(cls, positional, ""))
        if not many and len(bare) > 1:
            raise ConfigError(f"'{positional}' takes one value (one argument without --), got {bare}")
        overrides.insert(0, (positional, json.dumps(bare) if many else bare[0]))
    return config_path, overrides


def _negation(cls: type, name: str, aliases: dict[str, str]) -> str | None:
    """The bool key that `--no-KEY` names (`--no_KEY`, dashes for underscores and aliases too)."""
    if name[:3] not in ("no-", "no_") or _lookup(cls, aliases.get(name, name), None) is not None:
        return None
    keys = (aliases.get(name[3:], name[3:]), name[3:].replace("-", "_"))
    return next((key for key in keys if bool in _options(_lookup(cls, key, None))), None)


def _resolve(
    cls: type[T], parser: ArgumentParser, file: dict[str, Any], source: str, overrides: list[tuple[str, str]]
) -> tuple[T, set[str]]:
    """Check the keys, layer the values through jsonargparse, then build the dataclasses."""
    flat = _flatten(cls, file, source)
    cli = [(key, _option(cls, key, value)) for key, value in overrides]
    given = [(source, key, value) for key, value in flat.items()]
    given += [(f"{COMMAND_LINE} (--{key})", key, value) for key, value in cli]
    # A preset (the last one given for a section) is its section's defaults: the file and the command line
    # override any of its keys whatever their order, and __post_init__ derives the rest from the result.
    keys = {key.removesuffix("+") for _, key, _ in given}
    presets = {key.removesuffix(".preset"): (w, value) for w, key, value in given if key.endswith(".preset")}
    for name, (where, preset) in presets.items():
        try:
            fields = _lookup(cls, name, "").preset_fields(str(preset))
        except ValueError as exc:
            raise ConfigError(f"{where}: invalid '{name}' section: {exc}") from None
        parser.set_defaults({f"{name}.{key}": value for key, value in fields.items()})
        keys |= {f"{name}.{key}" for key in fields}
    try:
        argv = [f"--{key}={value}" for key, value in cli]
        values = parser.parse_args(argv, namespace=parser.parse_object(Namespace(**flat).as_dict()))
    except argparse.ArgumentError as exc:
        raise _value_error(cls, exc, given) from None
    return _build(cls, values, "", given), keys


def _build(cls: type[T], values: Namespace, prefix: str, given: list[tuple[str, str, Any]]) -> T:
    """Instantiate `cls` and its sections; numbers as plain int and float (YAML cannot write PositiveInt)."""
    kwargs = {}
    for name, tp in config_fields(cls).items():
        value = values.get(name)
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.", given)
        elif name in values:
            ranged = isinstance(value, (int, float)) and type(value) not in (int, float, bool)
            kwargs[name] = (int if isinstance(value, int) else float)(value) if ranged else value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # the section's own __post_init__ checks
        found = [
            COMMAND_LINE if w.startswith(COMMAND_LINE) else w for w, k, _ in given if k.startswith(prefix)
        ]
        where = " and the ".join(dict.fromkeys(found)) or "defaults"
        raise ConfigError(f"{where}: invalid '{prefix.rstrip('.') or 'config'}' section: {exc}") from None


def _value_error(cls: type, exc: argparse.ArgumentError, given: list[tuple[str, str, Any]]) -> ConfigError:
    """The first given value that its key's type rejects on its own (jsonargparse's message is not parsed)."""
    for where, key, value in given:
        tp = _lookup(cls, key.removesuffix("+"), "")
        probe = ArgumentParser(exit_on_error=False)
        probe.add_argument("--value", type=list[tp] if key.endswith("+") else tp)
        try:
            cli = where.startswith(COMMAND_LINE)
            probe.parse_args([f"--value={value}"]) if cli else probe.parse_object({"value": value})
        except argparse.ArgumentError:
            return ConfigError(f"{where}: '{key.removesuffix('+')}' must be {type_name(tp)}, got {value!r}")
    return ConfigError(" ".join(str(exc).split()))


def _flatten(cls: type, raw: Any, source: str, prefix: str = "") -> dict[str, Any]:
    """The file's values by dotted key, every key checked and one value for a list key made a list."""
    if raw is None:  # an empty section (`train:`)
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {raw!r}")
    flat = {}
    for key, value in raw.items():
        tp = _lookup(cls, f"{prefix}{key}", f"{source}: unknown key '{prefix}{key}'")
        if dataclasses.is_dataclass(tp):
            flat.update(_flatten(cls, value, source, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = _one_item_list(tp, value, cli=False)
    return flat


def _option(cls: type, key: str, value: str) -> str:
    """The value for `--key`, its key checked (jsonargparse's `--key+` appends one item to a list)."""
    tp = _lookup(cls, key.removesuffix("+"), f"unknown option --{key}")
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"--{key} is a section; set one of its keys, e.g. --{key}.KEY VALUE")
    return value if key.endswith("+") else _one_item_list(tp, value, cli=True)


def _one_item_list(tp: Any, value: Any, cli: bool) -> Any:
    """One value for a list key as a one-item list; on the command line, YAML text that is not a list."""
    if not _is_list(tp) or value is None:
        return value
    try:
        loaded = yaml.safe_load(value) if cli else value
    except yaml.YAMLError:  # e.g. a glob starting with `*`
        loaded = value
    if loaded is None or isinstance(loaded, list):
        return value
    return json.dumps([value]) if cli else [value]  # JSON: the string as typed; jsonargparse converts it


def _lookup(cls: type, dotted: str, unknown: str | None) -> Any:
    """The declared type of a dotted key; an unknown one is an error (`unknown`, a suggestion, the valid
    keys), or None where `unknown` is None."""
    node: Any = cls
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        presets = ["preset"] if hasattr(node, "preset_fields") else []
        if part in presets and depth == len(parts) - 1:
            return str | None
        if dataclasses.is_dataclass(node) and part in config_fields(node):
            node = config_fields(node)[part]
            continue
        prefix = ".".join(parts[:depth])
        if unknown is None:
            return None
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"--{dotted}: '{prefix}' is a value, not a section")
        valid = sorted(config_fields(node)) + presets
        close = difflib.get_close_matches(part, valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{unknown}{hint}; valid keys in '{prefix or 'config'}': {', '.join(valid)}")
    return node


def _read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict | None):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data or {}


def config_fields(cls: type) -> dict[str, Any]:
    """A dataclass's init fields and their resolved types."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, type) of every value of a config, its sections' included."""
    for name, tp in config_fields(cls).items():
        yield from _leaves(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else [(prefix + name, tp)]


def _options(tp: Any) -> tuple[Any, ...]:
    """The members of a union (`list[str] | None`), or the type itself."""
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _is_list(tp: Any) -> bool:
    return any(typing.get_origin(option) is list for option in _options(tp))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, inherited fields included."""
    bases = reversed([base for base in cls.__mro__ if dataclasses.is_dataclass(base)])
    params = [p for base in bases for p in docstring_parser.parse_from_object(base).params]
    return {p.arg_name: p.description or "" for p in params}


def class_doc(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return "" if doc.startswith(f"{cls.__name__}(") else doc  # dataclass's stand-in for a missing one


def preset_help(section: type) -> str:
    """The help of a section's `preset` key: the first line of `preset_fields`'s docstring, and the rule."""
    about = (inspect.getdoc(section.preset_fields) or "A named preset.").splitlines()[0]
    return f"{about} Every other key of the section overrides the preset, in any order."


def type_name(tp: Any) -> str:
    """A declared type as written in the code: `int`, `PositiveInt | None`, `Literal['a', 'b']`."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return re.sub(r"\b(?:typing|[\w.]+)\.(\w+)", r"\1", str(tp))
