"""The tick machinery both rules share: registers, windows and validity (docs/sideways.md,
"The network").

At tick t frame x_t enters module 1, and module d reads what module d-1 wrote at tick t-1:

    in_1(t) = x_t,  in_d(t) = out_{d-1}(t-1),  out_d(t) = f_d([in_d(t-k_d+1) ... in_d(t)])

A register holds no value until real data reaches it; window slots without a value are zeros, the
same as causal zero padding, which makes the pipelined forward equal to the causal network run over
the whole clip. A module computes only when its input register received a new value at the previous
tick; otherwise its output register keeps its last value (this is what "drain" means).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from sideways_cli.engine.clock import input_ticks
from sideways_cli.models import FrameStack


@dataclass
class Token:
    """A value travelling up the pipeline with the frame it belongs to and that frame's target."""

    value: torch.Tensor  # [B, C, H, W] activation (or [B, K] logits at the top)
    frame: int  # position of the frame in the stream fed to the pipeline
    target: torch.Tensor  # what the frame's loss compares its output with

    def state(self) -> dict[str, Any]:
        # a copy: an input frame is a view, which would take its whole clip into a checkpoint
        return {"value": self.value.detach().clone(), "frame": self.frame, "target": self.target}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Token:
        return cls(state["value"], state["frame"], state["target"])


def optional_token_state(token: Token | None) -> dict[str, Any] | None:
    return None if token is None else token.state()


def optional_token(state: dict[str, Any] | None) -> Token | None:
    return None if state is None else Token.from_state(state)


class WindowRegister:
    """A module's last k inputs, oldest first; slots that never received a value read as zeros.

    With ``stash`` it also keeps older inputs, so that a message can meet the window of an older
    frame (:meth:`window_of`), until the executor says no message will (:meth:`forget_before`).
    """

    def __init__(self, k: int, stash: bool = False):
        self.k = k
        self.capacity = None if stash else k
        self.slots: deque[Token] = deque(maxlen=self.capacity)

    def clear(self) -> None:
        self.slots.clear()

    def push(self, token: Token) -> None:
        self.slots.append(token)

    def state(self) -> list[dict[str, Any]]:
        return [token.state() for token in self.slots]

    def load_state(self, state: list[dict[str, Any]]) -> None:
        self.slots = deque((Token.from_state(s) for s in state), maxlen=self.capacity)

    @property
    def filled(self) -> int:
        """How many of the newest window's slots hold a value; they are always the newest ones."""
        return min(len(self.slots), self.k)

    def newest(self, n: int) -> list[Token]:
        """The newest ``n`` inputs kept (fewer if fewer arrived), oldest first."""
        return list(self.slots)[max(0, len(self.slots) - n):]

    def tensor(self) -> torch.Tensor:
        """[B, C, k, ...]: the window in time order with zeros for the empty (oldest) slots."""
        return stack_window([slot.value for slot in self.newest(self.k)], self.k)

    def window_of(self, frame: int) -> tuple[torch.Tensor, int]:
        """The window whose newest input is ``frame``'s ([B, C, k, ...], zeros for the slots
        before the first frame) and how many of its slots hold a value."""
        return self.sequence(frame - self.k + 1, frame + 1), min(self.k, frame + 1)

    def sequence(self, first: int, stop: int) -> torch.Tensor:
        """[B, C, stop - first, ...]: the inputs of frames ``first`` ... ``stop - 1`` in time
        order, zeros for the frames before the first (negative: a clip's causal padding)."""
        kept = [token.value for token in self.slots if first <= token.frame < stop]
        missing = stop - first - len(kept)
        if missing > max(0, -first):
            raise RuntimeError(f"frames {first}..{stop - 1}: an input is no longer kept (a stash bug)")
        return stack_window(kept, stop - first)

    def forget_before(self, frame: int) -> None:
        """Drop the inputs no window still needed starts with: those older than ``frame``'s
        window."""
        while self.slots and self.slots[0].frame < frame - self.k + 1:
            self.slots.popleft()


def stack_window(values: list[torch.Tensor], k: int) -> torch.Tensor:
    """[B, C, k, ...] from a window's inputs in time order, zeros before them."""
    return torch.stack([torch.zeros_like(values[0])] * (k - len(values)) + values, dim=2)


