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

The chunked executor (``staged_batched.py``, :func:`predict_chunked`) is not in lock step: each
stage runs its own sequence of macro-tick operations in the 1F1B order (with one forward more
in hand below the top) and waits only for the input it needs, so the model is an event
simulation of exactly that schedule, with per-call costs as functions of the window count
(``balance.MacroCosts``): a macro tick's cost is far from proportional to its ticks, and the
stages' shares of a macro tick's work vary over a clip. Checked on 2 CPU cores against runs
minutes after the costs were measured: one process within -3..+6%, two stages +3..+11% with
costs measured alone and -1..+11% with costs measured concurrently (the default for P >= 2). The 2-stage runs wait longer than
the model for some transfers: with the link fitted on idle processes (alpha ~0.1 ms) the model
lets an input arrive 0.1-0.3 ms after its producer ends; timed in the runs, some arrived 2-9 ms
later, both directions at once (a delivery that waits for gloo's IO thread to be scheduled or
for the receiver's own next send). An effective alpha of 1-2 ms closed that gap there.
"""

from __future__ import annotations

import itertools
import json
import math
import socket
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing

from sideways_cli.atomic import replace_atomically
from sideways_cli.distributed.balance import MacroCosts, ModuleCosts, partition
from sideways_cli.distributed.staged_batched import forwards_ahead
from sideways_cli.engine.sideways_batched import uniform

CostsT = TypeVar("CostsT", ModuleCosts, MacroCosts)


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


# --- the chunked executor (staged_batched.py): macro ticks in a 1F1B schedule, event-simulated ---


@dataclass(frozen=True)
class MacroWork:
    """Per network module, what one macro tick asks of it (``TickBatchedSideways`` counts): windows
    forwarded without a graph (``quiet``) and with one (``busy``, each then one message's VJP),
    whether the drain adds a one-window graph and VJP (``drain_graph``: no busy window left but
    drain messages pending), and messages sent to the module below (``sent_down``)."""

    quiet: list[int]
    busy: list[int]
    drain_graph: list[bool]
    sent_down: list[int]

    @property
    def arrivals(self) -> list[int]:
        """Each module's new inputs, i.e. the outputs it sends up."""
        return [q + b for q, b in zip(self.quiet, self.busy)]


def macro_work(depth: int, clip_len: int, pipeline: str, chunk: int) -> list[MacroWork]:
    """The macro ticks of one batch as the engine runs them: ``reset`` every batch alike,
    ``continuous`` in steady state (after enough batches that every module has messages).

    Replays ``TickBatchedSideways.start_batch``/``split_inputs`` and the message queues'
    lengths (the drain's extra graph depends on them), with counts instead of tensors.
    """
    if pipeline not in ("reset", "continuous"):
        raise ValueError(f"pipeline must be reset or continuous, got {pipeline!r}")
    batches = 1 if pipeline == "reset" else math.ceil(2 * (depth - 1) / clip_len) + 1
    clock = fed = 0
    mailbox = [0] * depth  # messages each module holds but has not used
    for _ in range(batches):
        if pipeline == "reset":
            clock, fed, mailbox = 0, 0, [0] * depth
        fed += clip_len
        end = fed + (depth - 1 if pipeline == "reset" else 0)
        sizes = uniform(end - clock, chunk)
        bounds = list(itertools.accumulate(sizes, initial=clock))
        work = [_one_macro(depth, fed, t0, t1, pipeline == "reset" and t1 == end, mailbox)
                for t0, t1 in zip(bounds, bounds[1:])]
        clock = end
    return work


def _one_macro(depth: int, fed: int, t0: int, t1: int, drain: bool,
               mailbox: list[int]) -> MacroWork:
    """Ticks [t0, t1): ``split_inputs`` per module, then the backward's queue updates, top-down
    (``backward_module``); ``mailbox`` is updated in place."""
    quiet, busy = [], []
    for g in range(depth):
        arriving = range(max(t0, g), min(t1, g + fed))
        first_message = 2 * (depth - 1) - g
        quiet.append(len(range(arriving.start, min(arriving.stop, first_message))))
        busy.append(len(arriving) - quiet[-1])
    mailbox[-1] += quiet[-1] + busy[-1]  # every frame reaching the top gives its loss gradient
    drain_graph, sent = [False] * depth, [0] * depth
    for g in reversed(range(depth)):
        mailbox[g] -= busy[g]
        messages = busy[g]
        if drain and mailbox[g]:
            mailbox[g] = 0
            drain_graph[g] = not busy[g]
            messages = max(messages, 1)
        if g > 0:
            sent[g] = messages
            mailbox[g - 1] += messages
    return MacroWork(quiet, busy, drain_graph, sent)


@dataclass(frozen=True)
class Op:
    """One stage's operation in the simulated schedule: ``kind`` F (forward of a macro tick),
    L (the frame losses, last stage) or B (backward), ``start``/``end`` seconds into the batch;
    ``ready``: when its input from the neighbouring stage had arrived (0 if it needs none)."""

    stage: int
    kind: str
    macro: int
    start: float
    end: float
    ready: float = 0.0


@dataclass(frozen=True)
class ChunkedPrediction(Prediction):
    """A :class:`Prediction` (``ticks``: per batch) with the macro ticks and the simulated ops."""

    chunk: int = 1
    macros: int = 0
    ops: list[Op] = field(default_factory=list, repr=False)


def stage_ops(costs: MacroCosts, modules: range, work: list[MacroWork],
              last: bool) -> dict[tuple[str, int], float]:
    """Seconds of each of one stage's ops, (kind, macro) -> the sum over its modules."""
    durations = {}
    for m, w in enumerate(work):
        durations["F", m] = sum(costs.quiet(g, w.quiet[g]) + costs.busy(g, w.busy[g])
                                for g in modules)
        durations["B", m] = sum(costs.vjp(g, w.busy[g])
                                + (costs.busy(g, 1) + costs.vjp(g, 1)) * w.drain_graph[g]
                                for g in modules)
        if last:
            durations["L", m] = costs.losses(w.arrivals[-1])
    return durations


def stage_order(stage: int, stages: int, macros: int, last: bool) -> list[tuple[str, int]]:
    """Stage ``stage``'s op order (``StagedTickBatched.train_batch``): its forwards ahead
    (:func:`forwards_ahead`), then per macro tick m the forward of m + ahead, the losses (last
    stage) and the backward of m."""
    ahead = forwards_ahead(stage, stages, macros)
    order = [("F", m) for m in range(ahead)]
    for m in range(macros):
        if m + ahead < macros:
            order.append(("F", m + ahead))
        if last:
            order.append(("L", m))
        order.append(("B", m))
    return order


def simulate(durations: list[dict[tuple[str, int], float]],
             orders: list[list[tuple[str, int]]],
             hop: Callable[[int, str, int], float | None]) -> list[Op]:
    """Run each stage's ops in order, one at a time: an op starts when its stage is free and its
    input has arrived. ``hop(s, kind, m)``: the link time of the input op (s, kind, m) waits for
    from its neighbour (F: stage s-1's F(m); B: stage s+1's B(m)), None if it receives nothing
    (the engine then does not wait). A transfer starts when its producer has ended and its
    receive is posted: at the batch's start, then when the previous one in that direction is
    taken, at the start of the op that took it (``Receives``). Stages advance in turns until all
    are done; a schedule waiting in a cycle raises, which :func:`stage_order`'s never does."""
    done: dict[tuple[int, str, int], float] = {}
    free, position, ops = [0.0] * len(orders), [0] * len(orders), []
    posted = [{"F": 0.0, "B": 0.0} for _ in orders]
    while any(p < len(order) for p, order in zip(position, orders)):
        progressed = False
        for s, order in enumerate(orders):
            while position[s] < len(order):
                kind, m = order[position[s]]
                seconds = hop(s, kind, m)
                source = (s - 1 if kind == "F" else s + 1, kind, m)
                if seconds is not None and source not in done:
                    break
                ready = 0.0 if seconds is None else max(done[source], posted[s][kind]) + seconds
                start = max(free[s], ready)
                if seconds is not None:
                    posted[s][kind] = start
                free[s] = done[s, kind, m] = start + durations[s][kind, m]
                ops.append(Op(s, kind, m, start, free[s], ready))
                position[s] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("the schedule deadlocks")
    return ops


def predict_chunked(costs: MacroCosts, stages: int, link: Link, batch: int, clip_len: int,
                    chunk: int, pipeline: str = "reset", cores: int | None = None,
                    sizes: list[int] | None = None, optimizer: bool = True) -> ChunkedPrediction:
    """Frames/s of the chunked executor: one process (``TickBatchedSideways``, uniform macro
    ticks) for ``stages`` = 1, else ``StagedTickBatched`` (the same macro ticks, 1F1B), each op
    costing its modules' interpolated macro costs and each cross-stage input ``link.hop_s`` of
    its bytes after its producer ends (:func:`simulate`); :func:`batch_seconds` adds each
    stage's optimizer step (if ``optimizer``), the closing all_reduce and, with more stages than
    ``cores``, time slicing as in :func:`clip_seconds`.

    ``sizes``: modules per stage (default: :func:`partition` of the full-chunk macro costs; pass
    the split a run uses to compare with it). ``link``: a fit on idle processes
    (:func:`measure_link`) makes two stages on 2 CPU cores 0-10% optimistic (module docstring).
    """
    depth = len(costs.names)
    sizes = list(sizes) if sizes is not None else partition(costs.full_s(chunk), stages)
    if len(sizes) != stages or sum(sizes) != depth or min(sizes) < 1:
        raise ValueError(f"stage sizes {sizes} do not split the {depth} modules in {stages}")
    work = macro_work(depth, clip_len, pipeline, chunk)
    ranges = [range(a, b) for a, b in itertools.pairwise(itertools.accumulate(sizes, initial=0))]
    durations = [stage_ops(costs, r, work, s == stages - 1) for s, r in enumerate(ranges)]
    orders = [stage_order(s, stages, len(work), s == stages - 1) for s in range(stages)]
    ops = simulate(durations, orders, _hops(costs, ranges, work, link))
    steps = [math.fsum(costs.step_s[g] for g in r) if optimizer else 0.0 for r in ranges]
    seconds = batch_seconds(ops, steps, link, cores)
    ticks = clip_len + (depth - 1 if pipeline == "reset" else 0)
    return ChunkedPrediction(stages, sizes, ticks, seconds, batch * clip_len / seconds,
                             chunk, len(work), ops)


def batch_seconds(ops: list[Op], steps: list[float], link: Link, cores: int | None) -> float:
    """A batch ends when every stage has stepped its optimizer (``steps``: seconds per stage)
    after its last op, then one all_reduce of the losses (latency ``link.alpha``; none for one
    process). More stages than ``cores`` take turns: at least all the work over the cores."""
    stages = len(steps)
    ends = [max(op.end for op in ops if op.stage == s) for s in range(stages)]
    reduce = link.alpha if stages > 1 else 0.0
    seconds = max(end + step for end, step in zip(ends, steps)) + reduce
    if cores is not None and cores < stages:
        work = math.fsum(op.end - op.start for op in ops) + math.fsum(steps)
        seconds = max(seconds, work / cores + reduce)
    return seconds


def _hops(costs: MacroCosts, ranges: list[range], work: list[MacroWork],
          link: Link) -> Callable[[int, str, int], float | None]:
    """The link time of each op's input from its neighbour stage, None where none is sent:
    F(m) on stage s gets stage s-1's top module's outputs of m, B(m) stage s+1's bottom module's
    messages of m, stacked in one tensor each (``StagedTickBatched._send``)."""

    def arrival(s: int, kind: str, m: int) -> float | None:
        if kind == "F" and s > 0:
            g = ranges[s - 1][-1]
            count, nbytes = work[m].arrivals[g], costs.output_bytes[g]
        elif kind == "B" and s < len(ranges) - 1:
            g = ranges[s + 1][0]
            count, nbytes = work[m].sent_down[g], costs.input_bytes[g]
        else:
            return None
        return link.hop_s(count * nbytes) if count else None

    return arrival


def sweep_chunked(costs: MacroCosts, link: Link, batch: int, clip_len: int, chunk: int,
                  pipeline: str = "reset", cores: int | None = None, max_stages: int = 64,
                  concurrent_costs: MacroCosts | None = None) -> list[ChunkedPrediction]:
    """:func:`predict_chunked` for P = 1 .. min(max_stages, modules). ``concurrent_costs``
    (measured with other processes computing, ``measure_macro_costs(concurrent=...)``), when
    given, prices P >= 2, whose stages compute at once; P = 1 computes alone. Stage sizes: the
    partition of each P's own costs at full chunk."""
    return [predict_chunked(costs if p == 1 or concurrent_costs is None else concurrent_costs,
                            p, link, batch, clip_len, chunk, pipeline, cores)
            for p in range(1, min(max_stages, len(costs.names)) + 1)]
