"""Every command's --help reads well at 80 columns, rendered as a pipe or log file sees it (TERM=dumb)
and as a terminal does: every option there, a flag shown as a flag, no text eaten as rich markup or
cut to fit, every default shown, descriptions that open with one complete sentence and wrap only
where the width makes them. The commands are the ones registered on the app, so a command added
later is checked too."""

from __future__ import annotations

import inspect
import re
from importlib import metadata

import pytest
import typer.rich_utils
from typer.main import get_command
from typer.testing import CliRunner

from sideways_cli import cli
from sideways_cli.cli import app

COLUMNS = 80
ANSI = re.compile(r"\x1b\[[0-9;]*m")
BOX = str.maketrans("", "", "│╭╮╰╯─")  # the panels' frames, not text
GROUP = get_command(app)
COMMANDS = sorted(GROUP.commands)
RENDERINGS = ("dumb", "terminal")


def render(args: list[str], rendering: str, monkeypatch) -> str:
    """The output of ``sideways ARGS``, at 80 columns, without colour codes."""
    env = {"COLUMNS": str(COLUMNS), "LINES": "50"}
    if rendering == "terminal":  # what rich draws on a colour terminal (typer reads this once)
        monkeypatch.setattr(typer.rich_utils, "FORCE_TERMINAL", True)
        env["TERM"] = "xterm-256color"
    else:
        monkeypatch.setattr(typer.rich_utils, "FORCE_TERMINAL", None)
        env["TERM"] = "dumb"
    result = CliRunner().invoke(app, args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.output)


def words(text: str) -> list[str]:
    return text.translate(BOX).split()


def shows(output: str, text: str) -> bool:
    """``text``'s words appear in ``output`` in order and together: nothing of it lost to
    markup, cut to fit (a folded or ellipsised word differs) or pushed apart by other text."""
    want, got = words(text), words(output)
    return any(got[i:i + len(want)] == want for i in range(len(got) - len(want) + 1))


def visible_params(command):
    return [p for p in command.params if not getattr(p, "hidden", False)]


def expected_default(param) -> str | None:
    """The ``[default: ...]`` the help must show for ``param``, None where it has none to show:
    a text given as show_default, else a value other than None (a flag's False is none)."""
    if isinstance(param.show_default, str):
        return f"[default: ({param.show_default})]"
    if param.default is None or getattr(param, "is_flag", False) or param.show_default is False:
        return None
    value = param.default
    return f"[default: {', '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}]"


def first_paragraph(command) -> str:
    return inspect.cleandoc(command.help or "").split("\n\n")[0]


def assert_filled(lines: list[str], width: int, where: str) -> None:
    """Each line of a wrapped paragraph ends only where its next word would not fit in
    ``width``: a break anywhere else is the source's line break, cutting a sentence."""
    for line, following in zip(lines, lines[1:]):
        word = following.split()[0]
        assert len(line.rstrip()) + 1 + len(word) > width - 1, \
            f"{where}: the line {line.strip()!r} breaks before {word!r}, which fits"


@pytest.mark.parametrize("rendering", RENDERINGS)
@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_is_there_and_reads_whole(name, rendering, monkeypatch):
    command = GROUP.commands[name]
    out = render([name, "--help"], rendering, monkeypatch)
    assert "<bool>" not in out
    for param in visible_params(command):
        names = [*param.opts, *param.secondary_opts]
        if param.param_type_name == "argument":
            names = [param.metavar or param.name]
        for opt in names:
            assert opt in words(out), f"{name} --help does not show {opt}"
        help_text = (getattr(param, "help", None) or "").replace("\\[", "[")
        if help_text:
            assert shows(out, help_text), f"{name} --help loses part of {names[0]}'s text: {help_text!r}"
        default = expected_default(param)
        if default is not None:
            assert shows(out, default), f"{name} --help does not show {names[0]}'s {default}"
    assert shows(out, "--help Show this message and exit."), f"{name} --help: --help's row is not whole"


