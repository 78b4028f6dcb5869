"""Typed run configuration: dataclass sections from a YAML file, overridden from the command line.

A run config is a dataclass whose fields are sections (dataclasses: model, data, optim, train, logging).
Values come, in increasing priority, from the dataclass defaults, a section's preset, the YAML file given
with `--config`, and `--section.key value` (or `--section.key=value`)::

    python pretrain_llama.py --config configs/pretrain/demo.yaml --optim.lr 3e-4 --model.n_layers 2

jsonargparse (litgpt's choice) builds the parser from the dataclasses: it converts each value exactly to
the field's declared type (`7.9e0` is not an int) and writes `--help` from the fields' docstrings. This
module adds what a run config needs on top of it:

- an unknown key is an error naming it, with a "did you mean" and the valid keys of its section;
- one value for a list key is a one-item list (`--data.shards 'dir/*.jsonl.zst'`);
- a section whose class has a `preset_fields(name)` classmethod (ModelConfig) accepts `preset: NAME`: the
  preset's fields replace the section's defaults, so every key given in the file or on the command line
  overrides them, and __post_init__ derives the derived fields from the final values;
- a section declared `Section | None = None` is optional: it stays None unless the file or the command line
  gives one of its keys (a fine-tuning run takes its model from `--init` unless a `model:` section is given);
- every problem is one `ConfigError` line saying whether the bad value came from the file or the command
  line (jsonargparse would print its usage and exit).

The resolved config is written beside every checkpoint (`save_config`) and read back with `load_config`,
so later stages rebuild exactly the same model. `config_reference_markdown` renders what `--help` says as
Markdown tables: the configuration reference at the end of each guide in docs/ (`make docs`).
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
from pathlib import Path
from typing import Any, TypeVar

import yaml
from jsonargparse import ArgumentParser, Namespace, set_parsing_settings

from common.files import write_atomic

# The string literal after each field is its help text (off by default in jsonargparse: it reads source).
set_parsing_settings(docstring_parse_attribute_docstrings=True)

T = TypeVar("T")
COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """A config that cannot be loaded; the one-line message names the key, where it came from, the valid keys."""


def parse_config(
    cls: type[T],
    argv: list[str] | None = None,
    *,
    aliases: dict[str, str] | None = None,
    prog: str = "",
    allow_extra_sections: bool = False,
) -> T:
    """Build `cls` from `--config FILE` plus `--dotted.key value` overrides in `argv` (default sys.argv).

    `aliases` maps short flags to dotted keys (e.g. {"resume": "train.resume"}). With
    `allow_extra_sections`, top-level sections of the file that `cls` has no field for are ignored (a tool
    reading one section of a whole run config); command-line keys stay strict. `--help` prints every key
    with its type, default and documentation, and exits.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    aliases = aliases or {}
    parser = _parser(cls, prog, aliases)
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        for name, tp in _fields(cls).items():
            section = _section_class(tp)
            if section is not None and section is not tp:  # optional: its keys are parsed on their own
                print(f"\nOptional section '{name}' (None unless one of its keys is given):")
                wrapper = dataclasses.make_dataclass(cls.__name__, [(name, section)])
                print(_parser(wrapper).format_help().split("\n\n", 3)[-1])
        raise SystemExit(0)
    config_path, overrides = _read_argv(argv, aliases)
    file: dict[str, Any] = {}
    if config_path is not None:
        file = _read_yaml(config_path)
        if allow_extra_sections:
            file = {key: value for key, value in file.items() if key in _fields(cls)}
    return _resolve(cls, parser, file, config_path or "", overrides)


def load_config(cls: type[T], path_or_dict: str | Path | dict[str, Any]) -> T:
    """Rebuild a config from a saved `config.yaml` (or an already loaded dict)."""
    if isinstance(path_or_dict, dict):
        return _resolve(cls, _parser(cls), path_or_dict, "dict", [])
    return _resolve(cls, _parser(cls), _read_yaml(path_or_dict), str(path_or_dict), [])


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain dict (YAML/JSON serialisable) of a config dataclass, nested sections included."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True))


# ---------------------------------------------------------------------------------------------------
# The parser and the layers: defaults < preset < file < command line


