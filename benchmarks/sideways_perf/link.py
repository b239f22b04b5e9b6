"""The link between two neighbouring stage processes, as the throughput models charge it: a
latency and a bandwidth, fitted from ping-pong transfers between two local processes."""

from __future__ import annotations

import json
import math
import socket
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing


@dataclass(frozen=True)
class Link:
    """One hop between neighbouring stages: ``alpha`` seconds of latency, ``beta`` bytes/s."""

    alpha: float
    beta: float
    points: list[tuple[int, float]] = field(default_factory=list)  # measured (bytes, one-way s)

    def hop_s(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` one way."""
        return self.alpha + nbytes / self.beta



def measure_link(backend: str = "gloo", sizes: tuple[int, ...] = (4, 1 << 16, 1 << 20, 1 << 22),
                 repeats: int = 20) -> Link:
    """alpha and beta of the link between two local processes, from ping-pong isend/irecv of
    float32 CPU tensors of ``sizes`` bytes: a least-squares fit of one-way time (half a round trip)
    against bytes, weighted by 1/time so that the latency of small messages counts as much as the
    bandwidth of large ones. The fit takes each size's fastest round trip: on a busy machine the
    others are bimodal, some paying a scheduler time slice (2-4 ms on 2 shared cores), which is
    contention for the cores, not a property of the link. ``points`` keeps every round trip."""
    if any(size < 4 or size % 4 for size in sizes):
        raise ValueError(f"sizes are bytes of float32 tensors, positive multiples of 4: {sizes}")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "points.json"
        torch.multiprocessing.spawn(_ping_pong, args=(_free_port(), backend, sizes, repeats, out),
                                    nprocs=2, join=True)
        points = [tuple(p) for p in json.loads(out.read_text())]
    times = np.array([min(s for b, s in points if b == size) for size in sizes])
    design = np.stack([np.ones_like(times), np.array(sizes, dtype=float)], axis=1) / times[:, None]
    (alpha, inverse_beta), *_ = np.linalg.lstsq(design, np.ones_like(times), rcond=None)
    return Link(float(alpha), float(1 / inverse_beta) if inverse_beta > 0 else math.inf, points)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping_pong(rank: int, port: int, backend: str, sizes: tuple[int, ...], repeats: int,
               out: Path) -> None:
    """Rank 0 sends, rank 1 sends it back; rank 0 records half of each round trip."""
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=30))
    peer, points = 1 - rank, []
    try:
        for size in sizes:
            x = torch.zeros(size // 4)
            for i in range(repeats + 2):  # 2 warm-up round trips set up the connection's buffers
                start = time.perf_counter()
                if rank == 0:
                    dist.isend(x, peer).wait()
                    dist.irecv(x, peer).wait()
                else:
                    dist.irecv(x, peer).wait()
                    dist.isend(x, peer).wait()
                if rank == 0 and i >= 2:
                    points.append((size, (time.perf_counter() - start) / 2))
    finally:
        dist.destroy_process_group()
    if rank == 0:
        out.write_text(json.dumps(points))
