"""The config layer (common/config.py): YAML < command line, exact types, unknown keys, presets, help, round trip."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pytest

from common.config import ConfigError, config_to_dict, given_keys, load_config, parse_config, save_config
from models.llama import ModelConfig, llama_intermediate_size
from training.config import LoggingConfig, OptimConfig, TrainConfig


@dataclasses.dataclass
class Inner:
    """A section inside a section."""

    depth: int = 1
    """How deep."""


@dataclasses.dataclass
class Kinds:
    """One field of every type the run configs use."""

    steps: int = 10
    """Optimizer steps."""
    rate: float = 0.5
    """A rate."""
    flag: bool = False
    """A switch."""
    maybe: bool | None = None
    """A switch that may be left to the program."""
    limit: float | None = None
    """An optional float."""
    name: str | None = None
    """An optional string."""
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    """A weight per name."""
    extra: dict[str, Any] | None = None
    """Free-form options."""
    ids: list[int] = dataclasses.field(default_factory=list)
    """Step numbers."""
    paths: list[str] = dataclasses.field(default_factory=list)
    """Globs."""
    inner: Inner = dataclasses.field(default_factory=Inner)
    """The nested section."""


@dataclasses.dataclass
class Checked:
    """A section that validates itself."""

    low: int = 0
    """Lower bound."""
    high: int = 1
    """Upper bound."""

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")


@dataclasses.dataclass
class Run:
    model: ModelConfig
    kinds: Kinds = dataclasses.field(default_factory=Kinds)
    checked: Checked = dataclasses.field(default_factory=Checked)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


@dataclasses.dataclass
class KindsOnly:
    kinds: Kinds = dataclasses.field(default_factory=Kinds)


def parse(tmp_path, yaml_text: str | None, *argv: str, cls: type = Run, **kwargs: Any):
    if yaml_text is None:
        return parse_config(cls, list(argv), **kwargs)
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    return parse_config(cls, ["--config", str(path), *argv], **kwargs)


def error(tmp_path, yaml_text: str | None, *argv: str, cls: type = Run, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as err:
        parse(tmp_path, yaml_text, *argv, cls=cls, **kwargs)
    assert "\n" not in str(err.value)  # one line, no usage dump
    return str(err.value)


# ---------------------------------------------------------------------------------------------------
# Layers and types


def test_yaml_then_command_line_with_declared_types(tmp_path):
    config = parse(
        tmp_path,
        "model: {preset: tiny, n_layers: 3}\noptim: {lr: 3e-4}\ntrain: {max_steps: 10}\nkinds: {ids: [1]}\n",
        "--model.dim",
        "128",
        "--train.max_steps=20",
        "--kinds.ids",
        "[2, 3]",
    )
    assert config.optim.lr == 3e-4 and isinstance(config.optim.lr, float)  # PyYAML reads 3e-4 as a string
    assert config.model == ModelConfig.from_preset("tiny", n_layers=3, dim=128)
    assert config.train.max_steps == 20 and config.kinds.ids == [2, 3]
    assert config.optim.warmup_steps == OptimConfig().warmup_steps


@pytest.mark.parametrize("value", ["7.9e0", "1.5", "ten", "true", "[1]"])
def test_an_int_key_takes_only_an_exact_integer(tmp_path, value):
    message = error(tmp_path, None, "--train.max_steps", value)
    assert (
        message == f"command line (--train.max_steps): 'train.max_steps' must be PositiveInt, got '{value}'"
    )
    message = error(tmp_path, f"train: {{max_steps: {value}}}\n")
    assert message.startswith(f"{tmp_path / 'run.yaml'}: 'train.max_steps' must be PositiveInt, got ")
    message = error(tmp_path, None, "--kinds.steps", value)
    assert message == f"command line (--kinds.steps): 'kinds.steps' must be int, got '{value}'"


def test_an_int_key_takes_integers_written_as_integers(tmp_path):
    assert parse(tmp_path, None, "--train.max_steps", "1000").train.max_steps == 1000
    assert parse(tmp_path, "train: {max_steps: 1000}\n").train.max_steps == 1000


def test_every_field_type_from_yaml_and_from_the_command_line(tmp_path):
    expected = Kinds(
        steps=5,
        rate=3e-4,
        flag=True,
        maybe=False,
        limit=2.5,
        name="x",
        weights={"pile": 1.0, "wudao": 2.0},
        extra={"rope_type": "linear", "factor": 2},
        ids=[2, 3],
        paths=["a/*.zst", "b/*.zst"],
        inner=Inner(depth=4),
    )
    from_yaml = parse(
        tmp_path,
        "kinds:\n  steps: 5\n  rate: 3e-4\n  flag: true\n  maybe: false\n  limit: 2.5\n  name: x\n"
        "  weights: {pile: 1, wudao: 2}\n  extra: {rope_type: linear, factor: 2}\n  ids: [2, 3]\n"
        "  paths: [a/*.zst, b/*.zst]\n  inner: {depth: 4}\n",
        cls=KindsOnly,
    )
    assert from_yaml.kinds == expected
    assert isinstance(from_yaml.kinds.weights["pile"], float)
    argv = [
        *("--kinds.steps", "5", "--kinds.rate", "3e-4", "--kinds.flag", "true", "--kinds.maybe", "false"),
        *("--kinds.limit", "2.5", "--kinds.name", "x", "--kinds.weights", "{pile: 1, wudao: 2}"),
        *("--kinds.extra", "{rope_type: linear, factor: 2}", "--kinds.ids", "[2, 3]"),
        *("--kinds.paths", "[a/*.zst, b/*.zst]", "--kinds.inner.depth", "4"),
    ]
    assert parse(tmp_path, None, *argv, cls=KindsOnly).kinds == expected
    # null clears an optional value the file set
    nulls = [
        "--kinds.maybe",
        "null",
        "--kinds.limit",
        "null",
        "--kinds.name",
        "null",
        "--kinds.extra",
        "null",
    ]
    cleared = parse(
        tmp_path, "kinds: {maybe: true, limit: 1, name: y, extra: {a: 1}}\n", *nulls, cls=KindsOnly
    )
    assert cleared.kinds == Kinds()
    assert "'kinds.flag' must be bool" in error(tmp_path, None, "--kinds.flag=maybe", cls=KindsOnly)
    assert "unexpected argument 'maybe'" in error(tmp_path, None, "--kinds.flag", "maybe", cls=KindsOnly)
    assert "'kinds.weights' must be dict[str, float]" in error(
        tmp_path, "kinds: {weights: {a: x}}\n", cls=KindsOnly
    )


def test_one_value_for_a_list_key_is_a_one_item_list(tmp_path):
    from pretrain_llama import PretrainConfig

    config = parse_config(PretrainConfig, ["--model.preset", "tiny", "--data.shards", "shards/*.jsonl.zst"])
    assert config.data.shards == ["shards/*.jsonl.zst"]
    config = parse_config(PretrainConfig, ["--model.preset", "tiny", "--data.shards", "[a/*.zst, b/*.zst]"])
    assert config.data.shards == ["a/*.zst", "b/*.zst"]
    assert parse(tmp_path, "kinds: {paths: dir/*.zst, ids: 7}\n").kinds == Kinds(paths=["dir/*.zst"], ids=[7])
    assert parse(tmp_path, None, "--kinds.paths", "*.zst", "--kinds.ids", "7").kinds == Kinds(
        paths=["*.zst"], ids=[7]
    )
    assert "'kinds.ids' must be list[int]" in error(tmp_path, None, "--kinds.ids", "1.5")


def test_an_alias_sets_its_dotted_key(tmp_path):
    config = parse(tmp_path, "train: {resume: ''}\n", "--resume", "auto", aliases={"resume": "train.resume"})
    assert config.train.resume == "auto"


@dataclasses.dataclass
class Tool:
    """A command-line tool: inputs without --, dash-spelled flags."""

    inputs: list[str] = dataclasses.field(default_factory=list)
    """Input files."""
    output_dir: str = "out"
    """Where the output goes."""
    strict: bool = False
    """Stop at the first bad record."""
    keep_order: bool = True
    """Write in input order."""
    workers: int = 1
    """Worker processes."""


@dataclasses.dataclass
class OneFolder:
    """A tool that writes one folder."""

    out_dir: str = ""
    """The folder to write."""
    cache_dir: str | None = None
    """Where downloads are kept."""


def test_bare_arguments_fill_the_positional_list_and_a_bool_key_is_a_flag(tmp_path):
    aliases = {"output-dir": "output_dir"}
    argv = ["a.jsonl", "--output-dir", "o", "b/*.jsonl", "--strict", "--workers", "2", "c.jsonl"]
    config = parse(tmp_path, None, *argv, cls=Tool, aliases=aliases, positional="inputs")
    assert config == Tool(inputs=["a.jsonl", "b/*.jsonl", "c.jsonl"], output_dir="o", strict=True, workers=2)
    assert parse(tmp_path, None, "x", "--strict=false", cls=Tool, positional="inputs").strict is False
    assert parse(tmp_path, "inputs: [f]\n", cls=Tool, positional="inputs").inputs == ["f"]
    assert "unexpected argument 'x'" in error(tmp_path, None, "x", cls=Tool)
    assert "--workers needs a value" in error(tmp_path, None, "--workers", cls=Tool)  # only bools are flags
    assert "'workers' must be int, got 'x'" in error(
        tmp_path, None, "--workers", "x", cls=Tool, positional="inputs"
    )


def test_the_positional_fields_own_flag_and_the_bare_arguments_make_one_list_in_order(tmp_path):
    argv = ["--inputs", "a", "b", "--workers", "2", "c", "--inputs=d", "--inputs", "e"]
    assert parse(tmp_path, None, *argv, cls=Tool, positional="inputs").inputs == ["a", "b", "c", "d", "e"]
    aliases = {"input": "inputs"}
    assert parse(
        tmp_path, None, "--input", "a", "b", cls=Tool, aliases=aliases, positional="inputs"
    ).inputs == [
        "a",
        "b",
    ]


@pytest.mark.parametrize(
    ("argv", "strict", "inputs"),
    [
        (["--strict"], True, []),
        (["--strict", "a"], True, ["a"]),
        (["--strict", "true", "a"], True, ["a"]),
        (["--strict", "false", "a"], False, ["a"]),
        (["--strict", "no"], False, []),
        (["--strict", "Yes"], True, []),
        (["--strict", "--workers", "2"], True, []),
        (["--strict=false", "a"], False, ["a"]),
        (["--check", "off"], False, []),  # an alias of a bool key, the same way
        (["--check", "a"], True, ["a"]),
        (["--check", "false", "a"], False, ["a"]),
    ],
)
def test_a_bool_key_alone_is_true_and_takes_a_bool_word_after_it(tmp_path, argv, strict, inputs):
    config = parse(tmp_path, None, *argv, cls=Tool, aliases={"check": "strict"}, positional="inputs")
    assert (config.strict, config.inputs) == (strict, inputs)


def test_a_bool_key_in_a_section_is_a_flag_too(tmp_path):
    assert parse(tmp_path, None, "--kinds.flag", cls=KindsOnly).kinds.flag is True
    assert parse(tmp_path, None, "--kinds.flag", "--kinds.steps", "3", cls=KindsOnly).kinds == Kinds(
        flag=True, steps=3
    )
    assert parse(tmp_path, None, "--kinds.maybe", cls=KindsOnly).kinds.maybe is True
    assert (
        parse(tmp_path, "kinds: {maybe: true}\n", "--kinds.maybe", "null", cls=KindsOnly).kinds.maybe is None
    )


@pytest.mark.parametrize("flag", ["--no-keep_order", "--no-keep-order", "--no_keep_order", "--no-in-order"])
def test_no_key_sets_a_bool_key_false(tmp_path, flag):
    config = parse(
        tmp_path, None, "a", flag, "b", cls=Tool, aliases={"in-order": "keep_order"}, positional="inputs"
    )
    assert config.keep_order is False and config.inputs == ["a", "b"]


def test_no_key_is_only_for_bool_keys(tmp_path):
    assert parse(tmp_path, None, "--no-kinds.flag", cls=KindsOnly).kinds.flag is False
    assert "unknown option --no-workers" in error(tmp_path, None, "--no-workers", "2", cls=Tool)
    assert "unknown option --no-strict (did you mean 'strict'?)" in error(
        tmp_path, None, "--no-strict=true", cls=Tool
    )


def test_a_positional_field_that_is_not_a_list_takes_one_argument(tmp_path):
    aliases = {"cache-dir": "cache_dir"}
    config = parse(
        tmp_path, None, "demo", "--cache-dir", "c", cls=OneFolder, aliases=aliases, positional="out_dir"
    )
    assert config == OneFolder(out_dir="demo", cache_dir="c")
    assert parse(tmp_path, None, "--out_dir", "demo", cls=OneFolder, positional="out_dir").out_dir == "demo"
    message = error(
        tmp_path, None, "a", "--cache-dir", "c", "b", cls=OneFolder, aliases=aliases, positional="out_dir"
    )
    assert message == "'out_dir' takes one value (one argument without --), got ['a', 'b']"
    assert error(tmp_path, None, "--out_dir", "a", "b", cls=OneFolder, positional="out_dir") == message


def test_help_describes_the_layers_and_flags_that_the_class_has(capsys):
    from pretrain_llama import PretrainConfig

    def help_text(cls: type, **kwargs: Any) -> str:
        with pytest.raises(SystemExit):
            parse_config(cls, ["--help"], **kwargs)
        return " ".join(capsys.readouterr().out.split())

    text = help_text(Tool, positional="inputs")
    assert "Values: the dataclass defaults < the --config file < --key VALUE (or --key=VALUE)." in text
    assert "preset" not in text and "section" not in text and "[INPUTS ...]" in text
    assert "A yes/no key alone is true (--strict), --no-KEY is false (--no-strict)." in text
    text = help_text(OneFolder, positional="out_dir")
    assert "[--key VALUE ...] OUT_DIR" in text and "yes/no" not in text
    text = help_text(PretrainConfig)
    assert "the dataclass defaults < a section's preset < the --config file < --section.key VALUE" in text
    text = help_text(KindsOnly)
    assert "the dataclass defaults < the --config file < --section.key VALUE" in text


# ---------------------------------------------------------------------------------------------------
# Choices and ranges, declared on the fields and checked by jsonargparse


@pytest.mark.parametrize(
    ("key", "value", "type_name"),
    [
        ("optim.lr", "-1", "PositiveFloat"),
        ("train.grad_accum_steps", "0", "PositiveInt"),
        ("train.max_steps", "-5", "PositiveInt"),
        ("optim.warmup_steps", "-3", "NonNegativeInt"),
        ("optim.weight_decay", "-1", "NonNegativeFloat"),
        ("optim.beta2", "1", "float_ge0_and_lt1"),
        ("data.batch_size", "0", "PositiveInt"),
        ("data.validation_fraction", "1.0", "float_ge0_and_lt1"),
        ("model.n_layers", "0", "PositiveInt"),
        ("train.precision", "fp8", "Literal['fp32', 'bf16', 'fp16', 'auto']"),
        ("train.fused_cross_entropy", "fast", "Literal['auto', 'none', 'chunked', 'liger']"),
        ("train.attention_backend", "flash", "Literal['sdpa', 'eager', 'flex', 'xformers', 'flash_attn']"),
    ],
)
def test_a_value_out_of_range_or_not_a_choice_names_the_key(tmp_path, key, value, type_name):
    from pretrain_llama import PretrainConfig

    message = error(tmp_path, None, "--model.preset", "tiny", f"--{key}", value, cls=PretrainConfig)
    assert message == f"command line (--{key}): '{key}' must be {type_name}, got '{value}'"
    section, name = key.split(".")
    message = error(tmp_path, f"{section}: {{{name}: {value}}}\n", cls=PretrainConfig)
    assert message.startswith(f"{tmp_path / 'run.yaml'}: '{key}' must be {type_name}, got ")


def test_range_types_are_plain_numbers_in_the_config(tmp_path):
    config = parse(tmp_path, "train: {max_steps: 7}\n", "--optim.lr", "0.5")
    assert type(config.train.max_steps) is int and type(config.optim.lr) is float  # YAML can write them
    save_config(config, tmp_path / "saved.yaml")


# ---------------------------------------------------------------------------------------------------
# Unknown keys


@pytest.mark.parametrize(
    ("yaml_text", "argv", "expected", "section_keys"),
    [
        (
            "train: {max_stepz: 3}\n",
            [],
            "run.yaml: unknown key 'train.max_stepz' (did you mean 'max_steps'?)",
            "train",
        ),
        (None, ["--optim.lrr", "1"], "unknown option --optim.lrr (did you mean 'lr'?)", "optim"),
        ("trian: {}\n", [], "run.yaml: unknown key 'trian' (did you mean 'train'?)", "config"),
        (
            None,
            ["--trian.max_steps", "1"],
            "unknown option --trian.max_steps (did you mean 'train'?)",
            "config",
        ),
        (
            "kinds: {inner: {deep: 2}}\n",
            [],
            "unknown key 'kinds.inner.deep' (did you mean 'depth'?)",
            "kinds.inner",
        ),
        (
            None,
            ["--model.presett", "tiny"],
            "unknown option --model.presett (did you mean 'preset'?)",
            "model",
        ),
    ],
)
def test_an_unknown_key_names_the_valid_keys_and_a_suggestion(
    tmp_path, yaml_text, argv, expected, section_keys
):
    message = error(tmp_path, yaml_text, *argv)
    assert expected in message
    assert f"valid keys in '{section_keys}': " in message


def test_a_section_is_not_a_value(tmp_path):
    assert "--train is a section" in error(tmp_path, None, "--train", "x")
    assert "'train' must be a mapping" in error(tmp_path, "train: 3\n")


def test_extra_sections_of_the_file_can_be_ignored_but_not_extra_options(tmp_path):
    run = "model: {preset: tiny}\ntrain: {max_steps: 3}\nkinds: {steps: 4}\n"
    assert parse(tmp_path, run, cls=KindsOnly, allow_extra_sections=True).kinds.steps == 4
    assert "unknown key 'model'" in error(tmp_path, run, cls=KindsOnly)
    assert "unknown key 'kinds.stepz'" in error(
        tmp_path, "kinds: {stepz: 1}\n", cls=KindsOnly, allow_extra_sections=True
    )
    assert "unknown option --train.max_steps" in error(
        tmp_path, run, "--train.max_steps", "4", cls=KindsOnly, allow_extra_sections=True
    )


# ---------------------------------------------------------------------------------------------------
# Presets


def test_a_preset_is_overridden_by_the_file_and_the_command_line_and_derived_fields_follow(tmp_path):
    config = parse(tmp_path, "model: {preset: tiny, dim: 512}\n", "--model.n_layers", "2")
    assert config.model == ModelConfig(**{**ModelConfig.preset_fields("tiny"), "dim": 512, "n_layers": 2})
    # intermediate_size and head_dim follow the final dim, not the preset's own
    assert config.model.intermediate_size == llama_intermediate_size(512) != llama_intermediate_size(256)
    assert config.model.head_dim == 512 // 4
    # the command line's preset replaces the file's; the file's keys still override it
    config = parse(tmp_path, "model: {preset: tiny, n_layers: 3}\n", "--model.preset", "125m")
    assert config.model == ModelConfig.from_preset("125m", n_layers=3)


def test_an_unknown_preset_names_the_section(tmp_path):
    assert "run.yaml: invalid 'model' section: unknown model preset 'tinyy'" in error(
        tmp_path, "model: {preset: tinyy}\n"
    )
    message = error(tmp_path, None, "--model.preset", "tinyy")
    assert message.startswith("command line (--model.preset): invalid 'model' section: unknown model preset")


# ---------------------------------------------------------------------------------------------------
# A section's own checks


def test_a_sections_own_check_names_the_section_and_the_source(tmp_path):
    expected = "invalid 'checked' section: low 5 is above high 1"
    assert error(tmp_path, "checked: {low: 5}\n") == f"{tmp_path / 'run.yaml'}: {expected}"
    assert error(tmp_path, None, "--checked.low", "5") == f"command line: {expected}"
    assert error(tmp_path, "checked: {high: 4}\n", "--checked.low", "5") == (
        f"{tmp_path / 'run.yaml'} and the command line: invalid 'checked' section: low 5 is above high 4"
    )
    assert "invalid 'model' section: dim 100 is not divisible by n_heads 3" in error(
        tmp_path, None, "--model.dim", "100", "--model.n_heads", "3"
    )


def test_file_problems_are_config_errors(tmp_path):
    assert "cannot read config" in error(tmp_path, None, "--config", str(tmp_path / "missing.yaml"))
    assert "invalid YAML" in error(tmp_path, "train: [\n")
    assert "the top level must be a mapping" in error(tmp_path, "- 1\n")
    assert "--train.max_steps needs a value" in error(tmp_path, None, "--train.max_steps")
    assert "unexpected argument 'x'" in error(tmp_path, None, "x")


# ---------------------------------------------------------------------------------------------------
# Help and round trip


def test_help_lists_every_key_with_its_type_default_and_documentation(capsys):
    from pretrain_llama import PretrainConfig

    with pytest.raises(SystemExit) as done:
        parse_config(PretrainConfig, ["--help"], aliases={"resume": "train.resume"}, prog="pretrain_llama.py")
    assert done.value.code == 0
    text = capsys.readouterr().out
    flat = "".join(text.split())  # help wraps lines (at hyphens too)
    assert text.startswith("usage: pretrain_llama.py") and "--resumeisshortfor--train.resume" in flat
    for name, section in typing.get_type_hints(PretrainConfig).items():
        if not dataclasses.is_dataclass(section):
            assert f"--{name} " in text
            continue
        for field in dataclasses.fields(section):
            assert f"--{name}.{field.name} " in text or f"--{name}.{field.name}\n" in text
    assert "--model CONFIG" not in text  # jsonargparse's section-from-a-file option: not a key of ours
    for key, doc, type_and_default in [
        ("--train.max_steps", "Optimizer steps to train for.", "(type: PositiveInt, default: 1000)"),
        (
            "--optim.lr",
            "Peak learning rate, reached at the end of warmup.",
            "(type: PositiveFloat, default: 0.0003)",
        ),
        (
            "--train.precision",
            "fp32, bf16 or fp16",
            "(type: Literal['fp32', 'bf16', 'fp16', 'auto'], default: bf16)",
        ),
        ("--model.rope_scaling", "Optional rotary scaling:", "default: null)"),
        (
            "--data.mixture",
            "Token share per source, e.g. {pile: 1, wudao: 1};",
            "(type: dict[str, float], default: {})",
        ),
        ("--model.preset", "The fields a named preset (tiny, 125m, 350m, 1b, 7b) sets;", "default: null)"),
    ]:
        after = flat[flat.index(key) :]
        assert after.index("".join(doc.split())) < after.index("".join(type_and_default.split())) < 600, key


def test_the_saved_config_loads_back_equal(tmp_path):
    config = parse(
        tmp_path,
        "model: {preset: 1b, vocab_size: 512, rope_scaling: {rope_type: linear, factor: 2.0}}\n"
        "kinds: {maybe: null, weights: {a: 0.5}, ids: [1, 2], inner: {depth: 3}}\noptim: {lr: 1e-5}\n",
    )
    assert config.optim.fused is None and config.train.peak_flops is None and config.kinds.name is None
    save_config(config, tmp_path / "config.yaml")
    assert load_config(Run, tmp_path / "config.yaml") == config
    assert load_config(Run, config_to_dict(config)) == config
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


@dataclasses.dataclass
class FineTune:
    """A run that starts from a model, whose model section is filled in from it."""

    init: str = ""
    """Where the model comes from."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The model's shape; the keys given must describe --init."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)


def test_given_keys_name_what_the_file_the_command_line_and_a_preset_set(tmp_path):
    config = parse(tmp_path, "init: some/model\noptim: {lr: 1e-5}\n", cls=FineTune)
    assert given_keys(config) == {"init", "optim.lr"} and config.model == ModelConfig()
    config = parse(tmp_path, "model: {preset: tiny, dim: 128}\n", "--model.n_layers", "2", cls=FineTune)
    assert (config.model.dim, config.model.n_layers, config.model.n_heads) == (128, 2, 4)
    assert config.model.intermediate_size == llama_intermediate_size(128)  # derived from the final values
    preset = {f"model.{key}" for key in ModelConfig.preset_fields("tiny")}
    assert given_keys(config) == {"model.preset", "model.dim", "model.n_layers", *preset}
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(FineTune, tmp_path / "saved.yaml") == config
    assert given_keys(load_config(FineTune, tmp_path / "saved.yaml")) == set()  # only a parse records them
    assert given_keys(FineTune()) == set()
