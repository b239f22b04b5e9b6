"""The ``sideways`` help as typer 0.29's rich rendering should show it: each docstring paragraph
reflowed to the terminal's width, flags shown as flags."""

from __future__ import annotations

import inspect

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption


class _ReadableHelp:
    """What a command's --help needs to read well in typer 0.29's rich rendering: its docstring's
    paragraphs reflowed (``_reflow``), its flags shown as flags (``_flags_take_no_value``)."""

    def __init__(self, *args, help: str | None = None, **kwargs) -> None:
        super().__init__(*args, help=_reflow(help), **kwargs)

    def get_params(self, ctx):
        return _flags_take_no_value(super().get_params(ctx))


class HelpCommand(_ReadableHelp, TyperCommand):
    """A command of the app."""


class HelpGroup(_ReadableHelp, TyperGroup):
    """The top-level command."""


class HelpfulTyper(typer.Typer):
    """typer.Typer whose commands are ``HelpCommand``s unless a command names its own class."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or HelpCommand, **kwargs)


def _reflow(text: str | None) -> str | None:
    """Each paragraph of a docstring as one line: the rich help keeps a docstring's line breaks
    (in the command list, the first paragraph's too), cutting sentences where the source wrapped
    them. A paragraph that starts with \\b keeps its lines, as in click."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs)


def _flags_take_no_value(params: list) -> list:
    """typer 0.29's rich help gives a flag the type column of an option that takes a value
    (``--quiet <bool>``); an empty metavar leaves it blank, as the plain help does."""
    for param in params:
        if isinstance(param, TyperOption) and (param.is_flag or param.count) and param.metavar is None:
            param.metavar = ""
    return params
