"""Sideways across processes, a macro tick at a time: each stage runs the chunked executor
(``engine/sideways_chunked.py``) on its modules, so its kernels see ``chunk`` ticks at once.

Over a macro tick [t0, t1) network module g reads module g-1's outputs of ticks [t0-1, t1-1) and
module g+1's messages of the same ticks, most of them computed in that same macro tick. So across a
stage boundary the forward of macro tick m waits for the stage below's forward of m, and the
backward of m for the stage above's backward of m: the dependencies of pipelined BP over
microbatches, with a macro tick of the clip in the role of a microbatch. The stages therefore run
a 1F1B schedule: stage s runs some forwards ahead (P-s below the top stage, one more than
1F1B's P-1-s: ``clock.forwards_ahead``), then alternates one forward and one backward, and all
stages work at once in steady state; ``clock.stage_order`` is that order, as data. (With ``chunk`` 1 a stage's tick would depend only on its neighbours'
previous tick; ``staged_sideways.py`` runs that, every update rule.)

The numbers are those of the single-process :class:`ChunkedSideways` (and so of the tick
rule): the same operations on the same values; a stage merely runs a macro tick's forward early,
which nothing else reads until its backward. Weights change only between batches
(``update: clip``), so each batch ends the schedule; that is the pipeline's bubble, (P-1) macro
ticks of the slowest stage per batch.

On the wire, per macro tick and boundary: the stacked outputs of the lower stage's top module and
the stacked messages of the upper stage's bottom module, nothing else. Both ends know from the
clock how many there are (one per busy tick, or the drain's one summed message) and so their
shapes; each stage posts its next receives as soon as it has taken the last ones, and the
transfers run while it computes.
"""

from __future__ import annotations

from typing import Any

import torch

from sideways_cli.engine.clock import BACKWARD, FORWARD, MacroTick, Schedule, arrivals, stage_order
from sideways_cli.engine.losses import Objective
from sideways_cli.engine.registers import Token, clip_tokens
from sideways_cli.engine.rule import ApplyUpdate, LossSum
from sideways_cli.engine.sideways_chunked import Graph, ChunkedSideways
from sideways_cli.models import FrameStack
from sideways_cli.parallel.contribution import Contribution
from sideways_cli.parallel.links import PendingReceive
from sideways_cli.parallel.staged_sideways import FrameTargets
from sideways_cli.parallel.stages import Spec, boundary_specs
from sideways_cli.parallel.topology import Topology
from sideways_cli.support.runtime import Autocast


