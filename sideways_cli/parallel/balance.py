"""How to split the module stack into stages: measured per-module tick costs and an exact partition.

Every tick each stage does the Sideways work of its modules, and all stages wait for the slowest:
throughput is set by the most expensive stage, so ``parallel.balance: auto`` measures what one
tick of each module costs (its forward at a full window and the VJP of one message, the two halves
of a tick) and picks the contiguous split that minimises the most expensive stage. The work is
timed through the chunked executor's own methods (:func:`time_windows`), so what is measured is
what runs; ``sideways_perf.macro_costs`` times the same calls at other window counts for the
throughput model. The sizes of the tensors crossing each boundary (an activation up, a message
down) come with the costs.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from sideways_cli.engine.clock import Schedule
from sideways_cli.engine.losses import CLASSIFY, Objective
from sideways_cli.engine.registers import Token
from sideways_cli.engine.sideways_chunked import ChunkedSideways
from sideways_cli.models import FrameStack
from sideways_cli.parallel.stages import stage_stack
from sideways_cli.support.errors import UserError
from sideways_cli.support.runtime import Autocast


@dataclass(frozen=True)
class ModuleCosts:
    """Per module, bottom first: median seconds of one tick's forward and backward, and bytes."""

    names: list[str]
    forward_s: list[float]
    backward_s: list[float]  # parameter gradients + the message for the module below (if any);
    # the head's includes its frame losses
    output_bytes: list[int]  # the activation module d sends up (its output frame)
    input_bytes: list[int]  # the message module d sends down (shaped like its input frame)

    # per-module fields, which a deeper stack built from this one copies (sideways_perf)
    PER_MODULE: ClassVar[tuple[str, ...]] = ("forward_s", "backward_s", "output_bytes",
                                             "input_bytes")

    @property
    def total_s(self) -> list[float]:
        """One tick with both halves busy: what a stage pays per module in steady state."""
        return [f + b for f, b in zip(self.forward_s, self.backward_s)]


def module_shapes(model: FrameStack,
                  frame_shape: tuple[int, ...]) -> list[tuple[torch.Size, torch.Size]]:
    """Each module's (input frame, output frame) shape for frames ``frame_shape`` [B, C, H, W]."""
    return [(x.shape, y.shape) for x, y in zero_frames(model, frame_shape, nullcontext)]


def zero_frames(model: FrameStack, frame_shape: tuple[int, ...],
                autocast: Autocast) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each module's input and output frame (shape and dtype: under AMP, bf16 above module 1)
    from a zero frame propagated through every module's full window, without a graph."""
    param = next(model.parameters())
    frame = torch.zeros(frame_shape, device=param.device, dtype=param.dtype)
    frames = []
    with torch.no_grad(), autocast():
        for module in model.stack:
            window = frame.unsqueeze(2).expand(-1, -1, module.window, *frame.shape[2:])
            out = module.forward_window(window)
            frames.append((frame, out))
            frame = out
    return frames


def frame_bytes(frames: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[int], list[int]]:
    """Bytes per module of the activation it sends up and of the message it sends down."""
    return ([out.numel() * out.element_size() for _, out in frames],
            [frame.numel() * frame.element_size() for frame, _ in frames])


def module_rules(model: FrameStack, objective: Objective = CLASSIFY,
                 autocast: Autocast = nullcontext) -> list[ChunkedSideways]:
    """One one-module chunked executor per module (``first=g`` of the whole network, so that
    module 1 sends no message and the head takes the frame losses), sharing its parameters."""
    return [ChunkedSideways(stage_stack(model, range(g, g + 1)), "continuous", "clip", 1,
                                objective, autocast, first=g, schedule=Schedule.of(model))
            for g in range(len(model))]


def time_windows(rule: ChunkedSideways, frame: torch.Tensor, out: torch.Tensor,
                 target: torch.Tensor, n: int, device: torch.device) -> tuple[float, ...]:
    """Seconds of one module's work on n windows, as the chunked executor does it: the forward
    without a graph (quiet), with one (busy), the VJP of n messages and (the head) the frame
    losses of n frames, from full windows of random inputs."""
    rule.reset()
    k = rule.model[0].window

    def feed(count: int) -> None:
        rule.feed_inputs(Token(torch.randn_like(frame), f, target) for f in range(count))

    feed(k - 1)
    rule.forward_module(0, k - 1, 0)  # a full register, as in steady state
    feed(n)
    start = clock(device)
    rule.forward_module(0, n, 0)
    quiet = clock(device) - start
    rule.take_outputs()
    feed(n)
    start = clock(device)
    graph = rule.forward_module(0, 0, n)
    busy = clock(device) - start
    loss = 0.0
    if rule.has_head:
        start = clock(device)
        rule.frame_losses()
        loss = clock(device) - start
    messages = [torch.randn_like(out) for _ in range(n)]
    start = clock(device)
    rule.vjp(0, graph, messages, n)
    vjp = clock(device) - start
    return quiet, busy, vjp, loss


