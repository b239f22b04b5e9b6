"""The frame-step contract, checked on a network: what the engine relies on (docs/sideways.md).

Per module, on a random clip propagated through the modules below it:

* ``tick == clip``: the module's output at every tick, from its register window, equals its
  whole-clip output (property 1); and the whole network's tick-by-tick forward equals its clip
  forward;
* ``causal``: changing frames from t on changes none of its outputs before t;
* ``per sample``: changing one clip of the batch changes none of another clip's outputs;
* ``no batch statistics``: no BatchNorm that normalises with the batch's statistics in training.

Then the gradients: on a static video with window-1 modules Sideways' pseudo-gradients equal BP's
(property 3), and on any video the top module's are exact (property 4).

Everything runs in training mode, as the engine trains, with dropout off (its masks would differ
between any two passes), in float64 where the network allows, so a row fails on a broken contract
and not on round-off.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from sideways_cli.engine import BackpropRule, SidewaysRule
from sideways_cli.engine.losses import Objective
from sideways_cli.engine.probes import make_video, module_gradients
from sideways_cli.engine.registers import tick_forward
from sideways_cli.models import FrameModule, FrameStack
from sideways_cli.models.norms import trainable_batchnorm

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}  # relative, of the largest difference
GRADIENT_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}  # relative, of the vectors' norms

FIXES = {
    "tick == clip": "valid(x) must give one output per full window of `window` inputs and use "
                    "nothing but the frames of that window",
    "causal": "pad time on the past side only (FrameModule.forward pads window-1 frames before "
              "the clip) and let valid() see no later frame",
    "per sample": "normalise per sample and per frame (GroupNorm) and reduce over no batch "
                  "dimension",
    "static: sideways == bp": "with every window 1 this follows from tick == clip; fix that row",
    "top exact": "the top module must have window 1 and compute its loss per frame",
}


@dataclass
class Row:
    """One property of one module (``module`` None: of the whole network)."""

    property: str
    module: int | None
    name: str
    ok: bool | None  # None: does not apply to this network
    detail: str
    fix: str = ""
    difference: float | None = None  # relative, where the property is an equality

    def as_dict(self) -> dict:
        return asdict(self)


def failures(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.ok is False]


def causes(rows: list[Row]) -> list[Row]:
    """The first failing property of each failing module: what to fix (the module's other
    failures, the network's and the modules' above follow from it); the network's own where no
    module fails."""
    broken = failures(rows)
    first: dict[int | None, Row] = {}
    for row in [r for r in broken if r.module is not None] or broken:
        first.setdefault(row.module, row)
    return list(first.values())


def contract_rows(model: FrameStack, clip: torch.Tensor, labels: torch.Tensor,
                  objective: Objective, batchnorm_fix: str, gradients: bool = True) -> list[Row]:
    """Every property's rows for ``model`` on ``clip``; the gradient properties only where the
    forward ones hold (the rules cannot even run on a module that drops frames)."""
    rows = batchnorm_rows(model, batchnorm_fix) + module_rows(model, clip)
    if not gradients:
        return rows
    if failures(rows):
        return rows + [Row(prop, None, "network", None, "not measured: a forward property fails")
                       for prop in ("static: sideways == bp", "top exact")]
    return rows + gradient_rows(model, clip, labels, objective)


@contextmanager
def training_without_dropout(model: nn.Module) -> Iterator[None]:
    """Training mode (BatchNorm would use batch statistics, as in a training step), dropout off."""
    was_training = model.training
    model.train()
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    for m in dropouts:
        m.eval()
    try:
        yield
    finally:
        model.train(was_training)


def in_float64(model: FrameStack, clip: torch.Tensor) -> FrameStack:
    """A float64 copy of ``model`` on the CPU when its layers take ``clip`` in float64, else a
    float32 copy."""
    copied = copy.deepcopy(model).cpu()
    try:
        double = copied.double()
        with torch.no_grad():
            double(clip[:1, :, :1].double())
        return double
    except Exception:  # a layer that only runs in float32; compare with float32's tolerance
        return copied.float()


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() / scale


def module_inputs(model: FrameStack, clip: torch.Tensor) -> list[torch.Tensor]:
    """The whole-clip input of every module, bottom first."""
    inputs, x = [], clip
    with torch.no_grad():
        for module in model.stack:
            inputs.append(x)
            x = module(x)
    return inputs


def tick_outputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's outputs tick by tick: at tick t its register window holds inputs t-k+1..t,
    zeros before the first (docs/sideways.md, validity)."""
    k = module.window
    padded = torch.cat([x.new_zeros((*x.shape[:2], k - 1, *x.shape[3:])), x], dim=2)
    return torch.stack([module.forward_window(padded[:, :, t:t + k]) for t in range(x.shape[2])],
                       dim=2)


