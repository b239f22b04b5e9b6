"""How to split the module stack into stages: measured per-module tick costs and an exact partition.

Every tick each stage does the Sideways work of its modules, and all stages wait for the slowest:
throughput is set by the most expensive stage, so ``parallel.balance: auto`` measures what one
tick of each module costs (its forward at a full window and the VJP of one message, the two halves
of the tick rule) and picks the contiguous split that minimises the most expensive stage. The sizes
of the tensors crossing each boundary (an activation up, a message down) come with the costs: the
throughput model (``throughput_model.py``) charges them to the link.

The chunked executor (``engine/sideways_batched.py``) calls each module once per macro tick over
n windows, so its model needs costs as functions of n instead: :func:`measure_macro_costs`.
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from sideways_cli.distributed.stages import stage_stack
from sideways_cli.engine.losses import CLASSIFY, Objective
from sideways_cli.engine.pipeline import Token
from sideways_cli.engine.rule import Autocast
from sideways_cli.engine.sideways_batched import TickBatchedSideways
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

    # per-module fields, which a deeper stack built from this one copies (throughput_model)
    PER_MODULE: ClassVar[tuple[str, ...]] = ("forward_s", "backward_s", "output_bytes",
                                             "input_bytes")

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


# --- macro-tick costs: what the chunked executor (engine/sideways_batched.py) pays per call ---

MACRO_WINDOWS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class MacroCosts:
    """Per module, bottom first, median seconds of one macro-tick call at each of ``windows``
    window counts n: the forward without a graph (``quiet_s``), with one (``busy_s``), the VJP of n
    messages (``vjp_s``); the top's frame losses of n frames (``loss_s``); each module's optimizer
    step (``step_s``); and bytes per frame across each boundary, as in :class:`ModuleCosts`.

    A chunked stage does a few such calls per macro tick, not one per tick: their cost is far from
    proportional to n (fixed per-call overhead, small kernels), hence a curve in n rather than a
    per-tick cost. Between the measured counts it is linear, beyond the last it follows the last
    segment. ``concurrent``: how many processes measured at once (1: alone; see
    :func:`measure_macro_costs`).
    """

    names: list[str]
    windows: list[int]
    quiet_s: list[list[float]]
    busy_s: list[list[float]]
    vjp_s: list[list[float]]
    loss_s: list[float]
    step_s: list[float]
    output_bytes: list[int]
    input_bytes: list[int]
    concurrent: int = 1

    # per-module fields, which a deeper stack built from this one copies (throughput_model)
    PER_MODULE: ClassVar[tuple[str, ...]] = ("quiet_s", "busy_s", "vjp_s", "step_s",
                                             "output_bytes", "input_bytes")

    def quiet(self, d: int, n: int) -> float:
        return interpolate(self.windows, self.quiet_s[d], n)

    def busy(self, d: int, n: int) -> float:
        return interpolate(self.windows, self.busy_s[d], n)

    def vjp(self, d: int, n: int) -> float:
        return interpolate(self.windows, self.vjp_s[d], n)

    def losses(self, n: int) -> float:
        return interpolate(self.windows, self.loss_s, n)

    def full_s(self, chunk: int) -> list[float]:
        """Each module's steady-state macro tick of ``chunk`` ticks, every window busy: what
        :func:`partition` balances."""
        return [self.busy(d, chunk) + self.vjp(d, chunk) for d in range(len(self.names))]


def interpolate(windows: list[int], seconds: list[float], n: float) -> float:
    """Piecewise-linear seconds at n windows (0 at n = 0: no call is made), extrapolated from
    the nearest measured segment outside ``windows``, never below 0."""
    if n <= 0:
        return 0.0
    if len(windows) == 1:
        return seconds[0] * n / windows[0]
    i = min(max(bisect.bisect_left(windows, n), 1), len(windows) - 1)  # segment [i-1, i]
    (n0, n1), (s0, s1) = windows[i - 1:i + 1], seconds[i - 1:i + 1]
    return max(0.0, s0 + (s1 - s0) * (n - n0) / (n1 - n0))


def measure_macro_costs(model: FrameStack, frame_shape: tuple[int, ...],
                        windows: tuple[int, ...] = MACRO_WINDOWS, repeats: int = 5,
                        device: torch.device | str = "cpu", autocast: Autocast = nullcontext,
                        objective: Objective = CLASSIFY, concurrent: int = 1) -> MacroCosts:
    """:class:`MacroCosts` of ``model`` for frames ``frame_shape`` [B, C, H, W], timed through the
    chunked executor's own methods (``forward_module``, ``vjp``, ``frame_losses``) on a one-module
    :class:`TickBatchedSideways` per module (``first=g``, ``depth=D``: module 1 sends no message),
    from full windows of random inputs. A warm-up round, then ``repeats`` rounds, each timing every
    (module, n) in turn, so that machine noise falls on all alike; medians. Run it in a script
    with an ``if __name__ == "__main__"`` guard when ``concurrent`` > 1 (processes are spawned).

    ``concurrent`` > 1 runs ``concurrent - 1`` more processes repeating the same measurement
    meanwhile, so that caches and memory bandwidth are shared as when that many stages compute at
    once. Use it for P >= 2 (``concurrent`` = min(P, cores)) and measure alone for P = 1: on 2
    shared CPU cores (demo c3d, B=16, 32x32, three rounds, each measuring just before real runs)
    the concurrent costs were 3-6% above those measured alone, and they moved the 2-stage
    predictions from 3-11% (median 7%) above the measured frames/s to -1..+10% (median 5%),
    while alone costs predicted one process within -3..+6%. The rest of the 2-stage gap is not
    compute: timed inside a 2-stage run, its module calls cost what this measures (within 5%);
    it waits longer than the model for some transfers, delivered a few ms after their sender
    finished (``throughput_model.py``'s docstring). On GPUs stages own their devices: measure
    alone.
    """
    if repeats < 1 or concurrent < 1:
        raise ValueError(f"repeats and concurrent must be >= 1, got {repeats}, {concurrent}")
    if concurrent > 1:
        with _background_load(concurrent - 1, model, frame_shape, windows, device, autocast,
                              objective):
            return _measure_macro(model, frame_shape, windows, repeats, device, autocast,
                                  objective, concurrent)
    return _measure_macro(model, frame_shape, windows, repeats, device, autocast, objective, 1)


def _measure_macro(model: FrameStack, frame_shape: tuple[int, ...], windows: tuple[int, ...],
                   repeats: int, device: torch.device | str, autocast: Autocast,
                   objective: Objective, concurrent: int) -> MacroCosts:
    rules, frames, timing = _macro_timer(model, frame_shape, windows, device, autocast, objective)
    timing()  # warms up allocators and kernels
    rounds = [timing() for _ in range(repeats)]
    # med[g][n][i]: (quiet, busy, vjp, loss) i of module g at windows[n]
    med = [[[statistics.median(column) for column in zip(*samples)]
            for samples in zip(*(r[g] for r in rounds))] for g in range(len(model))]
    per_module = [[[at_n[i] for at_n in med[g]] for g in range(len(model))] for i in range(3)]
    return MacroCosts(list(model.names), list(windows), *per_module,
                      [at_n[3] for at_n in med[-1]],
                      [_time_step(rule, repeats, torch.device(device)) for rule in rules],
                      [out.numel() * out.element_size() for _, out in frames],
                      [frame.numel() * frame.element_size() for frame, _ in frames], concurrent)


def _macro_timer(model: FrameStack, frame_shape: tuple[int, ...], windows: tuple[int, ...],
                 device: torch.device | str, autocast: Autocast, objective: Objective):
    """One-module rules, each module's (input, output) frame, and a function timing one round:
    every module in turn, every window count, [module][n] -> (quiet, busy, vjp, loss) seconds."""
    device = torch.device(device)
    frames = _zero_frames(model, frame_shape, autocast)  # under AMP, bf16 frames above module 1
    rules = [TickBatchedSideways(stage_stack(model, range(g, g + 1)), "continuous", "clip", 1,
                                 objective, autocast, first=g, depth=len(model))
             for g in range(len(model))]
    b, c, *pixels = frame_shape
    target = objective.frame_targets(torch.zeros(b, c, 1, *pixels, device=device),
                                     torch.zeros(b, dtype=torch.long, device=device))[0]

    def timing() -> list[list[tuple[float, ...]]]:
        return [[_time_macro(rule, frame, out, target, n, device) for n in windows]
                for rule, (frame, out) in zip(rules, frames)]

    return rules, frames, timing


def _time_macro(rule: TickBatchedSideways, frame: torch.Tensor, out: torch.Tensor,
                target: torch.Tensor, n: int, device: torch.device) -> tuple[float, ...]:
    """Seconds of one module's quiet forward of n windows, busy forward of n windows, VJP of n
    messages and (the head) frame losses of n frames, from full windows of random inputs."""
    rule.reset()
    k = rule.model[0].window

    def feed(count: int) -> None:
        rule.inbox[0].extend(Token(torch.randn_like(frame), f, target) for f in range(count))

    feed(k - 1)
    rule.forward_module(0, k - 1, 0)  # a full register, as in steady state
    feed(n)
    start = _clock(device)
    rule.forward_module(0, n, 0)
    quiet = _clock(device) - start
    rule.inbox[-1].clear()
    feed(n)
    start = _clock(device)
    graph = rule.forward_module(0, 0, n)
    busy = _clock(device) - start
    loss = 0.0
    if rule.has_head:
        start = _clock(device)
        rule.frame_losses()
        loss = _clock(device) - start
    messages = [torch.randn_like(out) for _ in range(n)]
    start = _clock(device)
    rule.vjp(0, graph, messages, n)
    vjp = _clock(device) - start
    return quiet, busy, vjp, loss


def _time_step(rule: TickBatchedSideways, repeats: int, device: torch.device) -> float:
    """Median seconds of the end of a batch for one module: pseudo-gradient mean into ``.grad``
    and an AdamW step (the trainer's default optimizer)."""
    params = [p for group in rule.params for p in group]
    if not params:
        return 0.0
    originals = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=0.0)
    seconds = []
    for round_ in range(repeats + 1):
        rule.pseudo.add(0, [torch.zeros_like(p) for p in params], 1)
        start = _clock(device)
        rule.pseudo.write_mean()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if round_:
            seconds.append(_clock(device) - start)
    with torch.no_grad():  # AdamW's weight decay moves weights even at lr 0 on some versions
        for p, original in zip(params, originals):
            p.copy_(original)
    return statistics.median(seconds)


@contextmanager
def _background_load(processes: int, model: FrameStack, frame_shape: tuple[int, ...],
                     windows: tuple[int, ...], device: torch.device | str, autocast: Autocast,
                     objective: Objective):
    """``processes`` processes repeating the same measurement until the block ends; it starts
    once each has finished a warm-up round."""
    context = torch.multiprocessing.get_context("spawn")
    stop, ready = context.Event(), [context.Event() for _ in range(processes)]
    workers = [context.Process(target=_load, daemon=True,
                               args=(model, frame_shape, windows, str(device), autocast,
                                     objective, torch.get_num_threads(), stop, r))
               for r in ready]
    for worker in workers:
        worker.start()
    try:
        for worker, r in zip(workers, ready):
            while not r.wait(0.5):
                if not worker.is_alive():  # e.g. a script without a __main__ guard, under spawn
                    raise RuntimeError(f"background load process {worker.pid} exited with "
                                       f"{worker.exitcode} before its first round")
        yield
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)


def _load(model: FrameStack, frame_shape: tuple[int, ...], windows: tuple[int, ...],
          device: str, autocast: Autocast, objective: Objective, threads: int, stop,
          ready) -> None:
    torch.set_num_threads(threads)
    timing = _macro_timer(model, frame_shape, windows, device, autocast, objective)[2]
    while not stop.is_set():
        timing()
        ready.set()