class StagedChunked:
    """The chunked executor for one stage (``modules`` of the network whose schedule is
    ``schedule``).

    ``specs``: every module's per-clip output frame (shape, dtype), which with the clock gives the
    shape of everything that crosses this stage's boundaries.
    """

    def __init__(self, stack: FrameStack, modules: range, schedule: Schedule, ctx: Topology,
                 specs: list[Spec], between_clips: str, chunk: int, objective: Objective,
                 autocast: Autocast):
        self.rule = ChunkedSideways(stack, between_clips, "clip", chunk, objective, autocast,
                                    first=modules.start, schedule=schedule)
        self.modules, self.schedule = modules, schedule
        self.ctx, self.links = ctx, ctx.links
        self.below, self.above = boundary_specs(specs, modules)
        self.targets = FrameTargets(objective, schedule.modules)

    def train_batch(self, clips: torch.Tensor | None, labels: torch.Tensor | None,
                    apply_update: ApplyUpdate, shape: torch.Size) -> Contribution:
        """One batch of clips of ``shape`` [B, C, T, H, W] on every stage: the first has the clips,
        the last the labels (and, for reconstruction, the clips: its targets)."""
        rule, ctx = self.rule, self.ctx
        macros = rule.start_batch(shape[2])
        first_frame = rule.fed - shape[2]
        if ctx.is_first:
            rule.feed_inputs(clip_tokens(clips, [None] * shape[2], first_frame))
        if ctx.is_last:
            self.targets.keep(clips, labels, shape, first_frame, macros[0].t0)
        ups = Receives(macros, self._post_activations, shape[0])
        downs = Receives(macros, self._post_messages, shape[0])
        losses, graphs = LossSum(), {}
        for action, m in stage_order(ctx.stage, ctx.stages, len(macros)):
            if action == FORWARD:
                graphs[m] = self._forward(m, macros[m], ups)
            elif action == BACKWARD:
                self._backward(m, macros[m], graphs.pop(m), downs)
            else:  # the losses of the frames that reached the top in macro tick m
                losses.add(*rule.frame_losses())
        # the batch's traffic is done before the update, which may add up a norm over the stages
        self.links.settle()
        updated = rule.flush(apply_update)
        if not updated:
            # no message has reached these modules yet (a continuous run's first batches), but
            # every stage takes part in the batch's update alike: its global gradient norm is
            # summed over the stages. With no gradient here, the optimizer and the EMA of these
            # modules stay as they are, as in one process.
            apply_update()
        return Contribution(losses, shape[0] * shape[2] if ctx.is_first else 0,
                            [bool(updated)])

    def _forward(self, m: int, macro: MacroTick, ups: Receives) -> list[Graph | None]:
        rule, ctx = self.rule, self.ctx
        values = ups.take(m)
        if not ctx.is_first:
            frames = [t - self.modules.start + 1 for t in self._arrivals_below(macro)]
            rule.feed_inputs(Token(v, f, self.targets.of(f)) for v, f in zip(values, frames))
        graphs = rule.forward_macro(macro)
        if not ctx.is_last:
            scheduled = len(arrivals(self.modules.stop - 1, rule.fed, macro.t0, macro.t1))
            self._send(rule.take_outputs(), ctx.stage + 1, scheduled, "activations")
        return graphs

    def _backward(self, m: int, macro: MacroTick, graphs: list[Graph | None],
                  downs: Receives) -> None:
        rule, ctx = self.rule, self.ctx
        rule.feed_messages(downs.take(m))
        rule.backward_macro(macro, graphs)
        if not ctx.is_first:
            self._send(rule.take_sent_down(), ctx.stage - 1,
                       self._messages(self.modules.start, macro), "messages")

    def _arrivals_below(self, macro: MacroTick) -> range:
        """The ticks the stage below's top module computes in ``macro``: our inputs."""
        return arrivals(self.modules.start - 1, self.rule.fed, macro.t0, macro.t1)

    def _messages(self, g: int, macro: MacroTick) -> int:
        """How many messages network module g sends below in ``macro``."""
        return self.schedule.messages_sent(g, self.rule.fed, macro)

    def _post_activations(self, macro: MacroTick, batch: int) -> PendingReceive | None:
        count = len(self._arrivals_below(macro)) if not self.ctx.is_first else 0
        if not count:
            return None
        size, dtype = self.below
        return self.links.receive((count, batch, *size), dtype, self.ctx.stage - 1,
                                  "activations")

    def _post_messages(self, macro: MacroTick, batch: int) -> PendingReceive | None:
        count = self._messages(self.modules.stop, macro) if not self.ctx.is_last else 0
        if not count:
            return None
        size, dtype = self.above
        return self.links.receive((count, batch, *size), dtype, self.ctx.stage + 1,
                                  "gradient messages")

    def _send(self, values: list[torch.Tensor], dst: int, scheduled: int, what: str) -> None:
        if len(values) != scheduled:  # a bug, not a user error: the neighbour would hang
            raise RuntimeError(f"stage {self.ctx.stage}: {len(values)} {what} for stage {dst} in "
                               f"a macro tick that has {scheduled}")
        if values:
            self.links.send(torch.stack(values), dst)

    def state_dict(self) -> dict[str, Any]:
        """Between batches nothing is on the wire: the rule's queues and the targets are all."""
        return {"rule": self.rule.state_dict(), "targets": self.targets.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state["rule"])
        self.targets.load_state_dict(state["targets"])


class Receives:
    """One direction's receives of a batch in macro-tick order, each posted as soon as the one
    before it is taken: one transfer in flight, overlapping the compute before its use."""

    def __init__(self, macros: list[MacroTick], post, batch: int):
        self.macros, self.post, self.batch = macros, post, batch
        self.index, self.pending = self._post_from(0)

    def _post_from(self, m: int) -> tuple[int, PendingReceive | None]:
        for i in range(m, len(self.macros)):  # macro ticks with nothing to receive are skipped
            pending = self.post(self.macros[i], self.batch)
            if pending is not None:
                return i, pending
        return len(self.macros), None

    def take(self, m: int) -> list[torch.Tensor]:
        """What macro tick ``m`` receives (nothing if it has nothing scheduled)."""
        if m != self.index:
            return []
        values = self.pending.wait()
        self.index, self.pending = self._post_from(m + 1)
        return list(values.unbind(0))
