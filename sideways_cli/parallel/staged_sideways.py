"""Sideways across processes: each stage runs the tick rule on its modules and, every tick, sends
its top activation up and its bottom message down (docs/sideways.md, "Depth and data parallelism").

Within a tick no module depends on another: module d reads what module d-1 wrote and what module
d+1 sent at the previous tick. So the stages work at once, and what crosses a boundary at tick t
is needed only at tick t+1: its receive is posted before the tick's compute and waited after it,
so the transfer overlaps the compute. Both ends of a link know from the clock alone which ticks
carry a value (``clock.input_ticks`` and ``Schedule.message_ticks``), so nothing but the tensors
themselves is sent. The numbers are those of the single-process :class:`SidewaysRule`: the
same operations on the same values, only spread over processes.
"""

from __future__ import annotations

from typing import Any

import torch

from sideways_cli.engine.clock import Schedule, input_ticks
from sideways_cli.engine.losses import Objective
from sideways_cli.engine.registers import Token, clip_tokens
from sideways_cli.engine.rule import ApplyUpdate, LossSum
from sideways_cli.engine.sideways import SidewaysRule
from sideways_cli.models import FrameStack
from sideways_cli.parallel.contribution import Contribution
from sideways_cli.parallel.links import PendingReceive
from sideways_cli.parallel.stages import Spec, boundary_specs
from sideways_cli.parallel.topology import Topology
from sideways_cli.support.runtime import Autocast


