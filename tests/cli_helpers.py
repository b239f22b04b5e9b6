"""What the command-line tests share: writing a config and invoking the CLI in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from sideways_cli.cli import app


def write_config(root: Path, cfg: dict[str, Any], name: str = "tiny.yaml") -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def invoke(*args):
    """Run ``sideways ARGS``; fail with its output unless it exits 0."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result
