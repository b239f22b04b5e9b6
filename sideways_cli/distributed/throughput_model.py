"""A throughput model of depth-parallel Sideways: training frames/s for P stages, before running P.

The stages run in lock step, one tick at a time. Module d (0-based, of D) is busy forward when it
has a new input and busy backward when it holds a message; in ``pipeline: reset`` a clip of T
frames takes T + 2(D-1) ticks, module d computing forwards at ticks [d, d+T) and VJPs at ticks
[2(D-1)-d, 2(D-1)-d+T); in ``continuous`` every module does both every tick, T ticks per clip.
A tick lasts as long as its slowest stage (the sum of its busy modules' measured costs), plus the
communication it cannot hide. frames/s = B*T / (the sum of one clip's tick times).

Communication: each stage boundary carries an activation up (when the module below it computed a
forward) and a message down (when the module above it computed a VJP). A module's tick-t work needs
what its neighbour produced at tick t-1, so the exchange sits between two ticks of compute and is
added to the tick: one hop, alpha + bytes/beta, of the busiest boundary at that tick (boundaries
are separate process pairs, exchanging at once), its bytes up and down summed: on CPU, gloo copies
both directions with the same cores. Calibrated on 2 shared CPU cores (two processes, 1 thread
each, ~1 ms of conv per tick, then isend/irecv of n bytes each way; ping-pong fit alpha 80-160 us,
beta 4.1-4.3 GB/s): posting the exchange before the compute saved under 10% of its cost, so it is
not hidden, and it cost 1.5-2.5x this hop, about 0.45 ms + 2n / 2.5 GB/s (a lock-step tick also
waits for the slower of two noisy computes). The model is thus optimistic about communication,
which at the demo's 32-192 KiB boundaries and ~12 ms stage ticks is a few per cent of a tick.

Stages are processes: with more stages than ``cores`` they share the cores, and a tick lasts at
least its total busy work over the cores (the lower bound of time slicing).
"""

from __future__ import annotations

import json
import math
import socket
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing

from sideways_cli.atomic import replace_atomically
from sideways_cli.distributed.balance import ModuleCosts, partition