@dataclass
class ModuleStep:
    """One module's forward at one tick, with its autograd graph when the engine needs one."""

    index: int
    window: torch.Tensor  # the [B, C, k, ...] window the output was computed from
    filled: int  # how many of its newest slots hold real values
    output: torch.Tensor  # [B, C', ...], attached to a graph when computed with grad
    token: Token  # the output as it travels to the next module


class Registers:
    """Registers of a D-module stack and the forward half of a tick."""

    def __init__(self, model: FrameStack, first: int = 0, stash: bool = False):
        """``first``: the network index of ``model``'s first module when it is one stage of a
        network split across processes (module 0 of the network gets data, the others
        activations); ``stash``: keep older inputs too (``WindowRegister``)."""
        self.model = model
        self.first = first
        self.windows = [WindowRegister(k, stash) for k in model.windows]
        self.outputs: list[Token | None] = [None] * len(model)
        self.fresh = [False] * len(model)  # out_d was written at the last tick

    def reset(self) -> None:
        """Empty every register: the next clip starts from a pipeline holding no value."""
        for window in self.windows:
            window.clear()
        self.outputs = [None] * len(self.model)
        self.fresh = [False] * len(self.model)

    def state_dict(self) -> dict[str, Any]:
        return {"windows": [w.state() for w in self.windows],
                "outputs": [optional_token_state(t) for t in self.outputs], "fresh": list(self.fresh)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for window, saved in zip(self.windows, state["windows"], strict=True):
            window.load_state(saved)
        self.outputs = [optional_token(t) for t in state["outputs"]]
        self.fresh = list(state["fresh"])

    def forward_tick(self, frame: Token | None, with_graph: bool) -> list[ModuleStep]:
        """Advance one tick; ``frame`` is the new input to module 1 (None while draining).

        Returns the steps of the modules that computed a new output this tick, bottom first. With
        ``with_graph`` each window is a leaf that requires grad (except module 1's, whose input is
        data), so the engine can take vector-Jacobian products at exactly this window.
        """
        steps: list[ModuleStep] = []
        # every module reads what its neighbour wrote at the previous tick, so collect all inputs
        # before any register is overwritten
        inputs = [frame] + [self.outputs[d - 1] if self.fresh[d - 1] else None
                            for d in range(1, len(self.model))]
        for d, token in enumerate(inputs):
            self.fresh[d] = token is not None
            if token is None:
                continue
            register = self.windows[d]
            register.push(token)
            window = register.tensor()
            if with_graph and self.first + d > 0:
                window.requires_grad_(True)
            with torch.set_grad_enabled(with_graph):
                output = self.model[d].forward_window(window)
            out_token = Token(output.detach(), token.frame, token.target)
            self.outputs[d] = out_token
            steps.append(ModuleStep(d, window, register.filled, output, out_token))
        return steps


def clip_tokens(clip: torch.Tensor, targets: torch.Tensor | Sequence[torch.Tensor],
                first_frame: int = 0) -> list[Token]:
    """Split a [B, C, T, H, W] clip into per-tick input tokens (views, no copies).

    ``targets``: one per frame (an objective's ``frame_targets``), or one tensor for every frame.
    """
    if isinstance(targets, torch.Tensor):
        targets = [targets] * clip.shape[2]
    return [Token(clip.select(2, t), first_frame + t, targets[t]) for t in range(clip.shape[2])]


@torch.no_grad()
def tick_forward(model: FrameStack, clip: torch.Tensor) -> torch.Tensor:
    """Run a clip through the pipeline tick by tick; returns the top outputs in frame order, time at dim 2.

    Runs until the top module's last input (``clock.input_ticks``): T + D - 1 ticks.
    """
    pipeline = Registers(model)
    tokens = clip_tokens(clip, torch.empty(0))
    top = len(model) - 1
    outputs: list[torch.Tensor] = []
    for tick in range(input_ticks(top, len(tokens)).stop):
        steps = pipeline.forward_tick(tokens[tick] if tick < len(tokens) else None, with_graph=False)
        outputs.extend(step.output for step in steps if step.index == top)
    return torch.stack(outputs, dim=2)
