"""Sideways run a macro tick at a time: the rule of ``sideways.py``, executed in larger batches.

This is a second execution strategy of :class:`~sideways_cli.engine.sideways.SidewaysRule`, not a
variant of the rule: it gives the same pseudo-gradients, losses and update, to float64 round-off,
and the same message at every tick (only the drain's, see below, are formed as their sum).
``tests/test_sideways_chunked.py`` checks this for every model of the zoo, several chunk sizes,
clip lengths and both settings of sideways.between_clips. Read ``sideways.py`` first: it is the definition.

Why it may batch: with ``update: clip`` the weights are fixed for the whole batch, so module d's
work at tick t depends only on module d-1's outputs at earlier ticks (forward) and on the message
module d+1 sent at tick t-1 (backward). Over a macro tick of ``chunk`` ticks [t0, t1) therefore:

1. forward, bottom-up: each module computes the windows of all its inputs arriving in [t0, t1) in
   one call, over the time sequence they slide along (a causal module's outputs over a sequence
   are exactly its windows' outputs);
2. the losses of the frames that reached the top in [t0, t1) give the top module's messages;
3. backward, top-down: each module takes one vector-Jacobian product over the windows its messages
   of [t0, t1) meet, so that every tick sends its own message to the module below. The parameter
   gradient may sum over ticks, the messages may not (a sequence VJP would mix them): generic
   modules take one batch entry per window; a module whose only temporal mixing is a first
   convolution takes the sequence VJP down to that convolution's output, and each tick's message is
   then one 2D transposed convolution with the kernel's temporal taps summed (the sum over the
   window's slots that the rule asks for), k times cheaper than BP's exact input gradient.

Per-tick convolutions at batch B are small; C ticks at once make them C times larger, which is what
CPU kernels need. What crosses a macro-tick boundary (a module's newest output, its newest message)
waits in a queue, as on the wire between two pipeline stages. Memory is O(D x chunk) windows and
graphs, independent of the clip length.

The drain (``between_clips: reset``, the ticks after a module's last input) is where the tick rule
repeats itself: each tick the module meets a new message with the same last window, and all that
its drain messages feed is draining too (windows fixed), so linear in them. The sum of a module's
drain messages therefore gives the same pseudo-gradient as one VJP per tick, and sends the module
below the sum of the messages it would have sent. The last macro tick adds that sum to the message
of the module's last busy window (the last window), so the drain costs almost nothing.
"""

from __future__ import annotations

import itertools
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from sideways_cli.engine.clock import (BACKWARD, FORWARD, MacroTick, Schedule, intersect,
                                       macro_ticks, parse_update, stage_order)
from sideways_cli.engine.losses import CLASSIFY, Objective, at_least_fp32
from sideways_cli.engine.registers import Token, WindowRegister, clip_tokens
from sideways_cli.engine.rule import ApplyUpdate, BatchStats, LossSum
from sideways_cli.engine.sideways import SidewaysExecutor
from sideways_cli.models import FrameStack
from sideways_cli.support.runtime import Autocast


@dataclass
class Graph:
    """A module's forward at the n windows that messages meet (ticks in order), for its VJP.

    Generic modules: one batch entry per window, ``windows`` [n*B, C, k, ...] tick-major (a leaf
    requiring grad above module 1) and ``output`` [n*B, C', ...]. Modules whose only temporal mixing
    is a first convolution (:meth:`FrameModule.first_conv`) run it over the time sequence instead,
    without copying each window: ``conv_out`` [B, C', n, ...] and ``newest`` [B, C, n, ...] (the
    windows' newest inputs, a leaf above module 1) feed ``output`` [B, C', n, ...].
    """

    output: torch.Tensor
    filled: list[int]  # per tick: how many of the window's newest slots hold a value
    windows: torch.Tensor | None = None
    conv_out: torch.Tensor | None = None
    newest: torch.Tensor | None = None