def _parser(cls: type, prog: str = "", aliases: dict[str, str] | None = None) -> ArgumentParser:
    """jsonargparse's parser for `cls`: one `--section.key` per field, documented by its docstring."""
    doc = inspect.getdoc(cls) or ""
    generated = doc.startswith(f"{cls.__name__}(")  # dataclass's stand-in for a missing docstring
    summary = doc.splitlines()[0] + " " if doc and not generated else ""
    short = "".join(f" --{alias} is short for --{key}." for alias, key in (aliases or {}).items())
    parser = ArgumentParser(
        prog=prog or None,
        usage=f"{prog or '%(prog)s'} [--config FILE.yaml] [--section.key VALUE ...]",
        description=f"{summary}Values: the dataclass defaults < a section's preset < the --config file < "
        f"--section.key VALUE (or --section.key=VALUE).{short}",
        exit_on_error=False,  # errors become one-line ConfigErrors, not a usage dump and exit 2
    )
    parser.add_argument("--config", help="YAML run config: one mapping per section (model:, data:, ...).")
    parser.add_class_arguments(cls)
    for name, tp in _fields(cls).items():
        if _section_class(tp) is not None:
            # jsonargparse also offers `--<section> FILE` (a section from a file of its own). Hidden: the
            # checks and the error sources here know only --config and --section.key.
            parser._option_string_actions[f"--{name}"].help = argparse.SUPPRESS
            if f"--{name}.help" in parser._option_string_actions:  # an optional section's class help
                parser._option_string_actions[f"--{name}.help"].help = argparse.SUPPRESS
        if hasattr(tp, "preset_fields"):
            first_line = (inspect.getdoc(tp.preset_fields) or "A named preset.").splitlines()[0]
            help_text = f"{first_line} Every other key of the section overrides the preset."
            parser.groups[name].add_argument(f"--{name}.preset", type=str | None, help=help_text)
    return parser


def _resolve(
    cls: type[T], parser: ArgumentParser, file: dict[str, Any], source: str, overrides: list[tuple[str, str]]
) -> T:
    """Check the keys, layer the values through jsonargparse, then build the dataclasses."""
    file, overrides, optional = _resolve_optional_sections(cls, file, source, overrides)
    checked_file = _check_file(cls, file, source)
    argv = [f"--{key}={_check_option(cls, key, value)}" for key, value in overrides]
    cli = dict(overrides)  # the values as typed, for the messages
    cfg = parser.get_defaults()
    for name, tp in _fields(cls).items():
        preset = cli.get(f"{name}.preset", _dig(file, f"{name}.preset"))
        if preset is not None and hasattr(tp, "preset_fields"):
            try:
                fields = tp.preset_fields(str(preset))
            except (KeyError, ValueError) as exc:
                where = f"{COMMAND_LINE} (--{name}.preset)" if f"{name}.preset" in cli else source
                raise ConfigError(f"{where}: invalid '{name}' section: {exc}") from None
            cfg = parser.parse_object({name: fields}, namespace=cfg)
    try:
        cfg = parser.parse_object(checked_file, namespace=cfg)
    except argparse.ArgumentError as exc:
        raise _value_error(cls, exc, source, lambda key: _dig(file, key)) from None
    try:
        cfg = parser.parse_args(argv, namespace=cfg)
    except argparse.ArgumentError as exc:
        raise _value_error(cls, exc, COMMAND_LINE, lambda key: cli.get(key, cli.get(f"{key}+"))) from None

    def where(prefix: str) -> str:
        given = [(source, _leaf_keys(checked_file)), (COMMAND_LINE, cli)]
        sources = [name for name, keys in given if any(key.startswith(prefix) for key in keys)]
        return " and the ".join(sources) or "defaults"

    return _build(cls, cfg, "", where, optional)


def _resolve_optional_sections(
    cls: type, file: dict[str, Any], source: str, overrides: list[tuple[str, str]]
) -> tuple[dict[str, Any], list[tuple[str, str]], dict[str, Any]]:
    """Resolve each optional section (`Section | None`) on its own: None when neither the file nor the
    command line gives one of its keys, else the section built like a required one (preset, file, command
    line). Returns the file and the overrides without those sections, and the sections.

    jsonargparse parses `Section | None` as a subclass-style value, whose command-line keys do not layer
    over file values; a one-field wrapper dataclass makes it an ordinary section again.
    """
    optional = {
        name: section
        for name, tp in _fields(cls).items()
        if (section := _section_class(tp)) is not None and section is not tp
    }
    if not optional or not isinstance(file, dict):
        return file, overrides, {}
    file, resolved = dict(file), {}
    for name, section in optional.items():
        part = file.pop(name, None)
        mine = [(key, value) for key, value in overrides if key.split(".")[0] == name]
        overrides = [item for item in overrides if item not in mine]
        if part is None and not mine:
            resolved[name] = None
            continue
        wrapper = dataclasses.make_dataclass(cls.__name__, [(name, section)])
        built = _resolve(wrapper, _parser(wrapper), {name: {} if part is None else part}, source, mine)
        resolved[name] = getattr(built, name)
    return file, overrides, resolved


