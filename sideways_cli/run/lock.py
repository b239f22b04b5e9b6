"""One writer per run directory: an advisory lock (``RUN_DIR/.lock``) that every process writing
the directory holds, so that a second ``train`` or ``compare`` on it is refused instead of
interleaving its logs with the first's.

The lock is the kernel's (``flock``): it goes with the process, so a killed run never leaves a
stale one, and nothing needs cleaning up. The file keeps the holder's PID, host and command for
the refusal message; it is never deleted (deleting it would let two processes lock two files of
the same name). On NFS, Linux maps ``flock`` onto the server's byte-range locks, so the lock holds
across machines sharing the directory. Where ``fcntl`` does not exist (Windows) no lock is taken.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from sideways_cli.support.atomic import writing
from sideways_cli.support.errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

_held: list[int] = []  # this process's lock descriptors


def _close_in_child() -> None:
    # A forked child (a data-loader worker) shares the lock's open file; closing its copy keeps
    # the lock with the parent alone, so it is released the moment the parent dies.
    for fd in _held:
        os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """Held while a process writes the run directory ``path``; refuses (UserError, naming the
    holder) when another process holds it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = self.path / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        if fcntl is None:
            return self
        with writing(self.file):
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(self.file)
            os.close(fd)
            raise UserError(f"{self.path} is being written by another sideways process ({holder}); "
                            "wait for it to finish or stop it, or give a new --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(["sideways", *sys.argv[1:]])}).encode())
        self.fd = fd
        _held.append(fd)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            _held.remove(self.fd)
            os.close(self.fd)  # releases the lock
            self.fd = None


def _describe(file: Path) -> str:
    try:
        holder = json.loads(file.read_text())
        return (f"PID {holder['pid']} on {holder['host']}, since {holder['since']}: "
                f"{holder['command']}")
    except (OSError, ValueError, KeyError, TypeError):  # it is writing its details right now
        return "its details are being written"
