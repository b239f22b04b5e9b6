"""Sideways: depth-parallel training with pseudo-gradients (docs/sideways.md, "Sideways").

Every tick, every module d, independently of the others:
  1. forward: out_d(t) from its current window (the shared Registers do this);
  2. backward: takes the message m_d(t) that module d+1 sent at tick t-1 (for the top module, the
     gradient of the loss of the frame now at the top) and, by a vector-Jacobian product at its
     *current* window, accumulates the pseudo-gradient g_d += (df_d/dtheta_d)^T m_d(t) and sends
     m_{d-1}(t+1) = sum_j (df_d/din_d(t-j))^T m_d(t) to the module below.
The gradient meets an activation of a newer frame than the one that produced it; on a static video
they coincide and the pseudo-gradient is exact. Memory is one window, one graph and one gradient
register per module, whatever the clip length.

With ``sideways.stash`` (the staleness dial, :class:`~sideways_cli.engine.clock.Schedule`) a module
also keeps its older inputs, and a message meets the window of its own frame when kept, recomputed
from them; with ``full`` each window slot's gradient also goes to its own frame
(``routing.py``), and the pseudo-gradient is BP's gradient.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from sideways_cli.engine.clock import BETWEEN_CLIPS, Schedule, parse_update
from sideways_cli.engine.losses import CLASSIFY, Objective, at_least_fp32
from sideways_cli.engine.registers import ModuleStep, Registers, Token, clip_tokens
from sideways_cli.engine.routing import RoutedMessages
from sideways_cli.engine.rule import ApplyUpdate, BatchStats, LossSum
from sideways_cli.models import FrameStack
from sideways_cli.support.runtime import Autocast


class PseudoGradients:
    """Per-module running sums of pseudo-gradients and how many messages each one is over."""

    def __init__(self, params: list[list[torch.Tensor]]):
        self.params = params
        self.clear()

    def clear(self) -> None:
        self.sums: list[list[torch.Tensor] | None] = [None] * len(self.params)
        self.counts = [0] * len(self.params)

    def add(self, d: int, grads, count: int = 1) -> None:
        """Add module d's pseudo-gradient for ``count`` messages (None = parameter unused)."""
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params[d], grads)]
        if self.sums[d] is None:
            self.sums[d] = grads
        else:
            for total, g in zip(self.sums[d], grads):
                total.add_(g)
        self.counts[d] += count

    def state_dict(self) -> dict[str, Any]:
        return {"sums": [None if s is None else [t.detach() for t in s] for s in self.sums],
                "counts": list(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = [None if s is None else list(s) for s in state["sums"]]
        self.counts = list(state["counts"])

    def write_mean(self) -> bool:
        """Add the mean over contributing messages to ``.grad`` (as a backward pass adds its
        gradients: the trainer may let several batches add theirs before it steps) and clear;
        False if there were none."""
        if not any(self.counts):
            return False
        for params, sums, count in zip(self.params, self.sums, self.counts):
            if sums is not None:
                for p, total in zip(params, sums):
                    p.grad = total / count if p.grad is None else p.grad.add_(total / count)
        self.clear()
        return True


class SidewaysExecutor:
    """What every executor of the rule holds, whichever way it runs the ticks (this module's
    :class:`SidewaysRule` one at a time, ``sideways_chunked.py`` a macro tick at a time): a stack
    of modules, the whole network or one stage of it, their pseudo-gradient sums, and the update
    those sums become.

    A stage (``first``: the network index of its first module; ``schedule``: the whole network's,
    which says when messages come) is what one process runs when the network is split across
    processes (``sideways_cli/parallel``); its top module is the network's head only in the last
    stage. Without ``schedule``, ``model`` is the whole network and the stash 0.
    """

    def __init__(self, model: FrameStack, between_clips: str, objective: Objective,
                 autocast: Autocast, first: int, schedule: Schedule | None):
        if between_clips not in BETWEEN_CLIPS:
            raise ValueError(f"sideways.between_clips must be one of {BETWEEN_CLIPS}, got {between_clips!r}")
        self.model = model
        self.objective = objective
        self.between_clips = between_clips
        self.autocast = autocast
        self.first = first
        self.schedule = schedule if schedule is not None else Schedule.of(model)
        self.has_head = first + len(model) == self.schedule.modules
        self.params = [[p for p in m.parameters() if p.requires_grad] for m in model.stack]
        self.pseudo = PseudoGradients(self.params)
        self.routed = [RoutedMessages() for _ in model.stack]
        self.fed = 0  # frames fed since the pipeline started empty

    def sends_message(self, d: int) -> bool:
        """Whether module d has a module below it to send a message to: the network's module 1
        has only the data."""
        return self.first + d > 0

    def release(self, d: int, tick: int) -> torch.Tensor | None:
        """With routing: the message module d sends below at ``tick``, which the module below
        meets at the next tick, if the schedule has one."""
        below = self.first + d - 1
        if tick + 1 not in self.schedule.message_ticks(below, self.fed):
            return None
        return self.routed[d].take(self.schedule.message_frame(below, tick + 1))

    def flush(self, apply_update: ApplyUpdate) -> int:
        """Turn accumulated pseudo-gradients into ``.grad`` (mean over contributing losses) and
        step; how many updates that made (0 when no loss contributed)."""
        if not self.pseudo.write_mean():
            return 0
        apply_update()
        return 1


class SidewaysRule(SidewaysExecutor):
    """The tick rule over a stack of modules: the whole network, or one stage of it.

    A stage's bottom module gets the activation the stage below sent (``tick(frame=...)``), its
    top module the message the stage above sent (``tick(message=...)``) unless it is the
    network's head, whose message is its frame's loss gradient; each tick leaves the stage's
    outgoing activation in :meth:`sent_up` and message in ``sent_down``.
    """

    def __init__(self, model: FrameStack, between_clips: str = "reset", update: str = "clip",
                 objective: Objective = CLASSIFY, autocast: Autocast = nullcontext,
                 first: int = 0, schedule: Schedule | None = None):
        super().__init__(model, between_clips, objective, autocast, first, schedule)
        self.update_every = parse_update(update)
        self.registers = Registers(model, first, stash=self.schedule.pairs)
        size = len(model)
        self.current: list[ModuleStep | None] = [None] * size  # graph of each module's newest window
        self.stale = [False] * size  # weights changed since that graph was built
        self.messages: list[torch.Tensor | None] = [None] * size  # gradient registers
        self.sent_down: torch.Tensor | None = None  # the bottom module's message of the last tick
        self.ticks_since_update = 0
        self.clock = 0  # ticks since the pipeline started empty

    def reset(self) -> None:
        """Empty the pipeline: no activation, graph or message survives into the next clip."""
        self.registers.reset()
        self.current = [None] * len(self.model)
        self.messages = [None] * len(self.model)
        for routed in self.routed:
            routed.clear()
        self.clock = self.fed = 0

    def train_batch(self, clips: torch.Tensor, labels: torch.Tensor,
                    apply_update: ApplyUpdate) -> BatchStats:
        """Feed a batch of clips frame by frame; in ``reset`` mode fill and drain around it.

        ``reset``: T + 2(D-1) ticks (more with ``stash: full``: ``Schedule.batch_ticks``), every
        frame's loss is computed and its gradient reaches module 1 before the batch ends.
        ``continuous``: T ticks, the pipeline carries on into the next batch like a live stream,
        so this batch's losses are the ones that reached the top during its T ticks.
        """
        if self.between_clips == "reset":
            self.reset()
        tokens = clip_tokens(clips, self.objective.frame_targets(clips, labels), self.fed)
        self.fed += len(tokens)
        ticks = self.schedule.batch_ticks(len(tokens), self.between_clips)
        losses, updates = LossSum(), 0
        for tick in range(ticks):
            loss = self.tick(tokens[tick] if tick < len(tokens) else None)
            if loss is not None:
                losses.add(loss)
            if self.update_every and self.ticks_since_update >= self.update_every:
                updates += self.flush(apply_update)
        if self.update_every is None:
            updates += self.flush(apply_update)
        return BatchStats(losses, clips.shape[0] * clips.shape[2], updates)

    def tick(self, frame: Token | None, message: torch.Tensor | None = None) -> torch.Tensor | None:
        """One clock tick of every module; returns the loss of the frame at the top, if any, as a
        detached 0-dim tensor on the device (reading it would wait for the tick's kernels).

        ``frame``: the new input of the bottom module (None while draining); ``message``: for a
        stage below the head, the message the module above it sent at the previous tick.
        """
        top = len(self.model) - 1
        if not self.has_head:
            self.messages[top] = message
        steps = self.forward(frame)
        for step in steps:
            self.current[step.index] = step
            self.stale[step.index] = False
        loss = None
        head = self.current[top]
        if self.has_head and head is not None and self.registers.fresh[top]:
            loss = self.objective.frame_loss(at_least_fp32(head.output), head.token.target)
            (self.messages[top],) = torch.autograd.grad(loss, head.output, retain_graph=True)
            loss = loss.detach()
        sent: list[torch.Tensor | None] = [None] * len(self.model)
        self.sent_down = None
        for d, message in enumerate(self.messages):
            below = self.backward_module(d, message) if message is not None else None
            if self.schedule.routes and self.sends_message(d):
                below = self.release(d, self.clock)
            if self.schedule.pairs:  # no later message meets an older window than the next one's
                self.registers.windows[d].forget_before(
                    self.schedule.paired_frame(self.first + d, self.clock + 1, self.fed))
            if d > 0:
                sent[d - 1] = below
            else:
                self.sent_down = below
        # messages travel one module down per tick; the top's is replaced by the next loss
        self.messages = sent[:top] + [None]
        self.ticks_since_update += 1
        self.clock += 1
        return loss

    def forward(self, frame: Token | None) -> list[ModuleStep]:
        """The forward half of a tick: every module with a new input computes its output at its
        new window, with the graph its VJP will use. (A probe may extend it: ``fidelity.py``.)"""
        with self.autocast():
            return self.registers.forward_tick(frame, with_graph=True)

    def sent_up(self) -> Token | None:
        """The top module's output of the last tick, if it computed one: the next stage's input."""
        return self.registers.outputs[-1] if self.registers.fresh[-1] else None

    def backward_module(self, d: int, message: torch.Tensor) -> torch.Tensor | None:
        """VJP of module d at its current window, or with a stash at the window of the frame the
        message is paired with (``Schedule.paired_frame``); accumulates g_d, returns the message
        below (with routing, adds to the messages on their way down instead: :meth:`release`)."""
        step = self.current[d]
        frame = step.token.frame
        if self.schedule.pairs:
            frame = self.schedule.paired_frame(self.first + d, self.clock, self.fed)
        if frame != step.token.frame:  # an older window, recomputed from its kept inputs
            window, filled = self.registers.windows[d].window_of(frame)
            window.requires_grad_(self.sends_message(d))
            with self.autocast():
                step = ModuleStep(d, window, filled, self.model[d].forward_window(window), step.token)
        elif self.stale[d]:
            step = self.rebuild(d)
        wants_input = self.sends_message(d)
        inputs = self.params[d] + ([step.window] if wants_input else [])
        grads = torch.autograd.grad(step.output, inputs, grad_outputs=message,
                                    retain_graph=True, allow_unused=True)
        self.accumulate(d, grads[:len(self.params[d])])
        if not wants_input:
            return None
        if self.schedule.routes:
            self.routed[d].add(frame - step.window.shape[2] + 1, grads[-1])
            return None
        # every filled slot stands for "the same" input under smoothness: sum their gradients
        return grads[-1][:, :, step.window.shape[2] - step.filled:].sum(dim=2)

    def accumulate(self, d: int, grads) -> None:
        """Add one message's parameter VJP to module d's pseudo-gradient (a probe may also read
        it: ``fidelity.py``)."""
        self.pseudo.add(d, grads)

    def rebuild(self, d: int) -> ModuleStep:
        """Recompute module d's graph at its current window after its weights were updated."""
        old = self.current[d]
        window = old.window.detach().requires_grad_(self.sends_message(d))
        with self.autocast():
            output = self.model[d].forward_window(window)
        self.current[d] = ModuleStep(d, window, old.filled, output, old.token)
        self.stale[d] = False
        return self.current[d]

    def flush(self, apply_update: ApplyUpdate) -> int:
        """:meth:`SidewaysExecutor.flush`, which starts the count of ticks to the next update."""
        self.ticks_since_update = 0
        updates = super().flush(apply_update)
        if updates:  # retained graphs saved the old weights; rebuild them before their next use
            self.stale = [step is not None for step in self.current]
        return updates

    def state_dict(self) -> dict[str, Any]:
        """Registers, windows, messages and pseudo-gradient sums: what ``continuous`` (and
        ``update: every N ticks``) carry into the next batch. Graphs are not saved: each module's
        is rebuilt from its saved window when next used, as after a weight update."""
        current = [None if step is None else {"window": step.window.detach(), "filled": step.filled,
                                              "token": step.token.state()} for step in self.current]
        return {"pipeline": self.registers.state_dict(), "current": current,
                "messages": [None if m is None else m.detach() for m in self.messages],
                "pseudo": self.pseudo.state_dict(), "ticks_since_update": self.ticks_since_update,
                "clock": self.clock, "fed": self.fed,
                "routed": [routed.state_dict() for routed in self.routed]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.registers.load_state_dict(state["pipeline"])
        self.current = [None if s is None else
                        ModuleStep(d, s["window"], s["filled"], None, Token.from_state(s["token"]))
                        for d, s in enumerate(state["current"])]
        self.stale = [step is not None for step in self.current]  # no graph yet: rebuild on use
        self.messages = list(state["messages"])
        self.pseudo.load_state_dict(state["pseudo"])
        self.ticks_since_update = state["ticks_since_update"]
        self.clock, self.fed = state["clock"], state["fed"]
        for routed, saved in zip(self.routed, state.get("routed", [{}] * len(self.routed)), strict=True):
            routed.load_state_dict(saved)  # checkpoints from before the stash have none