def _build(
    cls: type[T],
    values: Namespace,
    prefix: str,
    where: typing.Callable[[str], str],
    given: dict[str, Any] | None = None,
) -> T:
    """Instantiate `cls` and its sections from parsed values (the `preset` keys are not fields); `given`
    holds sections already built (the optional ones)."""
    kwargs = dict(given or {})
    for name, tp in _fields(cls).items():
        if name in kwargs:
            continue
        if name in values:
            value = values[name]
            kwargs[name] = (
                _build(tp, value, f"{prefix}{name}.", where) if dataclasses.is_dataclass(tp) else value
            )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # the section's own __post_init__ checks
        raise ConfigError(
            f"{where(prefix)}: invalid '{prefix.rstrip('.') or 'config'}' section: {exc}"
        ) from None


def _value_error(
    cls: type, exc: argparse.ArgumentError, source: str, given: typing.Callable[[str], Any]
) -> ConfigError:
    """jsonargparse's multi-line message as one line: the key, its declared type, the value given."""
    message = str(exc)
    match = re.match(r'Parser key "([^"]+)"', message)
    if not match:
        return ConfigError(f"{source}: {' '.join(message.split())}")
    key = match[1]
    if source == COMMAND_LINE:
        source = f"{COMMAND_LINE} (--{key})"
    tp = _lookup(cls, key)
    type_name = str(tp).replace("typing.", "") if typing.get_origin(tp) else getattr(tp, "__name__", tp)
    return ConfigError(f"{source}: '{key}' must be {type_name}, got {given(key)!r}")


# ---------------------------------------------------------------------------------------------------
# Keys: unknown ones named with a suggestion, one value for a list key made a one-item list


def _check_file(cls: type, raw: Any, source: str, prefix: str = "") -> dict[str, Any]:
    """The file's values with every key checked against `cls` and one value for a list key made a list."""
    if raw is None:  # an empty section (`train:`)
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {raw!r}")
    fields = _fields(cls)
    checked = {}
    for key, value in raw.items():
        if key == "preset" and hasattr(cls, "preset_fields"):
            checked[key] = value
            continue
        if key not in fields:
            raise _unknown_key(cls, key, prefix, f"{source}: unknown key '{prefix}{key}'")
        if dataclasses.is_dataclass(fields[key]):
            value = _check_file(fields[key], value, source, f"{prefix}{key}.")
        elif _is_list(fields[key]) and value is not None and not isinstance(value, list):
            value = [value]
        checked[key] = value
    return checked


def _check_option(cls: type, key: str, value: str) -> str:
    """The value for `--key` (jsonargparse's `--key+` appends to a list), made a list where it must be one."""
    tp = _lookup(cls, key.removesuffix("+"))
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"--{key} is a section; set one of its keys, e.g. --{key}.KEY VALUE")
    if _is_list(tp) and not key.endswith("+"):
        try:
            loaded = yaml.safe_load(value)
        except yaml.YAMLError:  # e.g. a glob starting with `*`
            loaded = value
        if loaded is not None and not isinstance(loaded, list):
            return json.dumps([value])  # a JSON list of the string as typed; jsonargparse converts the item
    return value


def _lookup(cls: type, dotted: str) -> Any:
    """The declared type of a dotted key (`str` for a section's `preset`)."""
    node: Any = cls
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"--{dotted}: '{prefix}' is a value, not a section")
        if part == "preset" and depth == len(parts) - 1 and hasattr(node, "preset_fields"):
            return str
        fields = _fields(node)
        if part not in fields:
            raise _unknown_key(node, part, prefix + "." if prefix else "", f"unknown option --{dotted}")
        node = fields[part]
    return node


def _unknown_key(cls: type, key: str, prefix: str, what: str) -> ConfigError:
    valid = sorted(_fields(cls)) + (["preset"] if hasattr(cls, "preset_fields") else [])
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{what}{hint}; valid keys in '{prefix.rstrip('.') or 'config'}': {', '.join(valid)}")


# ---------------------------------------------------------------------------------------------------
# Small helpers


def _read_argv(argv: list[str], aliases: dict[str, str]) -> tuple[str | None, list[tuple[str, str]]]:
    """`--config FILE` and the (dotted key, value) overrides in order, aliases expanded."""
    config_path, overrides = None, []
    args = iter(argv)
    for arg in args:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: expected --config FILE or --section.key VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            value = next(args, None)
            if value is None:
                raise ConfigError(f"--{key} needs a value")
        if key == "config":
            config_path = value
        else:
            overrides.append((aliases.get(key, key), value))
    return config_path, overrides


