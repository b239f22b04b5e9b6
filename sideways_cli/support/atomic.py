"""Files that are either the old version or the new one, never half written (a kill, a full disk),
and a failed write as one line naming the file and the cause."""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from sideways_cli.support.errors import UserError

# what the user can fix (space, permissions, the path itself): exit 2; anything else (an I/O
# error of the device) is still one line, with exit 1
_FIXABLE = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
            errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EFBIG, errno.ENOENT}


class WriteError(UserError):
    """A file could not be written; the message names it and the cause."""

    def __init__(self, path: Path, exc: OSError):
        cause = exc.strerror or str(exc)
        advice = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (quota)",
                  errno.EACCES: "make it writable or choose another place",
                  errno.EROFS: "choose a writable place"}.get(exc.errno, "")
        super().__init__(f"cannot write {path}: {cause}" + (f"; {advice}" if advice else ""))
        self.path, self.errno = path, exc.errno
        self.exit_code = 2 if exc.errno in _FIXABLE else 1


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """An OSError while writing ``path`` (a full disk, no permission) becomes a
    :class:`WriteError` naming it, also when the writer's own clean-up turned it into another
    error (torch.save's zip writer does)."""
    try:
        yield
    except Exception as exc:
        cause = _os_error_in(exc)
        if cause is None:
            raise
        raise WriteError(path, cause) from None


def _os_error_in(exc: BaseException | None) -> OSError | None:
    """The OSError ``exc`` is, or was raised while handling."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def replace_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write`` into a temporary file beside ``path`` (an open binary file), flush it to the disk,
    then rename it over ``path``: a rename is atomic on POSIX and Windows, so readers and a kill
    see the old file or the new one. On any failure the temporary file is removed and the old
    file stands; a failed write is a :class:`WriteError` (:func:`writing`)."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())  # the data on the disk before the name points at it
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_text_atomic(path: Path, text: str) -> None:
    replace_atomically(path, lambda f: f.write(text.encode()))


def complete_lines(path: Path) -> list[str]:
    """The lines of a file that another process may be appending to, up to its last complete
    one (a line being written has no newline yet)."""
    text = path.read_text()
    return text[:text.rfind("\n") + 1].splitlines()
