"""``python tests/crash_after_checkpoint.py ARGS...``: ``sideways ARGS...`` killed at a known point.

The process SIGKILLs its whole process group (itself and its loader workers: start it in a
session of its own) the first time it appends a line to metrics.jsonl after it has written
checkpoints/last.pt. So the kill always lands after a checkpoint, with a logged step that the
restarted run must trim and log again, whatever the machine's speed; a test that polled for the
checkpoint and killed from outside raced the run's end.
"""

from __future__ import annotations

import os
import signal
import sys

from sideways_cli.cli import main
from sideways_cli.run import rundir, train

_checkpointed = False
_save_checkpoint = train.save_checkpoint
_append = rundir.LineLog.append


def _save_and_note(obj, path) -> None:
    global _checkpointed
    _save_checkpoint(obj, path)
    _checkpointed = _checkpointed or path.name == "last.pt"


def _append_or_die(log: rundir.LineLog, line: str) -> None:
    _append(log, line)
    if _checkpointed and log.path.name == "metrics.jsonl":
        os.killpg(os.getpgid(0), signal.SIGKILL)


if __name__ == "__main__":
    train.save_checkpoint = _save_and_note
    rundir.LineLog.append = _append_or_die
    sys.argv[0] = "sideways"
    main()
