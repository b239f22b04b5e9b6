"""The facts of the Sideways schedule, stated once (docs/sideways.md, "Sideways").

Module g (0-based, of a network of D modules) gets frame f's activation at tick f + g and frame
f's loss gradient at tick f + c_g, counting ticks from when the pipeline started empty: in
Sideways c_g = 2(D-1) - g; with ``sideways.stash: full`` later (:class:`Schedule`). Everything
else follows: which module computes what at which tick, how long a batch takes, how the
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


# -- the whole network's schedule -------------------------------------------------------------

FULL = "full"  # sideways.stash: as much as pairs every message with its own frame, exactly


def parse_stash(stash: int | str) -> int | str:
    """``0`` (Sideways) | ``N`` (inputs kept for N ticks) | ``full``."""
    if stash == FULL or (isinstance(stash, int) and not isinstance(stash, bool) and stash >= 0):
        return stash
    raise ValueError(f"sideways.stash must be 0, a number of ticks N >= 1 or 'full', got {stash!r}")


@dataclass(frozen=True)
class Schedule:
    """When each module of a network gets its gradient messages, and which activation a message
    meets: the facts that depend on the whole network (its windows) and on ``sideways.stash``.

    Module g processes frame f's message at tick f + c_g (:meth:`message_delay`). With stash 0
    or N, messages go down one module per tick as in Sideways, c_g = 2(D-1) - g, and a message
    meets the newest window, or with a stash the window of its own frame when that is at most N
    frames old, else the oldest kept. With ``full`` a module routes each window slot's gradient to
    the frame it belongs to and sends a frame's message once all k_{g+1} windows that read that
    frame have sent theirs, so c_{g-1} = c_g + k_g, c_{D-1} = D-1; every message meets its own
    frame's window and the pseudo-gradient is BP's (docs/sideways.md, "The staleness dial").
    """

    windows: tuple[int, ...]  # every network module's temporal window k_g
    stash: int | str = 0

    def __post_init__(self) -> None:
        parse_stash(self.stash)

    @classmethod
    def of(cls, network, stash: int | str = 0) -> Schedule:
        """The schedule of a whole network (a ``FrameStack``)."""
        return cls(tuple(network.windows), stash)

    @property
    def modules(self) -> int:
        return len(self.windows)

    @property
    def routes(self) -> bool:
        """Whether window slots' gradients go to their own frames (``full``) or are summed into
        the newest's (Sideways' rule, under smoothness every slot stands for the same input)."""
        return self.stash == FULL

    @property
    def pairs(self) -> bool:
        """Whether a message may meet a window older than the newest: any stash but 0."""
        return self.stash != 0

    def message_delay(self, g: int) -> int:
        """c_g: frame f's message reaches module g at tick f + c_g."""
        if self.routes:
            return self.modules - 1 + sum(self.windows[g + 1:])
        return 2 * (self.modules - 1) - g

    def message_ticks(self, g: int, fed: int) -> range:
        """The ticks at which module g holds a gradient message, ``fed`` frames after the pipeline
        started empty: the gradients need D-1 ticks up and the rest down before they reach it."""
        first = self.message_delay(g)
        return range(first, first + fed)

    def message_frame(self, g: int, tick: int) -> int:
        """The frame whose loss gradient reaches module g at ``tick``."""
        return tick - self.message_delay(g)

    def stash_depth(self, g: int) -> int:
        """How many frames older than its newest input module g pairs a message with at most:
        the message's age (c_g - g), capped at the stash."""
        age = self.message_delay(g) - g
        return age if self.stash == FULL else min(self.stash, age)

    def paired_frame(self, g: int, tick: int, fed: int) -> int:
        """The frame whose window meets module g's message at ``tick``: the message's own frame
        when kept, else the oldest kept; without a stash, the newest (in ``reset`` the drain
        keeps the last frame's window, fed - 1). It never moves back: a message's own frame only
        grows, and so does the newest input, so no later message meets an older window."""
        return max(self.message_frame(g, tick), self.newest_input(g, tick, fed) - self.stash_depth(g))

    @staticmethod
    def newest_input(g: int, tick: int, fed: int) -> int:
        """The newest frame module g has an input of at ``tick``."""
        return min(tick - g, fed - 1)

    def batch_ticks(self, frames: int, between_clips: str) -> int:
        """Ticks the tick rule spends on a batch of ``frames``: in ``reset`` the pipeline fills and
        drains around it, until the last frame's gradient has reached module 1 (2(D-1) ticks in
        Sideways, sum of k_g over g >= 2 more with ``full``); ``continuous`` goes on into the next
        batch."""
        return frames + (self.message_delay(0) if between_clips == "reset" else 0)

    def drain_ticks(self, g: int, fed: int) -> int:
        """In ``reset``, the ticks after module g's last input at which it still gets messages."""
        return min(fed, self.message_delay(g) - g)

    def chunked_batch_end(self, fed: int, between_clips: str) -> int:
        """The clock after the chunked executor's batch: macro ticks run while some module still
        gets a new input (the top's last comes D-1 ticks after the last frame; without a stash
        the drain's messages fold into the last macro tick, with one they run to module 1's last
        message); ``continuous`` stops with the last frame."""
        if between_clips != "reset":
            return fed
        return fed + (self.message_delay(0) if self.pairs else self.modules - 1)

    def split_inputs(self, g: int, fed: int, t0: int, t1: int) -> tuple[int, int]:
        """How many of module g's inputs arriving in [t0, t1) meet no message at their arrival
        (quiet: no graph is needed then), and how many meet one (busy), in that order: messages
        start later than inputs. With a stash every input is quiet: messages build their graphs
        from the stash when they come."""
        arriving = arrivals(g, fed, t0, t1)
        if self.pairs:
            return len(arriving), 0
        quiet = len(range(arriving.start, min(arriving.stop, self.message_delay(g))))
        return quiet, len(arriving) - quiet

    def messages_sent(self, g: int, fed: int, macro: MacroTick) -> int:
        """How many messages module g sends below in a macro tick. With a stash: one per tick of
        it after which module g-1 holds a message. Without: one per busy tick, or in the drain,
        with none busy, one for the summed drain messages, which every module but the head has
        (``ChunkedSideways.backward_module``)."""
        if self.pairs:
            return len(intersect(self.message_ticks(g - 1, fed), range(macro.t0 + 1, macro.t1 + 1)))
        busy = self.split_inputs(g, fed, macro.t0, macro.t1)[1]
        return busy or int(macro.drain and g < self.modules - 1)


def intersect(a: range, b: range) -> range:
    return range(max(a.start, b.start), min(a.stop, b.stop))


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
