"""The docs a clone carries: docs/config.md is the config's declarations as they are, and every
link in the README and docs/ leads to a file of the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from sideways_cli.config import fields_of
from sideways_cli.reports.config_reference import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "data" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_config_reference_is_up_to_date():
    assert (ROOT / "docs" / "config.md").read_text() == reference_markdown(), \
        "docs/config.md is out of date with sideways_cli/config.py: run make config-docs"


def test_every_key_has_its_row():
    text = reference_markdown()
    for key, _, _ in fields_of():
        assert f"| `{key}` |" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_leads_into_the_repository(page):
    links = LINK.findall(page.read_text())
    for link in links:
        if link.startswith(("http://", "https://", "#", "mailto:")):
            continue
        target = (page.parent / link.split("#")[0]).resolve()
        assert target.is_relative_to(ROOT), f"{page.name} links outside the repository: {link}"
        assert target.exists(), f"{page.name} links to a missing file: {link}"


def test_nothing_in_the_repository_points_outside_it():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout
    if not tracked:
        pytest.skip("not a git checkout")
    offenders = []
    for name in tracked.split():
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".yaml", ".toml") or name == "tests/test_docs.py":
            continue
        text = path.read_text(errors="replace")
        if "SIDEWAYS.md" in text or "../shared" in text:
            offenders.append(name)
    assert not offenders, f"name a file outside the repository: {offenders}"
