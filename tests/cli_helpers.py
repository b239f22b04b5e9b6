"""What the command-line tests share: invoking the CLI in-process, through typer's runner or
through the real entry point (``main``, which turns a UserError into one line and exit 2)."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from sideways_cli.cli import app, main


def invoke(*args):
    """Run ``sideways ARGS``; fail with its output unless it exits 0."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def run_main(args, monkeypatch, capsys) -> tuple[int, str]:
    """The exit status and standard error of ``sideways ARGS`` through ``main``; an exception it
    does not turn into an exit (a traceback for the user) fails the test."""
    monkeypatch.setattr(sys, "argv", ["sideways", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err
