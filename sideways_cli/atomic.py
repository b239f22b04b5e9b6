"""Files that are either the old version or the new one, never half written (a kill, a full disk)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def replace_atomically(path: Path, write: Callable[[Path], None], suffix: str = ".tmp") -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path``: a rename is atomic
    on POSIX and Windows. ``suffix`` ends the temporary name (a writer may read it for the format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + suffix)
    write(tmp)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(text))
