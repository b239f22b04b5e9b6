"""``sideways train --set parallel.stages=P --set parallel.replicas=R`` on one machine:
``sideways train`` on the resolved config, started R x P times by torch's elastic agent, as
``torchrun --standalone --nproc-per-node R*P -m sideways_cli train ...`` would; rank r becomes
stage r % P of replica r // P (``context.py``).

When a process fails the agent stops every other one (SIGTERM, then SIGKILL after
``SHUTDOWN_S``), so no process is left behind; this reports which replica and stage failed and how.
A stop signal this process receives (SIGTERM, SIGUSR1, Ctrl-C) the agent passes on to every
process, which finish the step in hand and checkpoint (``stop_signals.py``) within ``SHUTDOWN_S``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import uuid
from typing import Any

from sideways_cli.config import Config, save_config
from sideways_cli.parallel.topology import STARTED_BY_SIDEWAYS, process_name
from sideways_cli.run.rundir import RunDir
from sideways_cli.support.errors import UserError
from sideways_cli.support.safe_load import load_tensors
from sideways_cli.support.stop_signals import STOP_SIGNALS, Stopped

SIGNALS_TO_FORWARD = "TORCHELASTIC_SIGNALS_TO_HANDLE"

# a signalled process has this long to finish its step and write its checkpoint (SLURM's and
# Kubernetes' default grace); one hung in a kernel or stopped is then killed (one whose neighbour
# died fails on its own within the hang timeout)
SHUTDOWN_S = 30
# the signals the agent passes on: torch's default set, and SLURM's warning ahead of a time limit
FORWARDED = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
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
    # they inherit it: rank 0 leaves the table to us, and the run's lock (held here) to us
    os.environ[STARTED_BY_SIDEWAYS] = "1"
    try:
        launch(cfg.parallel.replicas, cfg.parallel.stages, argv)
    except Stopped as stopped:
        raise Stopped(stopped.signum, checkpointed_step(run)) from None
    finally:
        del os.environ[STARTED_BY_SIDEWAYS]
        config.unlink(missing_ok=True)
    return run.read_summary()


def checkpointed_step(run: RunDir) -> int | None:
    """The step of the run's last checkpoint, if there is one (its manifest is small)."""
    try:
        return int(load_tensors(run.checkpoint())["step"])
    except Exception:  # noqa: BLE001 - none yet, or being replaced: the message omits the step
        return None


def launch(replicas: int, stages: int, argv: list[str]) -> None:
    """Run ``python -m sideways_cli <argv>`` as ``replicas`` x ``stages`` processes; raise
    UserError naming the failed replica and stage if any fails."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # newer torch takes the signals to pass on as a setting (and sets the variable from it);
    # older torch reads the variable when the agent starts the processes
    forwarding = ({"signals_to_handle": FORWARDED}
                  if "signals_to_handle" in LaunchConfig.__dataclass_fields__ else {})
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=replicas * stages,
                          run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}",
                          max_restarts=0, monitor_interval=MONITOR_S, shutdown_timeout=SHUTDOWN_S,
                          **forwarding)
    previous = os.environ.get(SIGNALS_TO_FORWARD)
    os.environ[SIGNALS_TO_FORWARD] = FORWARDED
    # the agent installs handlers that raise in this process and leaves them: put ours back after,
    # or a later Ctrl-C (or a forked worker's SIGTERM) would meet torch's instead of ours
    handlers = {sig: signal.getsignal(sig) for sig in map(signal.Signals.__getitem__,
                                                             FORWARDED.split(","))}
    # the agent's warnings narrate a stop or a failure that the line this raises names already
    for name in list(logging.root.manager.loggerDict):  # torch sets each one's own level
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        elastic_launch(config, sys.executable)("-m", "sideways_cli", *argv)
    except SignalException as exc:  # the agent passed it on and waited for every process
        raise Stopped(int(exc.sigval), None) from None
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        stop_codes = {128 + signum for signum in STOP_SIGNALS}
        if codes <= stop_codes:  # a signal reached the processes alone; they stopped together
            raise Stopped(min(codes) - 128, None) from None
        raise UserError(describe_failure(exc, replicas, stages)) from None
    finally:
        if previous is None:
            del os.environ[SIGNALS_TO_FORWARD]
        else:
            os.environ[SIGNALS_TO_FORWARD] = previous
        for sig, handler in handlers.items():
            if handler is not None:  # None: set outside Python, which cannot be restored
                signal.signal(sig, handler)


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
