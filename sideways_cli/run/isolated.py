"""Train in a fresh process, so that runs trained one after another are measured alike.

In one process a later run would inherit what the earlier ones left behind: CPU memory the
allocator keeps (resident memory never shrinks back, so the later run's peak would read near
zero), warm caches and started threads. A spawned child starts every run from the same state.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from sideways_cli.config import Config
from sideways_cli.data.decode import DecodeError
from sideways_cli.reports.progress import console_log
from sideways_cli.run.rundir import RunDir
from sideways_cli.run.train import train
from sideways_cli.support.errors import UserError, print_user_error


def _train_child(cfg: Config, run_dir: str, quiet: bool, restart: bool) -> None:
    try:
        train(cfg, Path(run_dir), quiet=quiet, log=console_log(Console(), quiet), restart=restart)
    except (UserError, DecodeError) as exc:
        print_user_error(exc)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def train_isolated(cfg: Config, run_dir: Path, quiet: bool = False, restart: bool = False) -> dict[str, Any]:
    """Run `train` in a spawned child and return its summary; exits with the child's status if it
    fails (the child has already printed why)."""
    child = mp.get_context("spawn").Process(target=_train_child, args=(cfg, str(run_dir), quiet, restart))
    child.start()
    try:
        child.join()
    except KeyboardInterrupt:
        child.join()  # the child got the same Ctrl-C and stops on its own
        raise
    if child.exitcode != 0:
        sys.exit(child.exitcode if child.exitcode and child.exitcode > 0 else 1)
    return RunDir(run_dir).read_summary()
