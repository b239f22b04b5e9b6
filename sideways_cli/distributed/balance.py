"""How to split the module stack into stages: measured per-module tick costs and an exact partition.

Every tick each stage does the Sideways work of its modules, and all stages wait for the slowest:
throughput is set by the most expensive stage, so ``parallel.balance: auto`` measures what one
tick of each module costs (its forward at a full window and the VJP of one message, the two halves
of the tick rule) and picks the contiguous split that minimises the most expensive stage. The sizes
of the tensors crossing each boundary (an activation up, a message down) come with the costs: the
throughput model (``throughput_model.py``) charges them to the link.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from sideways_cli.engine.rule import Autocast
from sideways_cli.errors import UserError
from sideways_cli.models import FrameStack


@dataclass(frozen=True)
class ModuleCosts:
    """Per module, bottom first: median seconds of one tick's forward and backward, and bytes."""

    names: list[str]
    forward_s: list[float]
    backward_s: list[float]  # parameter gradients + the message for the module below (if any)
    output_bytes: list[int]  # the activation module d sends up (its output frame)
    input_bytes: list[int]  # the message module d sends down (shaped like its input frame)

    @property
    def total_s(self) -> list[float]:
        """One tick with both halves busy: what a stage pays per module in steady state."""
        return [f + b for f, b in zip(self.forward_s, self.backward_s)]


def module_shapes(model: FrameStack,
                  frame_shape: tuple[int, ...]) -> list[tuple[torch.Size, torch.Size]]:
    """Each module's (input frame, output frame) shape for frames ``frame_shape`` [B, C, H, W]."""
    return [(x.shape, y.shape) for x, y in _zero_frames(model, frame_shape, nullcontext)]


def _zero_frames(model: FrameStack, frame_shape: tuple[int, ...],
                 autocast: Autocast) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each module's input and output frame (shape and dtype) from a zero frame propagated
    through every module's full window, without a graph."""
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


def measure_module_costs(model: FrameStack, frame_shape: tuple[int, ...], repeats: int = 5,
                         device: torch.device | str = "cpu",
                         autocast: Autocast = nullcontext) -> ModuleCosts:
    """Median seconds per module of one tick's forward and of one message's VJP (``model`` on
    ``device``). One warm-up round, then ``repeats`` rounds, each timing every module in turn, so
    that machine noise (other processes, frequency changes) falls on all modules alike."""
    device = torch.device(device)
    frames = _zero_frames(model, frame_shape, autocast)  # under AMP, bf16 frames above module 1
    forward = [[] for _ in frames]
    backward = [[] for _ in frames]
    outputs, messages = [0] * len(frames), [0] * len(frames)
    for round_ in range(repeats + 1):
        for d, (frame, out) in enumerate(frames):
            fwd, bwd, outputs[d], messages[d] = _time_tick(model, d, frame, out, device, autocast)
            if round_:  # round 0 warms up allocators and kernels
                forward[d].append(fwd)
                backward[d].append(bwd)
    return ModuleCosts(list(model.names), [statistics.median(s) for s in forward],
                       [statistics.median(s) for s in backward], outputs, messages)


def _time_tick(model: FrameStack, d: int, frame: torch.Tensor, out: torch.Tensor,
               device: torch.device, autocast: Autocast) -> tuple[float, float, int, int]:
    """Seconds of module d's forward at a random full window and of the VJP of a random message,
    as ``sideways_batched`` does them for one tick; with the bytes of its output and of the
    message below (for the first module, which sends none, those of its input frame)."""
    module = model[d]
    k, conv = module.window, module.first_conv()
    params = [p for p in module.parameters() if p.requires_grad]
    b, c, *pixels = frame.shape
    window = torch.randn(b, c, k, *pixels, device=device, dtype=frame.dtype).requires_grad_(d > 0)
    message = torch.randn(out.shape, device=device, dtype=out.dtype)
    start = _clock(device)
    with autocast():
        output = module.forward_window(window)
    fwd = _clock(device) - start
    if k > 1 and conv is not None:
        # the batched engine's cheap path: the conv's output gradient gives the slot-summed
        # message in one 2D transposed convolution instead of the window's full input gradient
        newest = window.detach()[:, :, k - 1:].requires_grad_(d > 0)
        with autocast():
            conv_out = conv(window.detach())
            graph_out = module.after_conv(conv_out, newest).select(2, 0)
        start = _clock(device)
        grads = torch.autograd.grad(graph_out, params + ([conv_out, newest] if d else []),
                                    grad_outputs=message, allow_unused=True)
        below = None
        if d:
            below = conv.slot_summed_input_grad(grads[-2].select(2, 0), frame.shape, k)
            if grads[-1] is not None:  # a residual path reads the newest input too
                below = below + grads[-1].select(2, 0)
    else:
        start = _clock(device)
        grads = torch.autograd.grad(output, params + ([window] if d else []),
                                    grad_outputs=message, allow_unused=True)
        below = grads[-1].sum(dim=2) if d else None
    bwd = _clock(device) - start
    sent = below if below is not None else window[:, :, 0]
    return fwd, bwd, output.numel() * output.element_size(), sent.numel() * sent.element_size()


def _clock(device: torch.device) -> float:
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


def resolve_balance(balance: str | list[int], stages: int, depth: int,
                    costs: list[float] | None = None, names: list[str] | None = None) -> list[int]:
    """``parallel.balance`` -> modules per stage: ``auto`` partitions ``costs`` (one per module),
    a list is checked against the model. UserError when the config cannot fit the model."""
    listed = f" ({', '.join(names)})" if names else ""
    if stages > depth:
        raise UserError(f"parallel.stages={stages} but the model has only {depth} modules{listed}; "
                        f"set parallel.stages to at most {depth}")
    if balance == "auto":
        if costs is None or len(costs) != depth:
            raise ValueError(f"balance: auto needs one cost per module ({depth}), got {costs}")
        return partition(costs, stages)
    if len(balance) != stages or sum(balance) != depth:
        raise UserError(f"parallel.balance={list(balance)} must list parallel.stages={stages} "
                        f"module counts summing to the model's {depth} modules{listed}, "
                        f"got {len(balance)} summing to {sum(balance)}; fix the list or set "
                        f"parallel.balance: auto")
    return list(balance)
