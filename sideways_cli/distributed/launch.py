"""``sideways train --set parallel.stages=P --set parallel.replicas=R`` on one machine:
``sideways train`` on the resolved config, started R x P times by torch's elastic agent, as
``torchrun --standalone --nproc-per-node R*P -m sideways_cli train ...`` would; rank r becomes
stage r % P of replica r // P (``context.py``).

When a process fails the agent stops every other one (SIGTERM, then SIGKILL after
``SHUTDOWN_S``), so no process is left behind; this reports which replica and stage failed and how.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import uuid
from typing import Any

from sideways_cli.config import Config, save_config
from sideways_cli.distributed.topology import STARTED_BY_SIDEWAYS, process_name
from sideways_cli.errors import UserError
from sideways_cli.rundir import RunDir

SHUTDOWN_S = 5  # a stage that ignores SIGTERM (hung in a kernel, stopped) is killed after this
MONITOR_S = 0.5  # how often the agent looks at its processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_as_processes(cfg: Config, run: RunDir, quiet: bool, restart: bool) -> dict[str, Any]:
    """Train ``cfg`` into ``run`` as ``parallel.replicas`` x ``parallel.stages`` processes;
    returns the run's summary. They read the config from the run directory, so any caller
    (``train``, ``compare``'s runs) can start them."""
    run.path.mkdir(parents=True, exist_ok=True)
    config = run.launch_config
    save_config(cfg, config)
    argv = ["train", str(config), "--out", str(run.path)] + (["--quiet"] if quiet else []) \
        + (["--restart"] if restart else [])
    os.environ[STARTED_BY_SIDEWAYS] = "1"  # they inherit it: rank 0 leaves the table to us
    try:
        launch(cfg.parallel.replicas, cfg.parallel.stages, argv)
    finally:
        del os.environ[STARTED_BY_SIDEWAYS]
        config.unlink(missing_ok=True)
    return run.read_summary()


def launch(replicas: int, stages: int, argv: list[str]) -> None:
    """Run ``python -m sideways_cli <argv>`` as ``replicas`` x ``stages`` processes; raise
    UserError naming the failed replica and stage if any fails."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=replicas * stages,
                          run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}",
                          max_restarts=0, monitor_interval=MONITOR_S, shutdown_timeout=SHUTDOWN_S)
    try:
        elastic_launch(config, sys.executable)("-m", "sideways_cli", *argv)
    except ChildFailedError as exc:
        raise UserError(describe_failure(exc, replicas, stages)) from None


def describe_failure(exc, replicas: int = 1, stages: int = 1) -> str:
    """One line: each failed process and how it ended, the first failure first."""
    failures = sorted(exc.failures.items(), key=lambda item: item[1].timestamp)
    parts = []
    for rank, failure in failures:
        code = failure.exitcode
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0
               else f"exited with code {code}")
        parts.append(f"{process_name(rank, replicas, stages)} {how}")
    job = "depth-parallel" if replicas == 1 else "parallel"
    return (f"the {job} job stopped: " + "; ".join(parts)
            + " (its own message is above; every other process was stopped)")
