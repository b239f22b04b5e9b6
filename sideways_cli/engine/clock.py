"""The facts of the Sideways schedule, stated once (docs/sideways.md, "Sideways").

Module g (0-based, of a network of D modules) gets frame f's activation at tick f + g and frame
f's loss gradient at tick f + 2(D-1) - g, counting ticks from when the pipeline started empty.
Everything else follows: which module computes what at which tick, how long a batch takes, how the
chunked executor cuts a batch into macro ticks and what each module does in one, the order in
which pipeline stages run their macro ticks, which executor runs, and how each keeps its
registers in a checkpoint. The executors, the stage protocols, the balancer, the throughput model
and the fidelity probe all read them here.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

BETWEEN_CLIPS = ("reset", "continuous")
_EVERY = re.compile(r"every\s+(\d+)\s+ticks?")


def parse_update(update: str) -> int | None:
    """``clip`` -> None (step once per batch); ``every N ticks`` -> N."""
    if update == "clip":
        return None
    match = _EVERY.fullmatch(update.strip())
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"sideways.update must be 'clip' or 'every N ticks' (N >= 1), got {update!r}")
    return int(match.group(1))


# -- one tick at a time ---------------------------------------------------------------------------

def input_ticks(g: int, fed: int) -> range:
    """The ticks at which module g gets a new input, ``fed`` frames after the pipeline started."""
    return range(g, g + fed)


def message_ticks(g: int, modules: int, fed: int) -> range:
    """The ticks at which module g (of ``modules``) holds a gradient message: the gradients need
    D-1 ticks up and D-1-g down before they reach it."""
    first = 2 * (modules - 1) - g
    return range(first, first + fed)


def message_frame(g: int, tick: int, modules: int) -> int:
    """The frame whose loss gradient reaches module g at ``tick``; its activation there is of
    frame tick - g, 2(D-1-g) frames newer (the mismatch Sideways accepts)."""
    return tick - 2 * (modules - 1) + g


def batch_ticks(frames: int, modules: int, between_clips: str) -> int:
    """Ticks the tick rule spends on a batch of ``frames``: in ``reset`` the pipeline fills and
    drains around it, until the last frame's gradient has reached module 1; ``continuous`` goes
    on into the next batch."""
    return frames + (2 * (modules - 1) if between_clips == "reset" else 0)


def drain_ticks(g: int, modules: int, fed: int) -> int:
    """In ``reset``, the ticks after module g's last input at which it still gets messages."""
    return min(fed, 2 * (modules - 1 - g))


# -- macro ticks: the chunked executor ----------------------------------------------------------

@dataclass(frozen=True)
class MacroTick:
    """Ticks [t0, t1); ``drain``: the last macro tick of a ``reset`` batch, which takes the drain."""

    t0: int
    t1: int
    drain: bool


def runs_chunked(update: str, chunk: int) -> bool:
    """Whether Sideways runs the chunked executor: weights fixed within a batch, chunk > 1."""
    return update == "clip" and chunk > 1


def register_layout(update: str, chunk: int) -> str:
    """How an executor keeps its registers in a checkpoint: ``pipeline`` (the tick rule) or
    ``registers`` (the chunked executor); a staged run's shards reassemble into the same."""
    return "registers" if runs_chunked(update, chunk) else "pipeline"


def uniform(ticks: int, chunk: int) -> list[int]:
    """Macro tick sizes, ``chunk`` each but the first (the remainder)."""
    return ([ticks % chunk] if ticks % chunk else []) + [chunk] * (ticks // chunk)


def chunked_batch_end(fed: int, modules: int, between_clips: str) -> int:
    """The clock after the chunked executor's batch: macro ticks run while some module still gets
    a new input (the top's last comes D-1 ticks after the last frame; the drain's messages fold
    into the last macro tick); ``continuous`` stops with the last frame."""
    return fed + (modules - 1 if between_clips == "reset" else 0)


def macro_ticks(clock: int, end: int, chunk: int, between_clips: str) -> list[MacroTick]:
    """The macro ticks of [clock, end), counted back from the end so that the last one holds
    every module's last input when chunk >= D. Any cut gives the same numbers."""
    bounds = list(itertools.accumulate(uniform(end - clock, chunk), initial=clock))
    return [MacroTick(t0, t1, between_clips == "reset" and t1 == end)
            for t0, t1 in zip(bounds, bounds[1:])]


def arrivals(g: int, fed: int, t0: int, t1: int) -> range:
    """The ticks of [t0, t1) at which module g gets a new input."""
    ticks = input_ticks(g, fed)
    return range(max(t0, ticks.start), min(t1, ticks.stop))


def split_inputs(g: int, modules: int, fed: int, t0: int, t1: int) -> tuple[int, int]:
    """How many of module g's inputs arriving in [t0, t1) meet no message (quiet: no graph is
    needed), and how many meet one (busy), in that order: messages start later than inputs."""
    arriving = arrivals(g, fed, t0, t1)
    first_message = message_ticks(g, modules, fed).start
    quiet = len(range(arriving.start, min(arriving.stop, first_message)))
    return quiet, len(arriving) - quiet


def messages_sent(busy: int, macro: MacroTick, g: int, modules: int) -> int:
    """How many messages module g sends below in a macro tick: one per busy tick, or in the
    drain, with none busy, one for the summed drain messages, which every module but the head
    has (``ChunkedSideways.backward_module``)."""
    return busy or int(macro.drain and g < modules - 1)


# -- stages: the 1F1B order of macro ticks ---------------------------------------------------------

def forwards_ahead(stage: int, stages: int, macros: int) -> int:
    """How many forwards a stage runs before its first backward: one more than 1F1B's P-1-s below
    the top stage. Over a clip the stages' shares of the work vary from macro tick to macro tick
    (in ``reset`` the lower stages forward early and take their messages late); the spare
    forward in hand keeps a lower stage busy while the one above runs a longer backward. It costs
    one macro tick of graphs more, whatever the clip length."""
    return min(0 if stage == stages - 1 else stages - stage, macros)


FORWARD, LOSSES, BACKWARD = "F", "L", "B"


def stage_order(stage: int, stages: int, macros: int) -> list[tuple[str, int]]:
    """A stage's actions for a batch of ``macros`` macro ticks, in order: its forwards ahead, then
    per macro tick m the forward of m + ahead, the frame losses (the last stage) and the backward
    of m. The stages run it (``StagedChunked``) and the throughput model simulates it."""
    ahead = forwards_ahead(stage, stages, macros)
    order = [(FORWARD, m) for m in range(ahead)]
    for m in range(macros):
        if m + ahead < macros:
            order.append((FORWARD, m + ahead))
        if stage == stages - 1:
            order.append((LOSSES, m))
        order.append((BACKWARD, m))
    return order