class StagedSideways:
    """The tick rule for one stage (``modules`` of the network whose schedule is ``schedule``)
    and its links.

    ``specs``: every module's per-clip output frame (shape, dtype), from which this stage knows
    what arrives at its lower and upper boundaries before any data flows.
    """

    def __init__(self, stack: FrameStack, modules: range, schedule: Schedule, ctx: Topology,
                 specs: list[Spec], between_clips: str, update: str, objective: Objective,
                 autocast: Autocast):
        self.rule = SidewaysRule(stack, between_clips, update, objective, autocast,
                                 first=modules.start, schedule=schedule)
        self.modules, self.schedule = modules, schedule
        self.ctx, self.links = ctx, ctx.links
        self.below, self.above = boundary_specs(specs, modules)
        self.targets = FrameTargets(objective, schedule.modules)
        self.pending_up: Token | None = None  # what the stage below sent at the last tick
        self.pending_message: torch.Tensor | None = None  # what the stage above sent then

    # which ticks a link carries a value, from the clock (ticks since the pipeline started empty)
    def _has_input(self, g: int, tick: int) -> bool:
        return tick in input_ticks(g, self.rule.fed)

    def _has_message(self, g: int, tick: int) -> bool:
        return tick in self.schedule.message_ticks(g, self.rule.fed)

    def train_batch(self, clips: torch.Tensor | None, labels: torch.Tensor | None,
                    apply_update: ApplyUpdate, shape: torch.Size) -> Contribution:
        """One batch of clips of ``shape`` [B, C, T, H, W] on every stage: the first has the clips,
        the last the labels (and, for reconstruction, the clips: its targets)."""
        rule = self.rule
        if rule.between_clips == "reset":
            rule.reset()
            self.pending_up = self.pending_message = None
        frames = shape[2]
        first_frame = rule.fed
        rule.fed += frames
        tokens = clip_tokens(clips, [None] * frames, first_frame) if self.ctx.is_first else []
        if self.ctx.is_last:
            self.targets.keep(clips, labels, shape, first_frame, rule.clock)
        ticks = self.schedule.batch_ticks(frames, rule.between_clips)
        losses, flushes = LossSum(), []
        for i in range(ticks):
            tick = rule.clock
            up, down = self._post_receives(tick + 1, shape[0])
            frame = tokens[i] if self.ctx.is_first and i < frames else self.pending_up
            loss = rule.tick(frame, self.pending_message)
            if loss is not None:
                losses.add(loss)
            self._send(tick)
            if rule.update_every and rule.ticks_since_update >= rule.update_every:
                flushes.append(rule.flush(apply_update))
            self._take(up, down, tick + 1)
        # the batch's traffic is done before the update, which may add up a norm over the stages
        self.links.settle()
        if rule.update_every is None:
            flushes.append(rule.flush(apply_update))
            if not flushes[-1]:  # nothing to step here; see StagedChunked.train_batch
                apply_update()
        return Contribution(losses, shape[0] * frames if self.ctx.is_first else 0,
                            [bool(f) for f in flushes])

    def _post_receives(self, tick: int, batch: int) -> tuple[PendingReceive | None, PendingReceive | None]:
        up = down = None
        if not self.ctx.is_first and self._has_input(self.modules.start, tick):
            size, dtype = self.below
            up = self.links.receive((batch, *size), dtype, self.ctx.stage - 1, "an activation")
        if not self.ctx.is_last and self._has_message(self.modules.stop - 1, tick):
            size, dtype = self.above
            down = self.links.receive((batch, *size), dtype, self.ctx.stage + 1, "a gradient message")
        return up, down

    def _send(self, tick: int) -> None:
        """This tick's outgoing activation and message; the schedule says exactly which exist."""
        up, down = self.rule.sent_up(), self.rule.sent_down
        if not self.ctx.is_last:
            self._check("activation", up is not None, self._has_input(self.modules.stop, tick + 1))
            if up is not None:
                self.links.send(up.value, self.ctx.stage + 1)
        if not self.ctx.is_first:
            self._check("message", down is not None, self._has_message(self.modules.start - 1, tick + 1))
            if down is not None:
                self.links.send(down, self.ctx.stage - 1)

    def _check(self, what: str, sent: bool, scheduled: bool) -> None:
        if sent != scheduled:  # a bug, not a user error: the neighbour would wait forever
            raise RuntimeError(f"stage {self.ctx.stage} at tick {self.rule.clock}: {what} "
                               f"{'sent' if sent else 'missing'} against the tick schedule")

    def _take(self, up: PendingReceive | None, down: PendingReceive | None, tick: int) -> None:
        self.pending_up = None
        if up is not None:
            frame = tick - self.modules.start  # frame f reaches module d at tick f + d
            self.pending_up = Token(up.wait(), frame, self.targets.of(frame))
        self.pending_message = down.wait() if down is not None else None

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule.state_dict(), "targets": self.targets.state_dict(),
                "pending_up": None if self.pending_up is None else self.pending_up.state(),
                "pending_message": self.pending_message}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state["rule"])
        self.targets.load_state_dict(state["targets"])
        self.pending_up = None if state["pending_up"] is None else Token.from_state(state["pending_up"])
        self.pending_message = state["pending_message"]


class FrameTargets:
    """The last stage's targets by frame: frames of earlier clips may still be on their way up."""

    def __init__(self, objective: Objective, network_modules: int):
        self.objective, self.network_modules = objective, network_modules
        self.by_frame: dict[int, torch.Tensor] = {}

    def keep(self, clips: torch.Tensor | None, labels: torch.Tensor, shape: torch.Size,
             first_frame: int, clock: int) -> None:
        """The batch's targets; ``clock``: the tick the batch starts at (older frames are done)."""
        oldest = clock - self.network_modules  # every older frame has reached the top
        self.by_frame = {f: t for f, t in self.by_frame.items() if f >= oldest}
        clips = clips if clips is not None else torch.empty(shape, device="meta")
        for t, target in enumerate(self.objective.frame_targets(clips, labels)):
            self.by_frame[first_frame + t] = target

    def of(self, frame: int) -> torch.Tensor | None:
        return self.by_frame.get(frame)

    def state_dict(self) -> dict[int, torch.Tensor]:
        return dict(self.by_frame)

    def load_state_dict(self, state: dict[int, torch.Tensor]) -> None:
        self.by_frame = dict(state)
