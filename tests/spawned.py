"""Process groups of the workers that tests start with torch.multiprocessing.spawn.

Twice a full ``make test`` saw such a worker die of SIGABRT ("terminate called without an active
exception", a C++ thread torn down while running) after its work was done; it never recurred in
30 runs of the fixture alone. Both causes it can have are taken away here: the group meets through
a file rather than a port picked before the workers start (another process can take that port in
the seconds they need to import torch), and a worker leaves in step with the others and then ends
without interpreter finalization, which destroys gloo's threads in whatever order it meets them.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch.distributed as dist

# Workers are forked from one server process that imported torch, its compiler stack (which
# every optimizer imports) and the engine once, instead of each spawned interpreter importing
# them again (about 5 s of CPU each). The server only imports: it starts no thread that a fork
# could break. Set before the first worker starts the server; every test module shares it.
START_METHOD = "forkserver"
multiprocessing.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed",
                                        "sideways_cli.engine", "sideways_cli.parallel.staged_sideways",
                                        "sideways_cli.parallel.staged_chunked", "tiny"])


def join(rank: int, world: int, rendezvous: Path | str) -> None:
    """Join the ``world``-process gloo group meeting in the file ``rendezvous`` (absent until
    the first worker creates it; one file per group)."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)


def leave() -> NoReturn:
    """Every worker reaches this point, then each destroys the group and exits at once."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
