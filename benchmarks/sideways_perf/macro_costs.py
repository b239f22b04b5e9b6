"""What the chunked executor pays per call, as curves in the number of windows n: the costs the
throughput model of depth-parallel Sideways (``throughput_model.py``) simulates with.

A chunked stage does a few calls per macro tick, not one per tick, and their cost is far from
proportional to n (fixed per-call overhead, small kernels). Each module's calls are timed through
the executor's own methods (``sideways_cli.parallel.balance.time_windows``, which
``parallel.balance: auto`` times at n = 1), so the model prices what runs. Measurement tools, not
training: nothing in ``sideways_cli`` imports this package.
"""

from __future__ import annotations

import bisect
import statistics
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch

from sideways_cli.engine.losses import CLASSIFY, Objective
from sideways_cli.engine.sideways_chunked import ChunkedSideways
from sideways_cli.models import FrameStack
from sideways_cli.parallel.balance import (clock, frame_bytes, loss_target, module_rules,
                                           time_windows, zero_frames)
from sideways_cli.support.runtime import Autocast

MACRO_WINDOWS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class MacroCosts:
    """Per module, bottom first, median seconds of one macro-tick call at each of ``windows``
    window counts n: the forward without a graph (``quiet_s``), with one (``busy_s``), the VJP of n
    messages (``vjp_s``); the top's frame losses of n frames (``loss_s``); each module's optimizer
    step (``step_s``); and bytes per frame across each boundary, as in ``balance.ModuleCosts``.

    Between the measured counts a curve is linear, beyond the last it follows the last segment.
    ``concurrent``: how many processes measured at once (1: alone; see :func:`measure_macro_costs`).
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
        ``balance.partition`` balances."""
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
    """:class:`MacroCosts` of ``model`` for frames ``frame_shape`` [B, C, H, W], each call timed
    through the chunked executor's own methods on a one-module executor per module, from full
    windows of random inputs. A warm-up round, then ``repeats`` rounds, each timing every
    (module, n) in turn, so that machine noise falls on all alike; medians. Run it in a script
    with an ``if __name__ == "__main__"`` guard when ``concurrent`` > 1 (processes are spawned).

    ``concurrent`` > 1 runs ``concurrent - 1`` more processes repeating the same measurement
    meanwhile, so that caches and memory bandwidth are shared as when that many stages compute at
    once: use it for P >= 2 on CPU (``concurrent`` = min(P, cores)) and measure alone for P = 1;
    on GPUs stages own their devices, so measure alone. (How much it matters, measured:
    docs/benchmarks.md.)
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
                      *frame_bytes(frames), concurrent)


def _macro_timer(model: FrameStack, frame_shape: tuple[int, ...], windows: tuple[int, ...],
                 device: torch.device | str, autocast: Autocast, objective: Objective):
    """One-module rules, each module's (input, output) frame, and a function timing one round:
    every module in turn, every window count, [module][n] -> (quiet, busy, vjp, loss) seconds."""
    device = torch.device(device)
    frames = zero_frames(model, frame_shape, autocast)  # under AMP, bf16 frames above module 1
    rules = module_rules(model, objective, autocast)
    target = loss_target(objective, frame_shape, device)

    def timing() -> list[list[tuple[float, ...]]]:
        return [[time_windows(rule, frame, out, target, n, device) for n in windows]
                for rule, (frame, out) in zip(rules, frames)]

    return rules, frames, timing


def _time_step(rule: ChunkedSideways, repeats: int, device: torch.device) -> float:
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
        start = clock(device)
        rule.pseudo.write_mean()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if round_:
            seconds.append(clock(device) - start)
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
