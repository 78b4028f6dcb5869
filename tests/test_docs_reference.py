"""The configuration references in docs/*.md say what the config classes say.

Each guide's reference block (between `<!-- config-reference: module.Class -->` and
`<!-- /config-reference -->`) is regenerated from the class's fields and docstrings and compared with the
doc; a stale doc fails with the diff and the command that rewrites it (`make docs`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from common.config import ConfigError
from common.config_reference import (
    COMMAND,
    DOCS,
    blocks,
    config_fields,
    config_reference_markdown,
    diff,
    load_class,
    refresh,
    stale,
)

# Every stage's run config (and the data previews'): each must have a reference block in some guide.
# A new stage is one line here and one block in its guide.
STAGE_CONFIGS = [
    "pretrain_llama.PretrainConfig",
    "dataset.pretrain_dataset.InspectConfig",
    "instruction_tuning.SFTConfig",
    "dataset.chat_preview.PreviewConfig",
    "serve.app.ChatServerConfig",
    "preference_tuning.DPOConfig",
    "dataset.preference_preview.PreviewConfig",
    "evaluation.evaluator.EvaluateConfig",
]
DOCS_WITH_REFERENCES = sorted(path.name for path in DOCS.glob("*.md") if blocks(path.read_text("utf-8")))


@pytest.mark.parametrize("name", DOCS_WITH_REFERENCES)
def test_doc_reference_matches_the_code(name: str) -> None:
    path = DOCS / name
    found = stale([path])
    if found:
        old, new = found[path]
        pytest.fail(
            f"docs/{name}: the configuration reference is stale; run {COMMAND}\n{diff(path, old, new)}"
        )


def test_every_stage_config_is_documented() -> None:
    """Each stage config has a block, and each of its top-level keys is shown there, or (a section left out
    of a block, like the chat preview's `data:`) the same section class is shown in some block."""
    shown: dict[str, set[str]] = {}
    for path in DOCS.glob("*.md"):
        for dotted, keys in blocks(path.read_text("utf-8")):
            cls = load_class(dotted)  # an unknown class fails here, naming it
            shown.setdefault(dotted, set()).update(keys or config_fields(cls))
    shown_sections = {
        config_fields(load_class(dotted))[key] for dotted, keys in shown.items() for key in keys
    }
    missing = [dotted for dotted in STAGE_CONFIGS if dotted not in shown]
    assert not missing, f"no reference block for {missing}: add one to its guide, then run {COMMAND}"
    for dotted in STAGE_CONFIGS:
        fields = config_fields(load_class(dotted))
        left_out = [
            key
            for key in fields
            if key not in shown[dotted]
            and not (dataclasses.is_dataclass(fields[key]) and fields[key] in shown_sections)
        ]
        assert not left_out, f"{dotted}: {left_out} appear in no reference block"


# ---------------------------------------------------------------------------------------------------
# The generator itself, on a config made up for the test


@dataclasses.dataclass
class Shape:
    """A model shape."""

    width: int = 8
    """Width | of the thing."""
    kind: str = "a"
    """Start with <s> unless `<s>` is in code."""

    @classmethod
    def preset_fields(cls, name: str) -> dict:
        """The fields of a named preset."""
        return {"width": 16}


@dataclasses.dataclass
class Loop:
    out: str = "runs/x"
    """Output folder."""
    steps: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    """Steps."""
    scale: float | None = None
    """No docstring on the class: the field's docstring in the run config describes the section."""


@dataclasses.dataclass
class RunConfig:
    """A run."""

    loop: Loop = dataclasses.field(default_factory=lambda: Loop(out="runs/y"))
    """How the loop runs."""
    name: str = ""
    """The run's name."""
    shape: Shape = dataclasses.field(default_factory=Shape)
    """A new model's shape."""


def test_reference_lists_keys_with_type_default_and_docstring() -> None:
    text = config_reference_markdown(RunConfig)
    lines = text.splitlines()
    assert lines[0] == "**top-level keys**"
    assert '| `name` | `str` | `""` | The run\'s name. |' in lines
    here = Loop.__module__  # tests.test_docs_reference, or test_docs_reference as pytest imports it
    assert f"**`loop`** (`{here}.Loop`): How the loop runs." in lines
    assert '| `loop.out` | `str` | `"runs/y"` | Output folder. |' in lines  # the run config's default factory
    assert "| `loop.steps` | `list[int]` | `[1, 2]` | Steps. |" in lines
    assert "| `loop.scale` | `float \\| None` | `null` |" in text
    assert f"**`shape`** (`{here}.Shape`): A new model's shape." in lines
    assert "| `shape.preset` | `str \\| None` | `null` | The fields of a named preset." in text
    assert "| `shape.width` | `int` | `8` | Width \\| of the thing. |" in lines
    assert "Start with &lt;s&gt; unless `<s>` is in code." in text  # Markdown would read <s> as HTML


def test_reference_of_some_sections_only() -> None:
    text = config_reference_markdown(RunConfig, ["shape"])
    assert "`shape.width`" in text and "`loop.out`" not in text and "`name`" not in text
    with pytest.raises(ConfigError, match="no nope"):
        config_reference_markdown(RunConfig, ["nope"])


def test_refresh_rewrites_only_between_the_markers() -> None:
    doc = (
        "# Guide\n\nHand-written text.\n\n"
        "<!-- config-reference: tests.test_docs_reference.RunConfig name -->\nstale\n<!-- /config-reference -->\n"
        "\nMore text.\n"
    )
    new = refresh(doc)
    assert new.startswith("# Guide\n\nHand-written text.\n\n<!-- config-reference:")
    assert new.endswith("\n\n<!-- /config-reference -->\n\nMore text.\n")
    assert "stale" not in new and "| `name` | `str` |" in new and "`loop.out`" not in new
    assert refresh(new) == new
    assert blocks(new) == [("tests.test_docs_reference.RunConfig", ["name"])]


def test_check_mode_reports_a_stale_doc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from common.config_reference import main

    doc = tmp_path / "guide.md"
    doc.write_text(
        "<!-- config-reference: tests.test_docs_reference.RunConfig -->\n<!-- /config-reference -->\n"
    )
    assert main(["--check", str(doc)]) == 1
    captured = capsys.readouterr()
    assert "+| `loop.out` |" in captured.out and "make docs" in captured.err
    assert main([str(doc)]) == 0
    assert main(["--check", str(doc)]) == 0
