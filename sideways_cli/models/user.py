"""Networks users bring: ``model.name`` names a builder outside the zoo.

``"my_package.my_module:build"`` imports a module (from the installed packages or the working
directory) and takes its function ``build``; ``"path/to/net.py:build"`` (or just
``"path/to/net.py"``, which means ``:build``) loads a file. The builder is called as the zoo's
are: ``build(outputs, **model.args)``, outputs being the classes for ``task: classify`` and the
image channels for ``task: reconstruct``, and must return a :class:`FrameStack` of
:class:`FrameModule`. Every failure is a :class:`BuilderError`: one line naming the builder and
what is wrong.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from sideways_cli.models.blocks import FrameModule
from sideways_cli.models.stack import FrameStack

DEFAULT_FUNCTION = "build"


class BuilderError(ValueError):
    """A user's builder that cannot be imported, called or used; the message says which and why."""


def is_user_builder(name: str) -> bool:
    # 'torchvision:<arch>' has a colon too, but names an adapter (torchvision_nets.py), not a
    # function to import
    if name.startswith("torchvision:"):
        return False
    return ":" in name or name.endswith(".py")


def _target(name: str) -> tuple[str, str]:
    """(module path or file, function name) of ``name``."""
    if name.endswith(".py"):
        return name, DEFAULT_FUNCTION
    target, _, function = name.rpartition(":")
    if not target or not function.isidentifier():
        raise BuilderError(f"model.name {name!r}: expected 'package.module:function' or "
                           "'path/to/file.py:function'")
    return target, function


def absolute(name: str) -> str:
    """``name`` with a relative file path made absolute (from the working directory), so a run
    directory's config names the same file from anywhere."""
    target, function = _target(name)
    if not target.endswith(".py") or Path(target).is_absolute():
        return name
    return f"{Path(target).expanduser().resolve()}:{function}"


def _import_file(name: str, path: Path) -> Any:
    if not path.is_file():
        raise BuilderError(f"model.name {name!r}: no file {path} (a path is taken from the "
                           f"working directory, {Path.cwd()})")
    # a name of its own per file, so two files called net.py do not replace each other
    module_name = "sideways_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _import_module(target: str) -> Any:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        # `python -m` puts the working directory on the path, the `sideways` script does not
        if exc.name != target.split(".")[0] or os.getcwd() in sys.path:
            raise
        sys.path.append(os.getcwd())
        return importlib.import_module(target)


@functools.cache
def load_builder(name: str) -> Callable[..., Any]:
    """The builder ``name`` names, imported once per process."""
    target, function = _target(name)
    try:
        module = (_import_file(name, Path(target).expanduser()) if target.endswith(".py")
                  else _import_module(target))
    except BuilderError:
        raise
    except Exception as exc:  # the user's code failed to import: say where, in one line
        raise BuilderError(f"model.name {name!r}: importing {target} failed: "
                           f"{type(exc).__name__}: {exc}") from None
    builder = getattr(module, function, None)
    if builder is None:
        raise BuilderError(f"model.name {name!r}: {target} has no {function!r}")
    if not callable(builder):
        raise BuilderError(f"model.name {name!r}: {function} in {target} is not callable "
                           f"({type(builder).__name__})")
    return builder


def build_user_model(name: str, outputs: int, args: dict[str, Any]) -> FrameStack:
    """Call the builder and check that what it returns is a frame-step stack."""
    builder = load_builder(name)
    call = f"{_target(name)[1]}({outputs}{''.join(f', {k}={v!r}' for k, v in args.items())})"
    try:
        model = builder(outputs, **args)
    except Exception as exc:
        raise BuilderError(f"model.name {name!r}: {call} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, FrameStack):
        raise BuilderError(f"model.name {name!r}: {call} returned a {type(model).__name__}, not a "
                           "sideways_cli.models.FrameStack")
    for d, module in enumerate(model.stack):
        if not isinstance(module, FrameModule):
            raise BuilderError(f"model.name {name!r}: module {d} ({model.names[d]}) is a "
                               f"{type(module).__name__}, not a sideways_cli.models.FrameModule")
        if not isinstance(module.window, int) or module.window < 1:
            raise BuilderError(f"model.name {name!r}: module {d} ({model.names[d]}) has window "
                               f"{module.window!r}; a window is a whole number of frames >= 1")
    return model


@torch.no_grad()
def validate_outputs(name: str, model: FrameStack, outputs: int, size: int, reconstruct: bool) -> None:
    """One forward of a 2-clip, 2-frame clip of ``size`` pixels: [B, K, T] logits of ``outputs``
    classes for a classifier, the clip's own shape for a reconstructor."""
    clip = torch.zeros(2, 3, 2, size, size, dtype=model.dtype)
    was_training = model.training
    model.eval()
    try:
        out = model(clip)
    except Exception as exc:
        raise BuilderError(f"model.name {name!r}: a clip of shape {list(clip.shape)} failed in the "
                           f"forward pass: {type(exc).__name__}: {exc}") from None
    finally:
        model.train(was_training)
    wanted = list(clip.shape) if reconstruct else [2, outputs, 2]
    if list(out.shape) != wanted:
        what = "the frames themselves" if reconstruct else f"[batch, {outputs} classes, time]"
        raise BuilderError(f"model.name {name!r}: a clip of shape {list(clip.shape)} gave "
                           f"{list(out.shape)}; it must give {wanted} ({what})")