def loss_target(objective: Objective, frame_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One frame's target for the head's losses: a label, or the frame itself."""
    b, c, *pixels = frame_shape
    return objective.frame_targets(torch.zeros(b, c, 1, *pixels, device=device),
                                   torch.zeros(b, dtype=torch.long, device=device))[0]


def measure_module_costs(model: FrameStack, frame_shape: tuple[int, ...], repeats: int = 5,
                         device: torch.device | str = "cpu", autocast: Autocast = nullcontext,
                         objective: Objective = CLASSIFY) -> ModuleCosts:
    """Median seconds per module of one tick's forward (with its graph) and one message's VJP
    (``model`` on ``device``). One warm-up round, then ``repeats`` rounds, each timing every
    module in turn, so that machine noise (other processes, frequency changes) falls on all
    modules alike."""
    device = torch.device(device)
    frames = zero_frames(model, frame_shape, autocast)
    rules = module_rules(model, objective, autocast)
    target = loss_target(objective, frame_shape, device)
    forward: list[list[float]] = [[] for _ in frames]
    backward: list[list[float]] = [[] for _ in frames]
    for round_ in range(repeats + 1):
        for d, (rule, (frame, out)) in enumerate(zip(rules, frames)):
            _, busy, vjp, loss = time_windows(rule, frame, out, target, 1, device)
            if round_:  # round 0 warms up allocators and kernels
                forward[d].append(busy)
                backward[d].append(vjp + loss)  # the head pays its frame losses every tick
    outputs, messages = frame_bytes(frames)
    return ModuleCosts(list(model.names), [statistics.median(s) for s in forward],
                       [statistics.median(s) for s in backward], outputs, messages)


def clock(device: torch.device) -> float:
    """Wall time once the device has finished what was queued (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def partition(costs: list[float], stages: int) -> list[int]:
    """Modules per stage, contiguous, each >= 1, minimising the most expensive stage (exact).

    Dynamic programming over suffixes: ``tail[s][i]`` is the least possible bottleneck of modules
    i.. in s stages. Stage costs are exactly rounded sums (math.fsum), so equal splits compare
    equal. Ties: the lower stages take as many modules as they can (the lexicographically
    largest sizes among the optimal splits).
    """
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} modules into {stages} stages of at least one module")
    span = np.full((n + 1, n + 1), np.inf)  # span[i, j]: one stage of modules i..j-1
    for i in range(n):
        for j in range(i + 1, n + 1):
            span[i, j] = math.fsum(costs[i:j])
    tail = [None, span[:, n]]  # tail[1][n] = inf: a stage of no modules is not allowed
    for _ in range(2, stages + 1):
        tail.append(np.maximum(span, tail[-1][None, :]).min(axis=1))
    best, sizes, i = tail[stages][0], [], 0
    for s in range(stages, 1, -1):
        fits = np.maximum(span[i], tail[s - 1]) <= best
        j = int(np.flatnonzero(fits).max())
        sizes.append(j - i)
        i = j
    return sizes + [n - i]


def stage_costs(costs: list[float], sizes: list[int]) -> list[float]:
    """Each stage's summed cost for a split ``sizes`` of ``costs``."""
    edges = np.cumsum([0, *sizes])
    return [math.fsum(costs[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def resolve_balance(balance: str | list[int], stages: int, modules: int,
                    costs: list[float] | None = None, names: list[str] | None = None) -> list[int]:
    """``parallel.balance`` -> modules per stage: ``auto`` partitions ``costs`` (one per module),
    a list is checked against the model. UserError when the config cannot fit the model."""
    listed = f" ({', '.join(names)})" if names else ""
    if stages > modules:
        raise UserError(f"parallel.stages={stages} but the model has only {modules} modules{listed}; "
                        f"set parallel.stages to at most {modules}")
    if balance == "auto":
        if costs is None or len(costs) != modules:
            raise ValueError(f"balance: auto needs one cost per module ({modules}), got {costs}")
        return partition(costs, stages)
    if len(balance) != stages or sum(balance) != modules:
        raise UserError(f"parallel.balance={list(balance)} must list parallel.stages={stages} "
                        f"module counts summing to the model's {modules} modules{listed}, "
                        f"got {len(balance)} summing to {sum(balance)}; fix the list or set "
                        f"parallel.balance: auto")
    return list(balance)