@pytest.mark.parametrize("rendering", RENDERINGS)
@pytest.mark.parametrize("name", COMMANDS)
def test_a_flag_reads_as_a_flag(name, rendering, monkeypatch):
    """A flag's row has its names, then its help: no type or metavar between them."""
    command = GROUP.commands[name]
    out = render([name, "--help"], rendering, monkeypatch)
    flags = [p for p in visible_params(command) if getattr(p, "is_flag", False)]
    for flag in flags:
        names = [*flag.opts, *flag.secondary_opts]
        row = next(line for line in out.splitlines() if re.match(rf"│ {re.escape(names[0])}\s", line))
        after = [w for w in words(row) if w not in names]
        first = (flag.help or "").split()[:1]
        assert after[:1] == first, f"{name} --help shows {names[0]} as taking a value: {row.strip()!r}"


@pytest.mark.parametrize("name", COMMANDS)
def test_a_description_opens_with_one_complete_sentence(name):
    first = first_paragraph(GROUP.commands[name])
    assert first[:1].isupper(), f"{name}: {first!r} does not start a sentence"
    assert first.endswith("."), f"{name}: {first!r} does not end with a period"
    assert not re.search(r"[.;:!?]\s", first), f"{name}: {first!r} is more than one short sentence"
    assert len(first) <= 100, f"{name}: {first!r} is long for the command list"


@pytest.mark.parametrize("rendering", RENDERINGS)
def test_the_command_list_shows_each_first_sentence_whole(rendering, monkeypatch):
    out = render(["--help"], rendering, monkeypatch)
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "Commands" in line)
    rows: dict[str, list[str]] = {}
    right = lines[start].rstrip().rfind("╮")
    for line in lines[start + 1:]:
        if line.startswith("╰"):
            break
        body = line[line.index("│") + 1:line.rindex("│")]
        head = body.split()[:1]
        if head and head[0] in COMMANDS and body.startswith(" " + head[0]):
            current = head[0]
            offset = body.index(head[0]) + len(head[0])
            offset += len(body[offset:]) - len(body[offset:].lstrip())
            rows[current] = [body[offset:]]
        else:
            rows[current].append(body[offset:])
    assert sorted(rows) == COMMANDS
    width = right - 1 - offset - 1  # the description column, less the panel's right padding
    for name, row in rows.items():
        assert shows("\n".join(row), first_paragraph(GROUP.commands[name])), f"{name}: {row}"
        assert_filled(row, width, f"sideways --help, {name}")


@pytest.mark.parametrize("rendering", RENDERINGS)
@pytest.mark.parametrize("name", COMMANDS)
def test_a_description_wraps_only_where_the_width_makes_it(name, rendering, monkeypatch):
    out = render([name, "--help"], rendering, monkeypatch)
    lines = out.splitlines()
    usage = next(i for i, line in enumerate(lines) if "Usage:" in line)
    panel = next(i for i, line in enumerate(lines) if line.startswith("╭"))
    paragraphs: list[list[str]] = [[]]
    for line in lines[usage + 1:panel]:
        if line.strip():
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    paragraphs = [p for p in paragraphs if p]
    expected = inspect.cleandoc(GROUP.commands[name].help).split("\n\n")
    assert len(paragraphs) == len(expected)
    for shown, source in zip(paragraphs, expected):
        assert shows("\n".join(shown), source), f"{name}: {source!r} is shown as {shown!r}"
        assert_filled(shown, COLUMNS - 2, f"sideways {name} --help")


@pytest.mark.parametrize("rendering", RENDERINGS)
def test_the_top_level_help(rendering, monkeypatch):
    out = render(["--help"], rendering, monkeypatch)
    assert "<bool>" not in out
    assert shows(out, "--version Print the installed version")
    assert shows(out, GROUP.help)


def test_version_prints_the_installed_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"sideways {metadata.version('sideways-cli')}\n"


def test_version_without_package_metadata_reads_pyproject(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(cli.metadata, "version", missing)
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert re.fullmatch(r"sideways \d+\.\d+\S* \(not installed\)\n", result.output), result.output
