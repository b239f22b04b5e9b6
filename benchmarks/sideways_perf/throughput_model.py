"""A throughput model of depth-parallel Sideways: training frames/s for P stages, before running P.

The tick rule's stages (``staged_sideways.py``) run in lock step, one tick at a time. Module d is
busy forward when it has a new input and busy backward when it holds a message (the schedule's
``input_ticks`` and ``Schedule.message_ticks``): in ``between_clips: reset`` a clip of T frames takes T + 2(D-1)
ticks, in ``continuous`` every module does both every tick, T ticks per clip. A tick lasts as long
as its slowest stage (the sum of its busy modules' measured costs), plus the communication it
cannot hide. frames/s = B*T / (the sum of one clip's tick times).

Communication: each stage boundary carries an activation up (when the module below it computed a
forward) and a message down (when the module above it computed a VJP). A module's tick-t work needs
what its neighbour produced at tick t-1, so the exchange sits between two ticks of compute and is
added to the tick: one hop (``link.Link``) of the busiest boundary at that tick (boundaries are
separate process pairs, exchanging at once), its bytes up and down summed: on CPU, gloo copies
both directions with the same cores.

Stages are processes: with more stages than ``cores`` they share the cores, and a tick lasts at
least its total busy work over the cores (the lower bound of time slicing). The chunked executor's
model is ``chunked_model.py``; how close both come to measured runs is in docs/benchmarks.md.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np

from sideways_cli.engine.clock import Schedule, input_ticks
from sideways_cli.parallel.balance import ModuleCosts, partition
from sideways_cli.support.atomic import replace_atomically
from sideways_perf.link import Link
from sideways_perf.macro_costs import MacroCosts

CostsT = TypeVar("CostsT", ModuleCosts, MacroCosts)


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one number of stages."""

    stages: int
    sizes: list[int]  # modules per stage, bottom first
    ticks: int  # per clip
    clip_s: float  # seconds per batch of clips: the sum of its tick times
    frames_per_s: float


def busy(modules: int, clip_len: int, between_clips: str) -> tuple[np.ndarray, np.ndarray]:
    """[ticks, modules] masks of the modules computing a forward and a VJP at each tick of a clip."""
    if between_clips == "continuous":
        full = np.ones((clip_len, modules), dtype=bool)
        return full, full.copy()
    if between_clips != "reset":
        raise ValueError(f"between_clips must be reset or continuous, got {between_clips!r}")
    ticks = clip_len + 2 * (modules - 1)
    forward, backward = np.zeros((2, ticks, modules), dtype=bool)
    for g in range(modules):
        forward[list(input_ticks(g, clip_len)), g] = True
        backward[list(Schedule((1,) * modules).message_ticks(g, clip_len)), g] = True
    return forward, backward


def clip_seconds(costs: ModuleCosts, sizes: list[int], link: Link, clip_len: int,
                 between_clips: str = "reset", cores: int | None = None) -> tuple[float, int]:
    """Seconds and ticks of one batch of clips with stages of ``sizes`` modules, on ``cores``
    cores (None: one per stage)."""
    if sum(sizes) != len(costs.names) or min(sizes) < 1:
        raise ValueError(f"stage sizes {sizes} do not split the {len(costs.names)} modules")
    forward, backward = busy(len(costs.names), clip_len, between_clips)
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
            between_clips: str = "reset", cores: int | None = None) -> Prediction:
    """Frames/s with ``stages`` stages split by :func:`partition` of the modules' tick costs."""
    sizes = partition(costs.total_s, stages)
    seconds, ticks = clip_seconds(costs, sizes, link, clip_len, between_clips, cores)
    return Prediction(stages, sizes, ticks, seconds, batch * clip_len / seconds)


def sweep(costs: ModuleCosts, link: Link, batch: int, clip_len: int, between_clips: str = "reset",
          cores: int | None = None, max_stages: int = 64) -> list[Prediction]:
    """:func:`predict` for P = 1 .. min(max_stages, modules): a stage holds at least one module."""
    return [predict(costs, p, link, batch, clip_len, between_clips, cores)
            for p in range(1, min(max_stages, len(costs.names)) + 1)]


def repeat_stack(costs: CostsT, depth: int = 64, middle: int | None = None) -> CostsT:
    """A deep uniform network of ``depth`` modules: the first one, depth - 2 copies of module
    ``middle`` (default the middle one), the head. What a network that deep would cost, from a
    measured shallow one, so that the sweep reaches 64 stages of one module each. Every module
    keeps its own bytes across the boundaries. Tick costs (:class:`ModuleCosts`) or macro-tick
    costs (:class:`MacroCosts`): their ``PER_MODULE`` fields are copied."""
    measured = len(costs.names)
    middle = measured // 2 if middle is None else middle
    if measured < 3 or not 0 < middle < measured - 1 or depth < 3:
        raise ValueError(f"need a first module, a middle one and a head, and depth >= 3; got "
                         f"{measured} modules, middle={middle}, depth={depth}")
    order = [0] + [middle] * (depth - 2) + [measured - 1]
    names = [costs.names[0], *(f"{costs.names[middle]}.{i}" for i in range(depth - 2)),
             costs.names[-1]]
    return replace(costs, names=names, **{key: [getattr(costs, key)[d] for d in order]
                                          for key in costs.PER_MODULE})


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
    replace_atomically(Path(path), lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
