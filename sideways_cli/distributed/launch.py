"""``sideways train --set parallel.stages=P`` on one machine: the same command, started P times by
torch's elastic agent, as ``torchrun --standalone --nproc-per-node P -m sideways_cli train ...``
would; rank r becomes stage r.

When a stage fails the agent stops every other one (SIGTERM, then SIGKILL after
``SHUTDOWN_S``), so no process is left behind; this reports which stage failed and how.
"""

from __future__ import annotations

import signal
import socket
import sys
import uuid

from sideways_cli.errors import UserError

SHUTDOWN_S = 5  # a stage that ignores SIGTERM (hung in a kernel, stopped) is killed after this
MONITOR_S = 0.5  # how often the agent looks at its processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_stages(stages: int, argv: list[str]) -> None:
    """Run ``python -m sideways_cli <argv>`` as ``stages`` processes; raise UserError naming the
    failed stage if any fails."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=stages, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}",
                          max_restarts=0, monitor_interval=MONITOR_S, shutdown_timeout=SHUTDOWN_S)
    try:
        elastic_launch(config, sys.executable)("-m", "sideways_cli", *argv)
    except ChildFailedError as exc:
        raise UserError(describe_failure(exc)) from None


def describe_failure(exc) -> str:
    """One line: each failed stage (rank) and how it ended, the first failure first."""
    failures = sorted(exc.failures.items(), key=lambda item: item[1].timestamp)
    parts = []
    for rank, failure in failures:
        code = failure.exitcode
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0
               else f"exited with code {code}")
        parts.append(f"stage {rank} {how}")
    return ("the depth-parallel job stopped: " + "; ".join(parts)
            + " (its own message is above; every other stage was stopped)")
