"""docs/config.md, the reference of every config key, made from the declarations in ``config.py``
(each key's default, the values it accepts and what it means), so the two cannot drift:
``python -m sideways_cli.reports.config_reference docs/config.md`` (``make config-docs``) writes it, and a
test fails when the file is out of date."""

from __future__ import annotations

import sys
from pathlib import Path

from sideways_cli.config import Config, accepts_null, fields_of

HEADER = """# Configuration reference

Every key of a run's config: its default, the values it accepts and what it means. A YAML file
overrides the defaults (after its bases: `_base_: FILE` or a list of files, relative to it, each
overriding the one before) and `--set key=value` overrides the file; an unknown key, a value of the
wrong type or one out of its range is refused in one line naming the key. Made from
`sideways_cli/config.py` by `make config-docs`; do not edit by hand.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def key_rows() -> list[tuple[str, str, str, str]]:
    """(key, default, accepted values, meaning) of every key, in declaration order."""
    defaults = Config()
    rows = []
    for key, f, hint in fields_of():
        value = defaults  # by attribute: flat_dict would open model.args, a mapping value
        for part in key.split("."):
            value = getattr(value, part)
        accepts = f.metadata["allowed"].text + (" or null" if accepts_null(hint) else "")
        rows.append((key, _default(value), accepts, f.metadata["doc"]))
    return rows


def reference_markdown() -> str:
    """The reference: one table per section of the config, keys in declaration order."""
    sections: dict[str, list[str]] = {}
    for key, default, accepts, doc in key_rows():
        section = key.rsplit(".", 1)[0] if "." in key else "top level"
        sections.setdefault(section, []).append(
            f"| `{key}` | `{_cell(default)}` | {_cell(accepts)} | {_cell(doc)} |")
    parts = [HEADER]
    for section, rows in sections.items():
        parts.append(f"\n## {section}\n\n| key | default | accepts | meaning |\n|---|---|---|---|\n"
                     + "\n".join(rows) + "\n")
    return "".join(parts)


def main(argv: list[str]) -> int:
    text = reference_markdown()
    if not argv:
        sys.stdout.write(text)
        return 0
    path = Path(argv[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
