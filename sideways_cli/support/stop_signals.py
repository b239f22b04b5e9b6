"""Signals that ask a training to stop: it finishes the step in hand, writes its checkpoint and
exits with the signal's conventional status (128 + its number), so that the same command resumes
it losing nothing.

SIGTERM is how SLURM, Kubernetes and torchrun stop a job; SIGUSR1 is what SLURM's
``--signal=USR1@SECONDS`` sends ahead of a time limit; SIGINT is Ctrl-C. A terminal's Ctrl-C
reaches every process of the foreground group and torchrun's agent forwards the signal it gets,
so a process sees the same request twice within milliseconds: a repeat is taken as the same
request, and only a second Ctrl-C a second or more after the first stops at once (no checkpoint).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType
from typing import Callable

STOP_SIGNALS = tuple(int(s) for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT)
                     if s is not None)
_REPEAT_S = 1.0  # a second Ctrl-C later than this stops at once


class Stopped(Exception):
    """The run stopped on a signal after checkpointing ``step``."""

    def __init__(self, signum: int, step: int | None):
        self.signum, self.step = signum, step
        self.silent = False  # another process of the job reports it
        at = f" after step {step}, its checkpoint written" if step is not None else ""
        super().__init__(f"stopped by {describe(signum)}{at}; run the same command again to "
                         "resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def describe(signum: int) -> str:
    name = signal.Signals(signum).name
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else name


class StopRequests:
    """While entered (in the main thread), the stop signals set :attr:`signum` instead of killing
    the process; the loop reads it between steps. ``announce`` is told once, in words."""

    def __init__(self, announce: Callable[[str], None]):
        self.announce = announce
        self.signum = 0  # the first stop signal received; 0: none
        self._first_at = 0.0
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked data-loader worker: its parent decides
            return
        if not self.signum:
            self.signum, self._first_at = signum, time.monotonic()
            self.announce(f"{describe(signum)}: stopping after the step in hand, then writing a "
                          "checkpoint" + (" (Ctrl-C again to stop at once)"
                                          if signum == signal.SIGINT else ""))
        elif signum == signal.SIGINT and time.monotonic() - self._first_at > _REPEAT_S:
            raise KeyboardInterrupt
