"""Where a command writes: checked (and its folder created) before any work starts, so that a path
that cannot take the output is one line naming the option, not a traceback after training.

``output_dir`` is for a folder option (``--out``), ``output_file`` for a file one (``--json``).
Both try the real thing (``mkdir``) and turn what the operating system says into a UserError;
``os.access`` then tells whether what exists can be written (for root it almost always can).

``preset`` finds a preset config (experiments/*.yaml) from any working directory, in a checkout
and where the package is installed.
"""

from __future__ import annotations

import os
from pathlib import Path

from sideways_cli.support.errors import UserError

_WRITABLE_DIR = os.W_OK | os.X_OK  # adding an entry to a folder needs both


def output_dir(path: str | os.PathLike, option: str) -> Path:
    """``path`` as a folder that exists and can be written, created (with its parents) if needed;
    UserError naming ``option``, the path and the cause otherwise."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise UserError(f"{option} {path} is {_kind(path)}; give a directory")
    _make_dirs(path, option, path)
    if not os.access(path, _WRITABLE_DIR):
        raise UserError(f"{option} {path}: the directory is not writable; choose a writable place")
    return path


def output_file(path: str | os.PathLike, option: str) -> Path:
    """``path`` as a file that can be written: not a folder, its folder existing (created if
    needed) and writable, the file itself writable if it is there; UserError naming ``option``,
    the path and the cause otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file name")
    folder = path.parent
    if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
        raise UserError(f"{option} {path}: {folder} is {_kind(folder)}, not a directory; "
                        "choose another place")
    _make_dirs(folder, option, path)
    if not os.access(folder, _WRITABLE_DIR):
        raise UserError(f"{option} {path}: its directory {folder} is not writable; choose a "
                        "writable place")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{option} {path}: the file is read-only; choose a writable place or "
                        "make it writable")
    return path


def output_per_input(path: str | os.PathLike, inputs: list[Path], option: str,
                     suffix: str) -> dict[Path, Path]:
    """Where ``option`` writes one ``suffix`` file per input: ``path`` itself when it names such a
    file (one input only), else a folder (created if needed) that mirrors the inputs' folders below
    the one they share (``val/a/0.mp4`` and ``val/b/0.mp4`` give ``path/a/0<suffix>`` and
    ``path/b/0<suffix>``). UserError for several inputs and one file, two inputs that would share
    an output, or an output that would replace an input."""
    path = Path(path)
    if path.suffix.lower() == suffix:
        if len(set(inputs)) > 1:
            raise UserError(f"{option} {path} names one file for {len(inputs)} inputs; give a "
                            f"folder, which gets <name>{suffix} for each")
        outputs = {item: output_file(path, option) for item in inputs}
    else:
        folder = output_dir(path, option)
        shared = Path(os.path.commonpath([item.resolve().parent for item in inputs]))
        outputs = {item: folder / item.resolve().relative_to(shared).with_suffix(suffix) for item in inputs}
        by_output: dict[Path, Path] = {}
        for item, out in outputs.items():
            other = by_output.setdefault(out, item)
            if other.resolve() != item.resolve():
                raise UserError(f"{option}: {other} and {item} would both be written to {out}; "
                                "label them in separate commands")
    for item, out in outputs.items():
        if out.resolve() == item.resolve():
            raise UserError(f"{option} would write over {item}, one of the inputs; choose another "
                            "place")
        out.parent.mkdir(parents=True, exist_ok=True)
    return outputs


def _make_dirs(folder: Path, option: str, shown: Path) -> None:
    """``folder.mkdir(parents=True)``, what goes wrong as a UserError about ``option shown``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        failed = Path(exc.filename) if exc.filename else folder
        where = "it" if failed == shown else str(failed)
        cause = exc.strerror or type(exc).__name__
        cause = cause[:1].lower() + cause[1:]
        if isinstance(exc, PermissionError):
            raise UserError(f"{option} {shown}: {cause} creating {where}; choose a writable "
                            "place") from None
        if isinstance(exc, (NotADirectoryError, FileExistsError)):
            blocker = _first_non_directory(folder)
            if blocker is not None:
                raise UserError(f"{option} {shown}: {blocker} is {_kind(blocker)}, not a "
                                "directory; choose another place") from None
        raise UserError(f"{option} {shown}: cannot create {where} ({cause}); choose another "
                        "place") from None


def _first_non_directory(folder: Path) -> Path | None:
    """The first part of ``folder``, from the root down, that is there but is not a folder."""
    for part in reversed([folder, *folder.parents]):  # the root first
        if (part.exists() or part.is_symlink()) and not part.is_dir():
            return part
    return None


def _kind(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return "a broken symbolic link"
    return "a file" if path.is_file() else "a special file"


PRESETS = Path("experiments")  # the presets' folder in a checkout (and in a working directory)


def preset(name: str) -> Path | None:
    """The preset config file ``name`` (e.g. "synthetic.yaml"): ./experiments/NAME where the
    working directory has one (a checkout, or the user's own copy), else the copy installed with
    the package (sideways_cli/presets/, see pyproject.toml), else the source checkout's (an
    editable install); None where none is there."""
    package = Path(__file__).resolve().parents[1]  # sideways_cli/
    for candidate in (PRESETS / name, package / "presets" / name, package.parent / PRESETS / name):
        if candidate.is_file():
            return candidate
    return None
