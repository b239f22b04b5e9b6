"""``model.weights: PATH``: start a built network from a state-dict file, strictly.

The file holds a state dict (or a dict with one under ``state_dict`` or ``model``, as a run's
checkpoint has). Its keys are the FrameStack's own (``stack.<d>.<layer>``) or, for a network
whose layers keep unique names of their own (torchvision's adapters), those names alone:
``layer1.0.conv1.weight`` is ``stack.1.layer1.0.conv1.weight``. Every key of the network must be
there with its shape and nothing else may be, so a file of another network, or of another
``model.norm``, fails in one line naming the first key that does not fit, not by training from
half-loaded weights. ``new_head``: the head (the last module) keeps its fresh initialisation and
the file's head keys are ignored, for a new class count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sideways_cli.models.stack import FrameStack
from sideways_cli.support.safe_load import UnsafeFile, load_tensors

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
OWN_PREFIX = "stack."


class WeightsError(ValueError):
    """A weights file that does not fit the network; the message names the file and the key."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (tensors only: ``torch.load(weights_only=True)``)."""
    if not path.is_file():
        raise WeightsError(f"model.weights {path}: no such file; give a state dict saved with "
                           "torch.save")
    try:
        data: Any = load_tensors(path)
    except UnsafeFile as exc:
        raise WeightsError(f"model.weights {exc}; give a state dict saved with torch.save") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"model.weights {path}: not a state dict torch.load(weights_only=True) "
                           f"can read ({first})") from None
    if isinstance(data, dict):
        for key in ("state_dict", "model"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"model.weights {path}: holds no state dict (a mapping of names to "
                           "tensors, or one under 'state_dict' or 'model')")
    return data


def _by_short_key(model: FrameStack) -> dict[str, str]:
    """A layer's name without ``stack.<d>.`` -> the network's key, where that name is unique."""
    counts: dict[str, list[str]] = {}
    for key in model.state_dict():
        rest = key.split(".", 2)[2]
        counts.setdefault(rest, []).append(key)
    return {rest: keys[0] for rest, keys in counts.items() if len(keys) == 1}


def _mapped(path: Path, data: dict[str, torch.Tensor], model: FrameStack) -> dict[str, torch.Tensor]:
    """The file's tensors under the network's keys; an unknown key is a WeightsError."""
    short = _by_short_key(model)
    wanted = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in data.items():
        target = key if key in wanted else short.get(key)
        if target is None:
            raise WeightsError(f"model.weights {path}: unexpected key {key!r}: {_unexpected(key)}")
        out[target] = tensor
    return out


def _unexpected(key: str) -> str:
    """Why the network has no ``key``, and the fix."""
    if key.rpartition(".")[2] in STATISTICS:
        return ("a BatchNorm statistic, which model.norm: group has none of; model.norm: frozen "
                "keeps BatchNorm statistics (--set model.norm=frozen)")
    return ("the network has no such parameter or buffer; save the state dict of this very "
            "architecture (FrameStack keys 'stack.<d>....', or torchvision's own)")


def _refuse_misfit(source: str, found: dict[str, torch.Tensor], model: FrameStack,
                   head: str | None, fix: str | None = None) -> None:
    """WeightsError naming ``source`` and the first of the network's keys (those of ``head``
    aside) that ``found`` lacks or holds in another shape; ``fix``: what to do about it, else
    the advice for a weights file."""
    for key, tensor in model.state_dict().items():
        if head is not None and key.startswith(head):
            continue
        if key not in found:
            fix = fix or ("the file has no BatchNorm statistics (saved with model.norm: group?): "
                          "set model.norm=group" if key.rpartition(".")[2] in STATISTICS
                          else "save the state dict of this very architecture")
            raise WeightsError(f"{source}: missing key {key!r} (the file has "
                               f"{len(found)} of the network's keys); {fix}")
        if found[key].shape != tensor.shape:
            fix = fix or ("a head for another class count: --set model.new_head=true starts the "
                          "head fresh" if key.startswith(f"{OWN_PREFIX}{len(model) - 1}.")
                          else "save the state dict of this very architecture and its model.args")
            raise WeightsError(f"{source}: key {key!r} has shape "
                               f"{list(found[key].shape)} in the file, {list(tensor.shape)} in the "
                               f"network; {fix}")


def load_weights(model: FrameStack, path: Path, new_head: bool = False) -> None:
    """Initialise ``model`` from the file ``path``, in place; WeightsError if it does not fit.
    ``new_head``: leave the last module as it is and ignore the file's keys for it."""
    head = f"{OWN_PREFIX}{len(model) - 1}." if new_head else None
    found = _mapped(path, read_state_dict(path), model)
    if head is not None:
        found = {k: v for k, v in found.items() if not k.startswith(head)}
    _refuse_misfit(f"model.weights {path}", found, model, head)
    model.load_state_dict(found, strict=head is None)


def load_own_state(model: FrameStack, state: dict[str, torch.Tensor], source: str, fix: str) -> None:
    """Initialise ``model`` from ``state``, a state dict under the network's own keys (a run's
    checkpoint), in place; WeightsError naming ``source``, the first key that does not fit and
    ``fix``, rather than torch's list of every mismatch."""
    wanted = model.state_dict()
    for key in state:
        if key not in wanted:
            raise WeightsError(f"{source}: unexpected key {key!r}; {fix}")
    _refuse_misfit(source, state, model, None, fix)
    model.load_state_dict(state)