@dataclass(frozen=True)
class Link:
    """One hop between neighbouring stages: ``alpha`` seconds of latency, ``beta`` bytes/s."""

    alpha: float
    beta: float
    points: list[tuple[int, float]] = field(default_factory=list)  # measured (bytes, one-way s)

    def hop_s(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` one way."""
        return self.alpha + nbytes / self.beta


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one number of stages."""

    stages: int
    sizes: list[int]  # modules per stage, bottom first
    ticks: int  # per clip
    clip_s: float  # seconds per batch of clips: the sum of its tick times
    frames_per_s: float


def busy(depth: int, clip_len: int, pipeline: str) -> tuple[np.ndarray, np.ndarray]:
    """[ticks, depth] masks of the modules computing a forward and a VJP at each tick of a clip."""
    if pipeline == "continuous":
        full = np.ones((clip_len, depth), dtype=bool)
        return full, full.copy()
    if pipeline != "reset":
        raise ValueError(f"pipeline must be reset or continuous, got {pipeline!r}")
    tick = np.arange(clip_len + 2 * (depth - 1))[:, None]
    d = np.arange(depth)[None, :]
    first_message = 2 * (depth - 1) - d
    return ((tick >= d) & (tick < d + clip_len),
            (tick >= first_message) & (tick < first_message + clip_len))


def clip_seconds(costs: ModuleCosts, sizes: list[int], link: Link, clip_len: int,
                 pipeline: str = "reset", cores: int | None = None) -> tuple[float, int]:
    """Seconds and ticks of one batch of clips with stages of ``sizes`` modules, on ``cores``
    cores (None: one per stage)."""
    if sum(sizes) != len(costs.names) or min(sizes) < 1:
        raise ValueError(f"stage sizes {sizes} do not split the {len(costs.names)} modules")
    forward, backward = busy(len(costs.names), clip_len, pipeline)
    work = forward * np.array(costs.forward_s) + backward * np.array(costs.backward_s)
    edges = np.cumsum([0, *sizes])
    compute = np.add.reduceat(work, edges[:-1], axis=1).max(axis=1)
    if cores is not None and cores < len(sizes):
        compute = np.maximum(compute, work.sum(axis=1) / cores)
    below = edges[1:-1] - 1  # the module under each stage boundary
    exchanged = (forward[:, below] * np.array(costs.output_bytes)[below]
                 + backward[:, below + 1] * np.array(costs.input_bytes)[below + 1])
    busiest = exchanged.max(axis=1, initial=0)
    hop = np.where(busiest > 0, link.alpha + busiest / link.beta, 0.0)
    return float((compute + hop).sum()), len(work)


def predict(costs: ModuleCosts, stages: int, link: Link, batch: int, clip_len: int,
            pipeline: str = "reset", cores: int | None = None) -> Prediction:
    """Frames/s with ``stages`` stages split by :func:`partition` of the modules' tick costs."""
    sizes = partition(costs.total_s, stages)
    seconds, ticks = clip_seconds(costs, sizes, link, clip_len, pipeline, cores)
    return Prediction(stages, sizes, ticks, seconds, batch * clip_len / seconds)


def sweep(costs: ModuleCosts, link: Link, batch: int, clip_len: int, pipeline: str = "reset",
          cores: int | None = None, max_stages: int = 64) -> list[Prediction]:
    """:func:`predict` for P = 1 .. min(max_stages, modules): a stage holds at least one module."""
    return [predict(costs, p, link, batch, clip_len, pipeline, cores)
            for p in range(1, min(max_stages, len(costs.names)) + 1)]


def repeat_stack(costs: ModuleCosts, depth: int = 64, middle: int | None = None) -> ModuleCosts:
    """A deep uniform network of ``depth`` modules: the first one, depth - 2 copies of module
    ``middle`` (default the middle one), the head. What a network that deep would cost, from a
    measured shallow one, so that the sweep reaches 64 stages of one module each. Every module
    keeps its own bytes across the boundaries."""
    measured = len(costs.names)
    middle = measured // 2 if middle is None else middle
    if measured < 3 or not 0 < middle < measured - 1 or depth < 3:
        raise ValueError(f"need a first module, a middle one and a head, and depth >= 3; got "
                         f"{measured} modules, middle={middle}, depth={depth}")
    order = [0] + [middle] * (depth - 2) + [measured - 1]
    names = [costs.names[0], *(f"{costs.names[middle]}.{i}" for i in range(depth - 2)),
             costs.names[-1]]
    keys = ("forward_s", "backward_s", "output_bytes", "input_bytes")
    return replace(costs, names=names, **{key: [getattr(costs, key)[d] for d in order]
                                          for key in keys})


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


def plot_model(path: Path, curves: dict[str, list[Prediction]],
               measured_points: dict[str, list[tuple[int, float]]]) -> None:
    """Frames/s against stages (log-log: P-fold scaling is a line of slope 1): predicted curves as
    lines, measured (P, frames/s) as markers, the same colour where a label is shared."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training machine
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys([*curves, *measured_points]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, predictions in curves.items():
        ax.plot([p.stages for p in predictions], [p.frames_per_s for p in predictions],
                color=f"C{labels.index(label) % 10}", label=f"{label} (model)")
    for label, points in measured_points.items():
        if points:
            ax.plot(*zip(*points), linestyle="none", marker="o", markersize=6,
                    color=f"C{labels.index(label) % 10}", label=f"{label} (measured)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="stages P (processes)", ylabel="training frames/s",
           title="depth-parallel Sideways: predicted and measured throughput")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    replace_atomically(Path(path), lambda tmp: fig.savefig(tmp, dpi=120), suffix=".tmp.png")
    plt.close(fig)
