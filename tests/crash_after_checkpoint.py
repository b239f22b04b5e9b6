"""A training that dies at a known point: the first time it logs a step past its first checkpoint.

So the death always lands after checkpoints/last.pt exists, with a logged step that the restarted
run must trim and log again, whatever the machine's speed (a test that polled for the checkpoint
and killed from outside raced the run's end).

- In this process: ``crash_after_first_checkpoint(monkeypatch)``; the next training raises
  ``Crash``, which nothing catches.
- As a process: ``python tests/crash_after_checkpoint.py ARGS...`` runs ``sideways ARGS...``,
  which SIGKILLs its whole process group at that point (itself and its loader workers: start it
  in a session of its own).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable

import pytest

from sideways_cli.run import rundir, train


class Crash(BaseException):
    """What stops a training mid-way in this process, as a kill would."""


def _raise_crash() -> None:
    raise Crash


def _kill_my_group() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


def crash_after_first_checkpoint(monkeypatch: pytest.MonkeyPatch,
                                 die: Callable[[], None] = _raise_crash) -> None:
    checkpointed = []
    save, append = train.save_checkpoint, rundir.LineLog.append

    def save_and_note(obj, path):
        save(obj, path)
        checkpointed.append(path.name == "last.pt")

    def append_or_die(log, line):
        append(log, line)
        if any(checkpointed) and log.path.name == "metrics.jsonl":
            die()

    monkeypatch.setattr(train, "save_checkpoint", save_and_note)
    monkeypatch.setattr(rundir.LineLog, "append", append_or_die)


if __name__ == "__main__":
    from sideways_cli.cli import main

    crash_after_first_checkpoint(pytest.MonkeyPatch(), die=_kill_my_group)
    sys.argv[0] = "sideways"
    main()