def _read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`, with a clear error for a missing file or a non-mapping document."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _fields(cls: type) -> dict[str, Any]:
    """A dataclass's init fields and their resolved types."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _section_class(tp: Any) -> type | None:
    """The dataclass of a section field declared `Section` or `Section | None`; None for a plain value."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(tp) if option is not type(None)]
        if len(options) == 1 and len(typing.get_args(tp)) == 2 and dataclasses.is_dataclass(options[0]):
            return options[0]
    return None


def _is_list(tp: Any) -> bool:
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return any(typing.get_origin(option) is list for option in (typing.get_args(tp) if union else (tp,)))


def _dig(values: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def _leaf_keys(values: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        is_section = isinstance(value, dict) and value
        keys.extend(_leaf_keys(value, f"{prefix}{key}.") if is_section else [f"{prefix}{key}"])
    return keys


# ---------------------------------------------------------------------------------------------------
# The configuration reference in the docs (common/config_reference.py writes it into docs/*.md)


def config_reference_markdown(cls: type, sections: list[str] | None = None) -> str:
    """Markdown tables of every key of the run config `cls`: `section.key`, type, default, documentation.

    The same parser as `--help` supplies the text and the defaults (a section's default factory included,
    e.g. SFTConfig's `train.output_dir`), so the docs say what the command line says. Top-level keys come
    first, then one table per section (an optional one marked as such); `sections` limits the output to
    those top-level names (the top-level keys are named by themselves).
    """
    import docstring_parser

    fields = _fields(cls)
    unknown = sorted(set(sections or ()) - set(fields))
    if unknown:
        raise ConfigError(f"{cls.__name__} has no {', '.join(unknown)}; its keys: {', '.join(fields)}")
    chosen = [name for name in fields if sections is None or name in sections]
    field_docs = {p.arg_name: p.description for p in docstring_parser.parse_from_object(cls).params}
    parser = _parser(cls)
    defaults = parser.get_defaults()
    parts = []
    plain = [name for name in chosen if _section_class(fields[name]) is None]
    if plain:
        rows = [_reference_row(name, fields[name], defaults.get(name), _help(parser, name)) for name in plain]
        parts.append(f"**top-level keys**\n\n{_reference_table(rows)}")
    for name in chosen:
        section = _section_class(fields[name])
        if section is None:
            continue
        optional = section is not fields[name]
        if optional:  # parsed on its own (see _resolve_optional_sections): its own parser and defaults
            wrapper = dataclasses.make_dataclass(cls.__name__, [(name, section)])
            section_parser, section_defaults = _parser(wrapper), _parser(wrapper).get_defaults()
        else:
            section_parser, section_defaults = parser, defaults
        about = field_docs.get(name) or _class_doc(section)
        heading = f"**`{name}`** (`{section.__module__}.{section.__qualname__}`"
        heading += ", optional: none unless one of its keys is given)" if optional else ")"
        rows = []
        if hasattr(section, "preset_fields"):
            key = f"{name}.preset"
            rows.append(_reference_row(key, str | None, None, _help(section_parser, key)))
        for key, tp in _leaf_fields(section, f"{name}."):
            rows.append(_reference_row(key, tp, section_defaults.get(key), _help(section_parser, key)))
        parts.append(f"{heading}: {_one_line(about)}\n\n{_reference_table(rows)}")
    return "\n\n".join(parts) + "\n"


def _leaf_fields(cls: type, prefix: str) -> list[tuple[str, Any]]:
    """(dotted key, type) of every value of a section, nested sections flattened."""
    leaves = []
    for name, tp in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            leaves.extend(_leaf_fields(tp, f"{prefix}{name}."))
        else:
            leaves.append((f"{prefix}{name}", tp))
    return leaves


def _help(parser: ArgumentParser, key: str) -> str:
    action = parser._option_string_actions.get(f"--{key}")
    text = action.help if action is not None and action.help != argparse.SUPPRESS else ""
    return _one_line(text or "")


def _class_doc(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return "" if doc.startswith(f"{cls.__name__}(") else doc  # dataclass's stand-in for a missing docstring


def _one_line(text: str) -> str:
    """Whitespace collapsed, and `<`, `>` outside code spans escaped (Markdown would take `<s>` for HTML)."""
    pieces = re.split(r"(`+[^`]*`+)", " ".join(text.split()))
    return "".join(
        piece if piece.startswith("`") else piece.replace("<", "&lt;").replace(">", "&gt;")
        for piece in pieces
    )


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return re.sub(r"\b(?:typing|[\w.]+)\.(\w+)", r"\1", str(tp))  # `list[str]`, `Literal['a', 'b']`


def _default_text(value: Any) -> str:
    """The default as it would be written in YAML or on the command line (JSON: `null`, `true`, `"..."`)."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return str(value)


def _reference_row(key: str, tp: Any, default: Any, help_text: str) -> list[str]:
    return [f"`{key}`", f"`{_type_name(tp)}`", f"`{_default_text(default)}`", help_text]


def _reference_table(rows: list[list[str]]) -> str:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)
