"""A throughput model of the chunked executor across stages (``staged_batched.py``): an event
simulation of exactly its schedule.

The stages are not in lock step: each runs its own sequence of macro-tick actions in
``clock.stage_order`` (1F1B, with one forward more in hand below the top) and waits only for
the input it needs, so the model simulates that order with per-call costs as functions of the
window count (``macro_costs.MacroCosts``): a macro tick's cost is far from proportional to its
ticks, and the stages' shares of a macro tick's work vary over a clip. How close it comes to
measured runs is in docs/benchmarks.md.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

from sideways_cli.engine.clock import BACKWARD, FORWARD, LOSSES, Schedule, macro_ticks, stage_order
from sideways_cli.parallel.balance import partition
from sideways_perf.link import Link
from sideways_perf.macro_costs import MacroCosts
from sideways_perf.throughput_model import Prediction


@dataclass(frozen=True)
class MacroWork:
    """Per network module, what one macro tick asks of it (``ChunkedSideways`` counts): windows
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


def sideways_schedule(modules: int) -> Schedule:
    """Sideways' schedule (stash 0), which does not depend on the modules' windows."""
    return Schedule((1,) * modules)


def macro_work(modules: int, clip_len: int, between_clips: str, chunk: int) -> list[MacroWork]:
    """The macro ticks of one batch as the engine runs them: ``reset`` every batch alike,
    ``continuous`` in steady state (after enough batches that every module has messages).

    The schedule's macro ticks and input split, with the message queues' lengths (the drain's
    extra graph depends on them) replayed as counts instead of tensors.
    """
    if between_clips not in ("reset", "continuous"):
        raise ValueError(f"between_clips must be reset or continuous, got {between_clips!r}")
    batches = 1 if between_clips == "reset" else math.ceil(2 * (modules - 1) / clip_len) + 1
    clock = fed = 0
    pending = [0] * modules  # messages each module holds but has not used
    for _ in range(batches):
        if between_clips == "reset":
            clock, fed, pending = 0, 0, [0] * modules
        fed += clip_len
        end = sideways_schedule(modules).chunked_batch_end(fed, between_clips)
        work = [_one_macro(modules, fed, macro.t0, macro.t1, macro.drain, pending)
                for macro in macro_ticks(clock, end, chunk, between_clips)]
        clock = end
    return work


def _one_macro(modules: int, fed: int, t0: int, t1: int, drain: bool,
               pending: list[int]) -> MacroWork:
    """Ticks [t0, t1): the schedule's split of each module's inputs, then the backward's queue
    updates, top-down (``ChunkedSideways.backward_module``); ``pending`` is updated in place."""
    schedule = sideways_schedule(modules)
    quiet, busy = map(list, zip(*(schedule.split_inputs(g, fed, t0, t1) for g in range(modules))))
    pending[-1] += quiet[-1] + busy[-1]  # every frame reaching the top gives its loss gradient
    drain_graph, sent = [False] * modules, [0] * modules
    for g in reversed(range(modules)):
        pending[g] -= busy[g]
        messages = busy[g]
        if drain and pending[g]:
            pending[g] = 0
            drain_graph[g] = not busy[g]
            messages = max(messages, 1)
        if g > 0:
            sent[g] = messages
            pending[g - 1] += messages
    return MacroWork(quiet, busy, drain_graph, sent)


@dataclass(frozen=True)
class SimulatedOp:
    """One stage's action in the simulated schedule: ``kind`` F (forward of a macro tick),
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
    ops: list[SimulatedOp] = field(default_factory=list, repr=False)


def stage_ops(costs: MacroCosts, modules: range, work: list[MacroWork],
              last: bool) -> dict[tuple[str, int], float]:
    """Seconds of each of one stage's ops, (kind, macro) -> the sum over its modules."""
    durations = {}
    for m, w in enumerate(work):
        durations[FORWARD, m] = sum(costs.quiet(g, w.quiet[g]) + costs.busy(g, w.busy[g])
                                for g in modules)
        durations[BACKWARD, m] = sum(costs.vjp(g, w.busy[g])
                                + (costs.busy(g, 1) + costs.vjp(g, 1)) * w.drain_graph[g]
                                for g in modules)
        if last:
            durations[LOSSES, m] = costs.losses(w.arrivals[-1])
    return durations


