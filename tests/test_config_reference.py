"""docs/config.md is the config's declarations as they are: regenerated, it is the same file."""

from __future__ import annotations

from pathlib import Path

from sideways_cli.config import fields_of
from sideways_cli.config_reference import reference_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_the_config_reference_is_up_to_date():
    assert DOCS.read_text() == reference_markdown(), \
        "docs/config.md is out of date with sideways_cli/config.py: run make config-docs"


def test_every_key_has_its_row():
    text = reference_markdown()
    for key, _, _ in fields_of():
        assert f"| `{key}` |" in text
