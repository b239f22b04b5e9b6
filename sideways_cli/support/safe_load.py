"""Reading a torch file without running anything it holds.

A checkpoint, shard or weights file is a pickle, and unpickling an arbitrary object calls whatever
the file names: a run directory someone shared could run code on ``sideways eval``. Every file the
project reads goes through :func:`load_tensors`, which unpickles only tensors and plain data
(``torch.load(weights_only=True)``) and reports, in one line, what else a file holds.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Callable

import torch


class UnsafeFile(Exception):
    """A file that holds objects other than tensors and plain data; nothing of it was run."""

    def __init__(self, path: Path, what: str):
        self.path = path
        super().__init__(f"{path} holds {what}, not only tensors and plain data; it was not "
                         "loaded, since loading it could run code")


def load_tensors(path: Path) -> Any:
    """``path``'s contents on the CPU, tensors and plain data only. UnsafeFile if it holds
    anything else; the loader's own exception if it is damaged or not a torch file."""
    return refusing_code(path, lambda: torch.load(path, map_location="cpu", weights_only=True))


def refusing_code(path: Path, load: Callable[[], Any]) -> Any:
    """``load()``, a weights-only unpickling of ``path`` (torch.load's or torch.hub's with
    ``weights_only=True``); UnsafeFile naming the object when the unpickler refused one."""
    try:
        return load()
    except pickle.UnpicklingError as exc:
        # running code from a pickle takes a callable, which it names as a global: the one the
        # weights-only unpickler refuses; any other failure is a damaged file
        named = re.findall(r"GLOBAL ([\w.]+)", str(exc))
        if not named:
            raise
        raise UnsafeFile(path, f"the object {named[0]}") from None


def load_failure(exc: Exception) -> str:
    """Why a file could not be loaded, in one line: the exception's first line, but for the
    weights-only unpickler its own reason ("Unsupported operand 103") rather than torch's preamble,
    which advises loading the file unsafely."""
    text = str(exc).strip()
    _, marker, rest = text.partition("WeightsUnpickler error:")
    if marker and rest.strip():
        text = rest.strip()
    return text.splitlines()[0] if text else type(exc).__name__