def simulate(durations: list[dict[tuple[str, int], float]],
             orders: list[list[tuple[str, int]]],
             hop: Callable[[int, str, int], float | None]) -> list[SimulatedOp]:
    """Run each stage's ops in order, one at a time: an op starts when its stage is free and its
    input has arrived. ``hop(s, kind, m)``: the link time of the input op (s, kind, m) waits for
    from its neighbour (F: stage s-1's F(m); B: stage s+1's B(m)), None if it receives nothing
    (the engine then does not wait). A transfer starts when its producer has ended and its
    receive is posted: at the batch's start, then when the previous one in that direction is
    taken, at the start of the op that took it (``Receives``). Stages advance in turns until all
    are done; a schedule waiting in a cycle raises, which ``clock.stage_order``'s never does."""
    done: dict[tuple[int, str, int], float] = {}
    free, position, ops = [0.0] * len(orders), [0] * len(orders), []
    posted = [{FORWARD: 0.0, BACKWARD: 0.0} for _ in orders]
    while any(p < len(order) for p, order in zip(position, orders)):
        progressed = False
        for s, order in enumerate(orders):
            while position[s] < len(order):
                kind, m = order[position[s]]
                seconds = hop(s, kind, m)
                source = (s - 1 if kind == FORWARD else s + 1, kind, m)
                if seconds is not None and source not in done:
                    break
                ready = 0.0 if seconds is None else max(done[source], posted[s][kind]) + seconds
                start = max(free[s], ready)
                if seconds is not None:
                    posted[s][kind] = start
                free[s] = done[s, kind, m] = start + durations[s][kind, m]
                ops.append(SimulatedOp(s, kind, m, start, free[s], ready))
                position[s] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("the schedule deadlocks")
    return ops


def predict_chunked(costs: MacroCosts, stages: int, link: Link, batch: int, clip_len: int,
                    chunk: int, between_clips: str = "reset", cores: int | None = None,
                    sizes: list[int] | None = None, optimizer: bool = True) -> ChunkedPrediction:
    """Frames/s of the chunked executor: one process (``ChunkedSideways``, uniform macro
    ticks) for ``stages`` = 1, else ``StagedChunked`` (the same macro ticks, 1F1B), each op
    costing its modules' interpolated macro costs and each cross-stage input ``link.hop_s`` of
    its bytes after its producer ends (:func:`simulate`); :func:`batch_seconds` adds each
    stage's optimizer step (if ``optimizer``), the closing all_reduce and, with more stages than
    ``cores``, time slicing as in ``throughput_model.clip_seconds``.

    ``sizes``: modules per stage (default: ``balance.partition`` of the full-chunk macro costs;
    pass the split a run uses to compare with it). ``link``: a fit on idle processes
    (``link.measure_link``), which makes the model optimistic where deliveries wait for busy cores.
    """
    modules = len(costs.names)
    sizes = list(sizes) if sizes is not None else partition(costs.full_s(chunk), stages)
    if len(sizes) != stages or sum(sizes) != modules or min(sizes) < 1:
        raise ValueError(f"stage sizes {sizes} do not split the {modules} modules in {stages}")
    work = macro_work(modules, clip_len, between_clips, chunk)
    ranges = [range(a, b) for a, b in itertools.pairwise(itertools.accumulate(sizes, initial=0))]
    durations = [stage_ops(costs, r, work, s == stages - 1) for s, r in enumerate(ranges)]
    orders = [stage_order(s, stages, len(work)) for s in range(stages)]
    ops = simulate(durations, orders, _hops(costs, ranges, work, link))
    steps = [math.fsum(costs.step_s[g] for g in r) if optimizer else 0.0 for r in ranges]
    seconds = batch_seconds(ops, steps, link, cores)
    ticks = sideways_schedule(modules).chunked_batch_end(clip_len, between_clips)
    return ChunkedPrediction(stages, sizes, ticks, seconds, batch * clip_len / seconds,
                             chunk, len(work), ops)


def batch_seconds(ops: list[SimulatedOp], steps: list[float], link: Link, cores: int | None) -> float:
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
    messages of m, stacked in one tensor each (``StagedChunked._send``)."""

    def arrival(s: int, kind: str, m: int) -> float | None:
        if kind == FORWARD and s > 0:
            g = ranges[s - 1][-1]
            count, nbytes = work[m].arrivals[g], costs.output_bytes[g]
        elif kind == BACKWARD and s < len(ranges) - 1:
            g = ranges[s + 1][0]
            count, nbytes = work[m].sent_down[g], costs.input_bytes[g]
        else:
            return None
        return link.hop_s(count * nbytes) if count else None

    return arrival


def sweep_chunked(costs: MacroCosts, link: Link, batch: int, clip_len: int, chunk: int,
                  between_clips: str = "reset", cores: int | None = None, max_stages: int = 64,
                  concurrent_costs: MacroCosts | None = None) -> list[ChunkedPrediction]:
    """:func:`predict_chunked` for P = 1 .. min(max_stages, modules). ``concurrent_costs``
    (measured with other processes computing, ``measure_macro_costs(concurrent=...)``), when
    given, prices P >= 2, whose stages compute at once; P = 1 computes alone. Stage sizes: the
    partition of each P's own costs at full chunk."""
    return [predict_chunked(costs if p == 1 or concurrent_costs is None else concurrent_costs,
                            p, link, batch, clip_len, chunk, between_clips, cores)
            for p in range(1, min(max_stages, len(costs.names)) + 1)]
