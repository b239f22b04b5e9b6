"""How close Sideways' pseudo-gradients are to BP's gradients, module by module (docs/sideways.md,
property 5), from the same weights and the same batch, neither rule stepping.

The cosine similarity per module is 1 on a static video with per-frame modules and falls as
consecutive frames grow less alike (larger frame stride, shuffled frames). Two measures per
module. ``cosine``: the whole batch's Sideways gradient against BP's. Summed over a clip whose
frames share one label, it re-pairs much the same messages and activations in any frame order, so
on short clips it moves little with smoothness. ``tick_cosine``: the mean over ticks of the cosine
between what a message gives at the window it meets (Sideways) and at the window that produced its
frame, 2(D-d) frames older (what exact credit assignment would use): the mismatch that smoothness
is meant to make small, isolated.

Both measure any point of the staleness dial (``sideways.stash``): a stash pairs messages with
older windows, and ``full`` gives BP's gradients, cosine 1 everywhere.
"""

from __future__ import annotations

import torch

from sideways_cli.engine.backprop import BackpropRule
from sideways_cli.engine.clock import Schedule
from sideways_cli.engine.losses import CLASSIFY, Objective
from sideways_cli.engine.probes import module_gradients
from sideways_cli.engine.registers import ModuleStep, Token
from sideways_cli.engine.sideways import SidewaysRule
from sideways_cli.models import FrameStack
from sideways_cli.support.runtime import to_device


class TickMatchedSideways(SidewaysRule):
    """The reference tick rule (``between_clips: reset``) that also takes each message's parameter VJP at
    the window that produced the message's frame, and records per module the cosine between that
    and the VJP at the window the message meets."""

    def __init__(self, model: FrameStack, objective: Objective = CLASSIFY, stash: int | str = 0):
        super().__init__(model, between_clips="reset", objective=objective,
                         schedule=Schedule.of(model, stash))
        # 0-dim tensors on the device, read once at the end: reading each would wait for its tick
        self.tick_cosines: list[list[torch.Tensor]] = [[] for _ in model.stack]
        self.windows: list[dict[int, torch.Tensor]] = [{} for _ in model.stack]  # by frame

    def forward(self, frame: Token | None) -> list[ModuleStep]:
        """The rule's forward, remembering each module's window by the frame it belongs to."""
        steps = super().forward(frame)
        for step in steps:
            self.windows[step.index][step.token.frame] = step.window.detach()
        return steps

    def reset(self) -> None:
        super().reset()
        for windows in self.windows:
            windows.clear()

    def backward_module(self, d: int, message: torch.Tensor) -> torch.Tensor | None:
        """The rule's VJP, after the one at the window that produced the message's frame."""
        produced = self.windows[d][self.schedule.message_frame(d, self.clock)]
        grads = torch.autograd.grad(self.model[d].forward_window(produced), self.params[d],
                                    grad_outputs=message, allow_unused=True)
        self.matched = self._flat(d, grads)
        return super().backward_module(d, message)

    def accumulate(self, d: int, grads) -> None:
        """The rule's own parameter VJP, at the window the message met: its cosine with the one
        at the message's own frame's window."""
        met = self._flat(d, grads)
        self.tick_cosines[d].append(torch.nn.functional.cosine_similarity(met, self.matched, dim=0))
        super().accumulate(d, grads)

    def _flat(self, d: int, grads) -> torch.Tensor:
        return torch.cat([(torch.zeros_like(p) if g is None else g).flatten().double()
                          for p, g in zip(self.params[d], grads)])


def gradient_fidelity(model: FrameStack, clips: torch.Tensor, labels: torch.Tensor,
                      objective: Objective = CLASSIFY, stash: int | str = 0) -> list[dict]:
    """[{index, name, cosine, tick_cosine}] for every module; Sideways runs its reference tick
    schedule with ``stash``, on the device the model is on."""
    was_training = model.training
    model.eval()  # dropout would give the two rules different masks
    clips, labels = to_device(clips, model.device, model.dtype), to_device(labels, model.device)
    bp = module_gradients(model, BackpropRule(model, objective), clips, labels)
    sideways = TickMatchedSideways(model, objective, stash)
    sw = module_gradients(model, sideways, clips, labels)
    model.train(was_training)
    rows = []
    for d, (g_bp, g_sw) in enumerate(zip(bp, sw)):
        cosine = torch.nn.functional.cosine_similarity(g_bp.double(), g_sw.double(), dim=0)
        ticks = torch.stack(sideways.tick_cosines[d]).tolist() if sideways.tick_cosines[d] else []
        rows.append({"index": d, "name": model.names[d], "cosine": cosine.item(),
                     "tick_cosine": sum(ticks) / len(ticks) if ticks else 1.0})
    return rows

