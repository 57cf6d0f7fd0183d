"""Options of every editor and probe, generated from their config dataclasses (CLI and README; issue #12)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from seqedit.cli import main
from seqedit.config import flatten, load_config
from seqedit.editors.base import list_editors, make_editor
from seqedit.options import (
    dataclass_options,
    editor_docs,
    options_markdown,
    probe_docs,
    readme_section,
    replace_readme_section,
)
from seqedit.probe_api import list_probes, make_probe

README = Path(__file__).resolve().parents[1] / "README.md"


@dataclass(frozen=True)
class _Inner:
    depth: int = 3  # how deep


@dataclass(frozen=True)
class _Base:
    # above the field,
    # over two lines
    alpha: float = 0.5  # and at its end
    names: tuple[str, ...] = ("a", "b")

    beta: int | None = None


@dataclass(frozen=True)
class _Child(_Base):
    names: tuple[str, ...] = ("c",)  # redefined here: this comment wins
    inner: _Inner = field(default_factory=lambda: _Inner(depth=7))
    gamma: str = "every:5"  # noqa: E501


def test_rows_carry_type_default_and_the_source_comment():
    rows = [(o.key, o.type, o.default, o.comment) for o in dataclass_options(_Child())]
    assert rows == [
        ("alpha", "float", "0.5", "above the field, over two lines and at its end"),
        ("names", "tuple[str, ...]", "[c]", "redefined here: this comment wins"),
        ("beta", "int | None", "null", ""),  # a blank line separates it from any comment above
        ("inner.depth", "int", "7", "how deep"),  # nested sections: dotted keys, the instance's own default
        ("gamma", "str", "every:5", ""),  # tool directives are not documentation
    ]


@pytest.mark.parametrize("name", list_editors())
def test_every_editor_option_is_listed_with_its_built_default_and_accepted_as_shown(name, tmp_path):
    (doc,) = editor_docs([name])
    built = flatten(dataclasses.asdict(make_editor(name).config))  # what the fully built config holds
    assert [o.key for o in doc.options] == list(built)
    assert all(o.comment for o in doc.options), [o.key for o in doc.options if not o.comment]
    # Every key as listed, with its default as listed, is an override the config accepts and that changes nothing.
    overrides = [f"editor.{o.key}={o.default}" for o in doc.options]
    cfg = load_config(None, [f"editor.name={name}", *overrides])
    assert cfg.editor.options == load_config(None, [f"editor.name={name}"]).editor.options


@pytest.mark.parametrize("name", list_probes())
def test_every_probe_option_is_listed_and_accepted_as_shown(name):
    (doc,) = probe_docs([name])
    built = flatten(dataclasses.asdict(make_probe(name).config))
    assert [o.key for o in doc.options] == list(built)
    assert all(o.comment for o in doc.options), [o.key for o in doc.options if not o.comment]
    options = {o.key: yaml.safe_load(o.default) for o in doc.options}
    assert make_probe(name, options).config == make_probe(name).config


def test_cli_lists_options(capsys):
    assert main(["list-editors", "--options"]) == 0
    out = capsys.readouterr().out
    memit = out[out.index("\nmemit: "):]
    assert "  editor.value.clamp_norm_factor: float = 0.75\n" in memit  # MEMIT's own nested default
    assert "  editor.stats.n_samples: int = 100000\n" in memit
    assert "  editor.mom2_update_weight: float = 20000.0\n" in memit
    assert main(["list-editors", "--options", "rome"]) == 0
    rome = capsys.readouterr().out
    assert rome.startswith("rome: ROME") and "editor.value.clamp_norm_factor: float = 4.0" in rome
    assert "\nmemit: " not in rome
    assert main(["list-probes", "--options"]) == 0
    out = capsys.readouterr().out
    assert "perplexity: " in out and "  path: str | None = null\n      text file, one document per line" in out
    assert "  local_data_dir: str | None = null" in out and "schedule" in out
    assert main(["list-probes"]) == 0
    assert capsys.readouterr().out.split() == list_probes()


def test_readme_options_section_is_the_generated_text():
    """The README cannot drift: regenerate with SEQEDIT_UPDATE_README=1 .venv/bin/pytest -q tests/test_options.py"""
    text = README.read_text(encoding="utf-8")
    expected = options_markdown()
    if os.environ.get("SEQEDIT_UPDATE_README") == "1":
        text = replace_readme_section(text, expected)
        README.write_text(text, encoding="utf-8")
    assert readme_section(text) == expected, "README Options section is stale: rerun with SEQEDIT_UPDATE_README=1"
    assert "| `value.clamp_norm_factor` | `float` | `0.75` |" in expected  # nested keys, dotted
    assert "#### `rome`, `r-rome`, `p-rome`" in expected or "#### `p-rome`, `r-rome`, `rome`" in expected
