"""The docs a clone carries: docs/config.md is the config's declarations as they are, every link in
the README and docs/ leads to a file (and heading) of the repository, the README stays a front door,
and mkdocs.yml's nav lists exactly the pages of docs/."""

from __future__ import annotations

import re
import subprocess
import unicodedata
from pathlib import Path

import pytest
import yaml

from sideways_cli.config import fields_of
from sideways_cli.reports.config_reference import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_PAGES = sorted(DOCS.glob("*.md"))
# the pages written here; data/README.md names the datasets' official download addresses
OWN_PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *DOC_PAGES]
PAGES = [*OWN_PAGES, ROOT / "data" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")
README_LINES = 200  # the README is a front door; the details live in docs/


def _ids(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _slug(heading: str) -> str:
    """A heading's anchor as mkdocs makes it (Python-Markdown's toc), which for plain words and
    code spans is also the one GitHub makes."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _prose(page: Path) -> list[str]:
    """The page's lines outside code blocks."""
    lines, fenced = [], False
    for line in page.read_text().splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _anchors(page: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in _prose(page) if re.match(r"#{1,6} ", line)}


def _links(page: Path) -> list[str]:
    return [link for line in _prose(page) for link in LINK.findall(line)]


def test_the_config_reference_is_up_to_date():
    assert (ROOT / "docs" / "config.md").read_text() == reference_markdown(), \
        "docs/config.md is out of date with sideways_cli/config.py: run make config-docs"


def test_every_key_has_its_row():
    text = reference_markdown()
    for key, _, _ in fields_of():
        assert f"| `{key}` |" in text


@pytest.mark.parametrize("page", PAGES, ids=_ids)
def test_every_link_leads_into_the_repository(page):
    for link in _links(page):
        if link.startswith(("http://", "https://", "#", "mailto:")):
            continue
        target = (page.parent / link.split("#")[0]).resolve()
        assert target.is_relative_to(ROOT), f"{page.name} links outside the repository: {link}"
        assert target.exists(), f"{page.name} links to a missing file: {link}"


@pytest.mark.parametrize("page", OWN_PAGES, ids=_ids)
def test_every_link_to_a_heading_finds_it(page):
    for link in _links(page):
        path, _, anchor = link.partition("#")
        if not anchor or link.startswith(("http://", "https://")):
            continue
        target = (page.parent / path).resolve() if path else page
        if target.suffix == ".md":
            assert anchor in _anchors(target), f"{page.name}: no heading {anchor!r} in {target.name}"


@pytest.mark.parametrize("page", OWN_PAGES, ids=_ids)
def test_the_docs_point_nowhere_outside_the_repository(page):
    text = page.read_text()
    assert "://" not in text, f"{page.name} names an address outside the repository"
    assert not re.search(r"\bissue \d", text, re.IGNORECASE), f"{page.name} cites an issue by number"


@pytest.mark.parametrize("page", DOC_PAGES, ids=_ids)
def test_docs_pages_link_only_to_docs_pages(page):
    """The site mkdocs builds holds docs/ alone, so a link from a page to another file of the
    repository would be dead there: such files are named as paths instead."""
    for link in _links(page):
        if link.startswith("#"):
            continue
        target = (page.parent / link.split("#")[0]).resolve()
        assert target.is_relative_to(DOCS), f"{page.name} links out of docs/: {link}"


@pytest.mark.parametrize("page", DOC_PAGES, ids=_ids)
def test_every_docs_page_starts_with_its_title(page):
    assert page.read_text().startswith("# "), f"{page.name} does not start with a '# Title' line"


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < README_LINES, \
        f"README.md has {len(lines)} lines; keep it under {README_LINES} and move details into docs/"


def _nav_pages(entries) -> list[str]:
    """The page files of a mkdocs nav, however nested: 'page.md', {title: 'page.md'} or
    {section: [entries]}."""
    pages = []
    for entry in entries:
        values = entry.values() if isinstance(entry, dict) else [entry]
        for value in values:
            if isinstance(value, list):
                pages += _nav_pages(value)
            elif not value.startswith(("http://", "https://")):
                pages.append(value)
    return pages


def test_the_nav_lists_every_docs_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs"
    nav = _nav_pages(config["nav"])
    missing = [page for page in nav if not (DOCS / page).is_file()]
    assert not missing, f"mkdocs.yml's nav lists pages that do not exist: {missing}"
    left_out = sorted({page.name for page in DOC_PAGES} - set(nav))
    assert not left_out, f"docs/ pages missing from mkdocs.yml's nav: {left_out}"
    assert len(nav) == len(set(nav)), "mkdocs.yml's nav lists a page twice"


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