def _row(prop: str, d: int | None, name: str, difference: float, tolerance: float,
         what: str) -> Row:
    ok = difference <= tolerance
    return Row(prop, d, name, ok, f"{what}: relative difference {difference:.1e}",
               "" if ok else FIXES[prop], difference)


def _measured(prop: str, d: int | None, name: str, difference: Callable[[], float],
              tolerance: float, what: str) -> Row:
    """The row of one comparison; a comparison that cannot even run fails with its error."""
    try:
        return _row(prop, d, name, difference(), tolerance, what)
    except Exception as exc:
        return Row(prop, d, name, False, f"{what}: {type(exc).__name__}: {exc}", FIXES[prop])


def _one_module(module: FrameModule, d: int, name: str, x: torch.Tensor,
                tolerance: float) -> list[Row]:
    whole = module(x)
    if whole.shape[2] != x.shape[2]:
        return [Row("tick == clip", d, name, False, f"{x.shape[2]} input frames gave "
                    f"{whole.shape[2]} outputs", FIXES["tick == clip"])]
    t0 = x.shape[2] // 2
    later = x.clone()
    later[:, :, t0:] = torch.randn_like(later[:, :, t0:])
    other = x.clone()
    other[1:] = torch.randn_like(other[1:])
    # the most specific first: a module that mixes clips or sees later frames fails tick == clip
    # too, and the first failure is the one reported
    return [
        _measured("per sample", d, name, lambda: relative_difference(module(other)[0], whole[0]),
                  tolerance, "clip 0's outputs after changing the others"),
        _measured("causal", d, name, lambda: relative_difference(
            module(later).narrow(2, 0, t0), whole.narrow(2, 0, t0)), tolerance,
            f"outputs before frame {t0} after changing frames {t0}-"),
        _measured("tick == clip", d, name, lambda: relative_difference(tick_outputs(module, x), whole),
                  tolerance, "ticks vs clip"),
    ]


def module_rows(model: FrameStack, clip: torch.Tensor) -> list[Row]:
    """tick == clip, causal and per sample for every module, then the network's tick path."""
    tolerance = TOLERANCE[model.dtype]
    rows: list[Row] = []
    with training_without_dropout(model), torch.no_grad():
        for d, x in enumerate(module_inputs(model, clip)):
            rows += _one_module(model.stack[d], d, model.names[d], x, tolerance)
        rows.append(_measured("tick == clip", None, "network", lambda: relative_difference(
            tick_forward(model, clip), model(clip)), tolerance,
            f"{len(model)} modules' pipelined forward vs clip"))
    return rows


def batchnorm_rows(model: FrameStack, fix: str) -> list[Row]:
    found = {d: layer for d, _, layer in trainable_batchnorm(model)}
    return [Row("no batch statistics", d, name, d not in found,
                f"{found[d]}: BatchNorm in training mode" if d in found else "none",
                fix if d in found else "") for d, name in enumerate(model.names)]


def gradient_rows(model: FrameStack, clip: torch.Tensor, labels: torch.Tensor,
                  objective: Objective) -> list[Row]:
    """Property 3 (static video, every window 1) per module, and property 4 (the top module)."""
    tolerance = GRADIENT_TOLERANCE[model.dtype]
    top = len(model) - 1
    with training_without_dropout(model):
        rows = []
        wide = [d for d, k in enumerate(model.windows) if k > 1]
        if wide:
            rows.append(Row("static: sideways == bp", None, "network", None,
                            f"module {wide[0]} ({model.names[wide[0]]}) has window "
                            f"{model.windows[wide[0]]}; the property is for window-1 networks"))
        else:
            static = make_video(clip, "static")
            for d, (bp, sw) in enumerate(gradients(model, static, labels, objective)):
                rows.append(_gradient_row("static: sideways == bp", d, model.names[d], bp, sw,
                                          tolerance))
        if model.windows[top] > 1:
            rows.append(Row("top exact", top, model.names[top], False,
                            f"the top module has window {model.windows[top]}", FIXES["top exact"]))
        else:
            bp, sw = gradients(model, clip, labels, objective)[top]
            rows.append(_gradient_row("top exact", top, model.names[top], bp, sw, tolerance))
    return rows


def gradients(model: FrameStack, clip: torch.Tensor, labels: torch.Tensor,
              objective: Objective) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(BP, Sideways) flat gradient per module from the same weights and clip, no step taken."""
    bp = module_gradients(model, BackpropRule(model, objective), clip, labels)
    sw = module_gradients(model, SidewaysRule(model, "reset", "clip", objective), clip, labels)
    return list(zip(bp, sw))


def _gradient_row(prop: str, d: int, name: str, bp: torch.Tensor, sw: torch.Tensor,
                  tolerance: float) -> Row:
    if bp.numel() == 0:
        return Row(prop, d, name, None, "no parameters")
    difference = ((sw - bp).norm() / bp.norm().clamp_min(1e-30)).item()
    return _row(prop, d, name, difference, tolerance, "Sideways vs BP")