class ChunkedSideways(SidewaysExecutor):
    """:class:`SidewaysRule` with ``update: clip``, each module doing ``chunk`` ticks per call.

    ``chunk`` trades memory for larger, more efficient kernels: a macro tick holds every module's
    graph over up to ``chunk`` windows, chunk times the tick rule's. The peak reaches that bound
    once clips are longer than about 2(D-1) + chunk frames and never exceeds it, whatever the clip
    length. Every chunk >= 1 gives the same numbers. ``update: every N ticks`` changes the weights
    inside a macro tick and is refused with ValueError: :class:`SidewaysRule` runs it.

    As :class:`SidewaysRule`, it may run one stage of a network split across processes (``first``,
    ``schedule``: the network index of its first module and the whole network's schedule):
    the stage then feeds its bottom module the stage below's outputs (:meth:`feed_inputs`) and its
    top module the stage above's messages (:meth:`feed_messages`), and hands the links its top
    module's outputs (:meth:`take_outputs`) and its bottom module's messages
    (:meth:`take_sent_down`): ``parallel/staged_chunked.py``.
    """

    def __init__(self, model: FrameStack, between_clips: str = "reset", update: str = "clip",
                 chunk: int = 8, objective: Objective = CLASSIFY, autocast: Autocast = nullcontext,
                 first: int = 0, schedule: Schedule | None = None):
        super().__init__(model, between_clips, objective, autocast, first, schedule)
        if parse_update(update) is not None:
            raise ValueError(f"tick batching needs weights fixed within a batch (update: clip), "
                             f"got {update!r}; SidewaysRule runs it")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.chunk = chunk
        self.reset()

    def reset(self) -> None:
        """Empty the pipeline: no activation or message survives into the next clip."""
        size = len(self.model)
        self.registers = [WindowRegister(k, self.schedule.pairs) for k in self.model.windows]
        for routed in self.routed:
            routed.clear()
        # pending_inputs[d]: inputs module d has not consumed yet ([0]: the clip's frames or the
        # stage below's outputs; [-1]: the top's outputs, logits on their way to the loss or
        # activations for the stage above); pending_messages[d]: messages module d has not used yet
        self.pending_inputs: list[deque[Token]] = [deque() for _ in range(size + 1)]
        self.pending_messages: list[deque[torch.Tensor]] = [deque() for _ in range(size)]
        self.sent_down: list[torch.Tensor] = []  # a stage's bottom messages, for the stage below
        self.clock = 0  # ticks since the pipeline started empty
        self.fed = 0  # frames fed since then

    def train_batch(self, clips: torch.Tensor, labels: torch.Tensor,
                    apply_update: ApplyUpdate) -> BatchStats:
        """Same ticks, losses, update as :meth:`SidewaysRule.train_batch`, ``chunk`` at a time."""
        macros = self.start_batch(clips.shape[2])
        self.feed_inputs(clip_tokens(clips, self.objective.frame_targets(clips, labels),
                                     first_frame=self.fed - clips.shape[2]))
        losses, graphs = LossSum(), {}
        for action, m in stage_order(0, 1, len(macros)):  # one stage: forward, losses, backward
            if action == FORWARD:
                graphs[m] = self.forward_macro(macros[m])
            elif action == BACKWARD:
                self.backward_macro(macros[m], graphs.pop(m))
            else:
                losses.add(*self.frame_losses())
        return BatchStats(losses, clips.shape[0] * clips.shape[2], self.flush(apply_update))

    def start_batch(self, frames: int) -> list[MacroTick]:
        """Take ``frames`` more frames (emptying the pipeline first in ``reset`` mode) and return
        the macro ticks that process them, in order (``clock.macro_ticks``); the clock moves
        past them."""
        if self.between_clips == "reset":
            self.reset()
        self.fed += frames
        end = self.schedule.chunked_batch_end(self.fed, self.between_clips)
        macros = macro_ticks(self.clock, end, self.chunk, self.between_clips)
        self.clock = end
        return macros

    def forward_macro(self, macro: MacroTick) -> list[Graph | None]:
        """Every module's forwards of ticks [t0, t1), bottom-up; the graphs their messages meet."""
        return [self.forward_module(d, *self.split_inputs(d, macro)) for d in range(len(self.model))]

    def backward_macro(self, macro: MacroTick, graphs: list[Graph | None]) -> None:
        """Every module's messages of ticks [t0, t1) (and the drain), top-down."""
        for d in reversed(range(len(self.model))):
            if self.schedule.pairs:
                self.backward_stashed(d, macro)
            else:
                self.backward_module(d, self.split_inputs(d, macro)[1], graphs[d], macro.drain)

    def split_inputs(self, d: int, macro: MacroTick) -> tuple[int, int]:
        """Module d's inputs in ``macro`` that meet no message (quiet), and those that meet one."""
        return self.schedule.split_inputs(self.first + d, self.fed, macro.t0, macro.t1)

    # -- what crosses a stage's boundaries (parallel/staged_chunked.py) -----------------------

    def feed_inputs(self, tokens: Iterable[Token]) -> None:
        """The bottom module's next inputs: a clip's frames, or the stage below's outputs."""
        self.pending_inputs[0].extend(tokens)

    def take_outputs(self) -> list[torch.Tensor]:
        """The top module's outputs since the last call: the stage above's inputs."""
        outputs = [token.value for token in self.pending_inputs[-1]]
        self.pending_inputs[-1].clear()
        return outputs

    def feed_messages(self, messages: Iterable[torch.Tensor]) -> None:
        """The top module's next messages, from the stage above."""
        self.pending_messages[-1].extend(messages)

    def take_sent_down(self) -> list[torch.Tensor]:
        """The bottom module's messages since the last call, for the stage below."""
        sent, self.sent_down = self.sent_down, []
        return sent

    def forward_module(self, d: int, quiet: int, busy: int) -> Graph | None:
        """Module d's outputs for its new inputs, sent up; the graph at the ``busy`` windows."""
        arrivals = [self.pending_inputs[d].popleft() for _ in range(quiet + busy)]
        if not arrivals:
            return None
        sequence, filled = advance(self.registers[d], arrivals)
        k = self.model[d].window
        values: list[torch.Tensor] = []
        if quiet:
            with torch.no_grad(), self.autocast():  # no message will meet these windows: no graph
                # a causal module over a time sequence computes exactly its windows' outputs
                values += self.model[d].valid(sequence[:k - 1 + quiet].movedim(0, 2)).unbind(2)
        graph = None
        if busy:
            graph = self.graph(d, sequence[quiet:], filled[quiet:])
            output = graph.output.detach()
            values += output.unbind(2) if graph.windows is None else output.split(len(output) // busy)
        self.pending_inputs[d + 1].extend(Token(v, a.frame, a.target) for v, a in zip(values, arrivals))
        return graph

    def graph(self, d: int, sequence: torch.Tensor, filled: list[int]) -> Graph:
        """Module d's forward at the windows of ``sequence`` ([k-1+n, B, C, ...], time first), with
        the graph its VJP needs (module 1: weights only)."""
        module = self.model[d]
        k, conv = module.window, module.first_conv()
        if k > 1 and conv is not None:
            frames = sequence.detach().movedim(0, 2)
            newest = frames[:, :, k - 1:].detach().requires_grad_(self.sends_message(d))
            with self.autocast():
                conv_out = conv(frames)
                output = module.after_conv(conv_out, newest)
            return Graph(output, filled, conv_out=conv_out, newest=newest)
        windows = sequence.unfold(0, k, 1).movedim(-1, 3).flatten(0, 1)  # [n*B, C, k, ...]
        windows = windows.detach().requires_grad_(self.sends_message(d))
        with self.autocast():
            output = module.forward_window(windows)
        return Graph(output, filled, windows=windows)

    def frame_losses(self) -> tuple[torch.Tensor, int]:
        """Sum and count of the losses of the frames that reached the top in this macro tick; the
        sum a detached 0-dim tensor on the device (reading it would wait for the macro tick's
        kernels), a CPU zero when none did (a 0-dim CPU tensor adds to one on any device).

        Their gradients are the top module's messages. A frame loss is a mean over the batch, so
        over n ticks stacked into one batch it is the mean of their n losses: times n, their sum,
        whose gradient at each tick's logits is that tick's own, in one call instead of n.
        """
        tokens = list(self.pending_inputs[-1])
        self.pending_inputs[-1].clear()
        if not tokens:
            return torch.zeros(()), 0
        # a graph of its own: the top module's graph is used once, by its backward
        logits = torch.cat([token.value for token in tokens]).requires_grad_(True)
        targets = torch.cat([token.target for token in tokens])
        # the gradient comes back in the logits' own dtype (bf16 under AMP)
        total = self.objective.frame_loss(at_least_fp32(logits), targets) * len(tokens)
        (grads,) = torch.autograd.grad(total, logits)
        self.pending_messages[-1].extend(grads.split(len(tokens[0].value)))
        return total.detach(), len(tokens)

    def backward_module(self, d: int, busy: int, graph: Graph | None, drain: bool) -> None:
        """Module d's messages at its busy ticks in one VJP; the module below gets one per tick.

        With ``drain`` (the last macro tick of a reset batch) also every message still to come:
        they all meet the module's last window, and all they feed below is draining too (windows
        fixed), so linear in them. Their sum then stands for them, in the same VJP: added to the
        last busy tick's message, whose window is the last one, or at that window alone.
        """
        pending = self.pending_messages[d]
        messages = [pending.popleft() for _ in range(busy)]
        count = busy
        if drain and pending:
            drained = torch.stack(list(pending)).sum(dim=0)
            pending.clear()
            count += self.schedule.drain_ticks(self.first + d, self.fed)
            if graph is None:
                register = self.registers[d]
                graph = self.graph(d, register.tensor().movedim(2, 0), [register.filled])
                messages = [drained]
            else:
                messages[-1] = messages[-1] + drained
        if not messages:
            return
        below = self.vjp(d, graph, messages, count)
        if below is not None:  # messages sent into the drain below wait there, to be summed
            (self.pending_messages[d - 1] if d > 0 else self.sent_down).extend(below)

    def backward_stashed(self, d: int, macro: MacroTick) -> None:
        """With a stash: module d's messages of ticks [t0, t1), each at the window of the frame it
        is paired with (``Schedule.paired_frame``), recomputed from the kept inputs: a second
        forward of those windows, rather than keeping every graph until its message comes (a
        graph holds several times its inputs). ``full`` (:meth:`backward_routed`) sends the
        module below the frames whose messages are complete, as scheduled; a stash of N ticks
        (:meth:`backward_paired`), one message per tick."""
        g, schedule = self.first + d, self.schedule
        ticks = intersect(schedule.message_ticks(g, self.fed), range(macro.t0, macro.t1))
        pending = self.pending_messages[d]
        messages = [pending.popleft() for _ in ticks]
        below = self.pending_messages[d - 1] if d > 0 else self.sent_down
        if schedule.routes:
            if messages:
                self.backward_routed(d, schedule.message_frame(g, ticks.start), messages)
            if self.sends_message(d):  # what the tick rule releases at each of the ticks
                sent = (self.release(d, tick) for tick in range(macro.t0, macro.t1))
                below.extend(message for message in sent if message is not None)
        elif messages:
            below.extend(self.backward_paired(d, ticks, messages))
        # no later message meets an older window than the next macro tick's first
        self.registers[d].forget_before(schedule.paired_frame(g, macro.t1, self.fed))

    def backward_paired(self, d: int, ticks: range, messages: list[torch.Tensor]) -> list[torch.Tensor]:
        """A stash of N ticks: each message at its paired window, one batch entry per window (a
        window may meet several messages in the drain); the messages for the module below, one
        per tick, each its window's filled slots summed (none for module 1)."""
        g = self.first + d
        frames = [self.schedule.paired_frame(g, t, self.fed) for t in ticks]
        windows, filled = zip(*(self.registers[d].window_of(frame) for frame in frames))
        wants_input = self.sends_message(d)
        stacked = torch.cat(windows).requires_grad_(wants_input)  # [n*B, C, k, ...]
        with self.autocast():
            output = self.model[d].forward_window(stacked)
        params = self.params[d]
        grads = torch.autograd.grad(output, params + ([stacked] if wants_input else []),
                                    grad_outputs=torch.cat(messages), allow_unused=True)
        self.pseudo.add(d, grads[:len(params)], len(messages))
        if not wants_input:
            return []
        return list(sum_filled_slots(grads[-1], list(filled)).split(len(messages[0])))

    def backward_routed(self, d: int, first: int, messages: list[torch.Tensor]) -> None:
        """``full``: the messages of frames ``first`` ... in order, each meeting its own frame's
        window. Those windows slide along one time sequence of kept inputs, so the module runs
        causally over it (one call, BP's own kernels) and the sequence's gradient is every slot's
        gradient already added up per input frame: the routing."""
        k = self.model[d].window
        wants_input = self.sends_message(d)
        sequence = self.registers[d].sequence(first - k + 1, first + len(messages))
        sequence.requires_grad_(wants_input)
        with self.autocast():
            output = self.model[d].valid(sequence)  # [B, C', n, ...]
        params = self.params[d]
        grads = torch.autograd.grad(output, params + ([sequence] if wants_input else []),
                                    grad_outputs=torch.stack(messages, dim=2), allow_unused=True)
        self.pseudo.add(d, grads[:len(params)], len(messages))
        if wants_input:
            self.routed[d].add(first - k + 1, grads[-1])

    def vjp(self, d: int, graph: Graph, messages: list[torch.Tensor],
            count: int) -> list[torch.Tensor] | None:
        """Accumulate g_d += (df_d/dtheta_d)^T m over the windows of ``graph``, one message each.

        Returns the messages for the module below, one per window: the window's input gradient
        summed over its filled slots, which under smoothness all stand for "the same" input
        (None for module 1).
        """
        params = self.params[d]
        wants_input = self.sends_message(d)
        if graph.windows is not None:
            inputs = params + ([graph.windows] if wants_input else [])
            grads = torch.autograd.grad(graph.output, inputs, grad_outputs=torch.cat(messages),
                                        allow_unused=True)
            self.pseudo.add(d, grads[:len(params)], count)
            if not wants_input:
                return None
            return sum_filled_slots(grads[-1], graph.filled).split(len(messages[0]))
        inputs = params + ([graph.conv_out, graph.newest] if wants_input else [])
        grads = torch.autograd.grad(graph.output, inputs, grad_outputs=torch.stack(messages, dim=2),
                                    allow_unused=True)
        self.pseudo.add(d, grads[:len(params)], count)
        if not wants_input:
            return None
        grad_conv_out, grad_newest = (g.movedim(2, 0) if g is not None else None
                                      for g in grads[len(params):])  # tick first
        conv = self.model[d].first_conv()
        frame = graph.newest[:, :, 0].shape
        below: list[torch.Tensor] = []
        # ticks grouped into runs of equal filled slots: one 2D pass per run (almost always one)
        for filled, run in itertools.groupby(range(len(graph.filled)), key=graph.filled.__getitem__):
            ticks = list(run)
            grad = grad_conv_out[ticks[0]:ticks[-1] + 1].flatten(0, 1)  # [n*B, C', ...]
            size = torch.Size([len(grad), *frame[1:]])
            below += conv.slot_summed_input_grad(grad, size, filled).split(frame[0])
        if grad_newest is not None:
            below = [message + g for message, g in zip(below, grad_newest)]
        return below

    def state_dict(self) -> dict[str, Any]:
        """Registers, queued inputs and messages, clocks and pseudo-gradient sums: what
        ``between_clips: continuous`` carries into the next batch (detached tensors)."""
        # "inbox" and "mailbox": the queues' names in checkpoints since the first version
        return {"registers": [r.state() for r in self.registers],
                "inbox": [[token.state() for token in queue] for queue in self.pending_inputs],
                "mailbox": [[m.detach() for m in queue] for queue in self.pending_messages],
                "clock": self.clock, "fed": self.fed, "pseudo": self.pseudo.state_dict(),
                "routed": [routed.state_dict() for routed in self.routed]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for register, saved in zip(self.registers, state["registers"], strict=True):
            register.load_state(saved)
        self.pending_inputs = [deque(Token.from_state(s) for s in queue) for queue in state["inbox"]]
        self.pending_messages = [deque(queue) for queue in state["mailbox"]]
        self.clock, self.fed = state["clock"], state["fed"]
        self.pseudo.load_state_dict(state["pseudo"])
        for routed, saved in zip(self.routed, state.get("routed", [{}] * len(self.routed)), strict=True):
            routed.load_state_dict(saved)  # checkpoints from before the stash have none


def advance(register: WindowRegister, arrivals: list[Token]) -> tuple[torch.Tensor, list[int]]:
    """Push ``arrivals`` into ``register``; return the time sequence their windows slide over.

    The sequence [k-1+n, B, C, ...] is the register's newest k-1 inputs (zeros where it holds none)
    followed by the n arrivals, so its k-frame windows are the ones the arrivals completed; with it,
    how many of each window's newest slots hold a value.
    """
    k = register.k
    history = register.newest(k - 1)
    values = [token.value for token in history + arrivals]
    padding = [torch.zeros_like(values[0])] * (k - 1 - len(history))
    for token in arrivals:
        register.push(token)
    filled = [min(k, len(history) + i + 1) for i in range(len(arrivals))]
    return torch.stack(padding + values), filled


def sum_filled_slots(grads: torch.Tensor, filled: list[int]) -> torch.Tensor:
    """[n*B, C, k, ...] window gradients -> [n*B, C, ...]: each window's filled slots summed."""
    k = grads.shape[2]
    if all(f == k for f in filled):
        return grads.sum(dim=2)
    batch = len(grads) // len(filled)
    return torch.cat([g[:, :, k - f:].sum(dim=2) for g, f in zip(grads.split(batch), filled)])
