"""``model.weights``: start a built network from a state dict, strictly.

The state dict comes from a file (``model.weights: PATH``: a state dict, or a dict with one under
``state_dict`` or ``model``, as a run's checkpoint has) or from torchvision by name
(``model.weights: torchvision:<Enum>.<MEMBER>`` or ``torchvision:DEFAULT``: fetched by
torchvision's own loader into torch.hub's cache, ``$TORCH_HOME/hub/checkpoints``); either is a
:class:`WeightsSource` and loads the same way. Either is read with the weights-only unpickler:
nothing in it runs. Its keys are the FrameStack's own (``stack.<d>.<layer>``) or, for a network
whose layers keep unique names of their own (torchvision's adapters), those names alone:
``layer1.0.conv1.weight`` is ``stack.1.layer1.0.conv1.weight``. Every key of the network must be
there with its shape and nothing else may be, so a file of another network, or of another
``model.norm``, fails in one line naming the first key that does not fit, not by training from
half-loaded weights. ``new_head``: the head (the last module) keeps its fresh initialisation and
the file's head keys are ignored, for a new class count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

from sideways_cli.models.stack import FrameStack
from sideways_cli.support.safe_load import UnsafeFile, load_failure, load_tensors, refusing_code

if TYPE_CHECKING:  # torchvision costs seconds to import: only where its weights are asked for
    from torchvision.models import WeightsEnum

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
OWN_PREFIX = "stack."


class WeightsError(ValueError):
    """A weights file that does not fit the network; the message names the file and the key."""


@dataclass(frozen=True)
class WeightsSource:
    """A state dict to start a network from; ``label`` names it in messages
    (``model.weights /path/w.pt``, ``model.weights torchvision:ResNet18_Weights.IMAGENET1K_V1``)."""

    label: str
    state: dict[str, torch.Tensor]


def _state_dict_in(data: Any, label: str) -> dict[str, torch.Tensor]:
    """The state dict ``data`` is or holds under ``state_dict`` or ``model``; WeightsError
    naming ``label`` when it holds none."""
    if isinstance(data, dict):
        for key in ("state_dict", "model"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{label}: holds no state dict (a mapping of names to tensors, or one "
                           "under 'state_dict' or 'model')")
    return data


def read_state_dict(path: Path) -> WeightsSource:
    """The state dict in ``path`` (tensors only: ``torch.load(weights_only=True)``)."""
    label = f"model.weights {path}"
    if not path.is_file():
        raise WeightsError(f"{label}: no such file; give a state dict saved with torch.save")
    try:
        data: Any = load_tensors(path)
    except UnsafeFile as exc:
        raise WeightsError(f"model.weights {exc}; give a state dict saved with torch.save") from None
    except Exception as exc:
        raise WeightsError(f"{label}: not a state dict torch.load(weights_only=True) can read "
                           f"({load_failure(exc)})") from None
    return WeightsSource(label, _state_dict_in(data, label))


def cached_path(url: str) -> Path:
    """Where torch.hub's loader keeps the file at ``url``: the file name of the URL in
    ``<torch.hub.get_dir()>/checkpoints`` (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def fetch_torchvision_weights(weights: WeightsEnum, name: str, progress: bool = False) -> WeightsSource:
    """The state dict of torchvision's ``weights`` (a WeightsEnum member; ``name``: how
    model.weights names it) by torchvision's own loader: read from torch.hub's cache, downloaded
    there first if absent (its hash checked, as torchvision's builders do). WeightsError naming
    the URL and the cache path when it cannot be downloaded, or the file when it cannot be read."""
    label = f"model.weights {name}"
    cached = cached_path(weights.url)
    was_cached = cached.is_file()
    try:
        # weights_only: torch.hub's loader would otherwise unpickle whatever the file holds
        data: Any = refusing_code(cached, lambda: weights.get_state_dict(
            progress=progress, check_hash=True, map_location="cpu", weights_only=True))
    except UnsafeFile as exc:
        raise WeightsError(f"{label}: {exc}; delete it and fetch torchvision's file again") from None
    except Exception as exc:
        if not was_cached and not cached.is_file():
            raise WeightsError(f"{label}: cannot download {weights.url} ({load_failure(exc)}); with "
                               f"no network, put the file at {cached} (TORCH_HOME sets the "
                               "folder)") from None
        raise WeightsError(f"{label}: {cached} is not a state dict torch.load(weights_only=True) "
                           f"can read ({load_failure(exc)}); delete it to download it again, or put "
                           f"{weights.url} there") from None
    return WeightsSource(label, _state_dict_in(data, f"{label} ({cached})"))


def _by_short_key(model: FrameStack) -> dict[str, str]:
    """A layer's name without ``stack.<d>.`` -> the network's key, where that name is unique."""
    counts: dict[str, list[str]] = {}
    for key in model.state_dict():
        rest = key.split(".", 2)[2]
        counts.setdefault(rest, []).append(key)
    return {rest: keys[0] for rest, keys in counts.items() if len(keys) == 1}


def _mapped(source: WeightsSource, model: FrameStack) -> dict[str, torch.Tensor]:
    """The source's tensors under the network's keys; an unknown key is a WeightsError."""
    short = _by_short_key(model)
    wanted = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in source.state.items():
        target = key if key in wanted else short.get(key)
        if target is None:
            raise WeightsError(f"{source.label}: unexpected key {key!r}: {_unexpected(key)}")
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


def load_weights(model: FrameStack, source: WeightsSource, new_head: bool = False) -> None:
    """Initialise ``model`` from ``source`` (:func:`read_state_dict`,
    :func:`fetch_torchvision_weights`), in place; WeightsError if it does not fit.
    ``new_head``: leave the last module as it is and ignore the source's keys for it."""
    head = f"{OWN_PREFIX}{len(model) - 1}." if new_head else None
    found = _mapped(source, model)
    if head is not None:
        found = {k: v for k, v in found.items() if not k.startswith(head)}
    _refuse_misfit(source.label, found, model, head)
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
