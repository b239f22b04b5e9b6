"""Writes this process's torch.distributed operations and the host's waits on them, in program
order, to ``$SIDEWAYS_TRAFFIC_DIR/rank<global rank>-pid<pid>.jsonl`` in the format that
``tests/nccl_replay.py`` replays: a line per event, flushed as it is written, so a process that
crashes or hangs leaves everything it did.

- The functions are replaced in both ``torch.distributed`` and
  ``torch.distributed.distributed_c10d``, by the same wrapper: torch's ``P2POp`` checks its op
  against distributed_c10d's ``isend``/``irecv``, and torch's helpers call distributed_c10d's.
- Primitive ops are recorded, not the helpers built on them, since the primitives are what NCCL
  queues: ``broadcast_object_list`` is its two blocking broadcasts, ``all_gather_object`` its two
  all_gathers, ``send_object_list``/``recv_object_list`` their sends, receives or batches. Of
  nested calls only the outermost is recorded: ``batch_isend_irecv`` is one entry with its parts,
  not the isend/irecv it calls.
- A blocking call (``send``, ``recv``, a collective without ``async_op=True``) is an issue then a
  wait. An async one returns its Work wrapped: ``wait()``, and ``is_completed()`` when it answers
  True, record a wait (the host goes on knowing the op is done); the rest goes to the Work
  unrecorded (a wait through ``get_future()`` would be missed: neither the project nor
  torch.distributed.pipelining waits that way).
- A group is named by torch's own ``group_name``, which torch keeps the same on every rank (a
  creation count, every rank creating every group in the same order; a hash of the ranks for
  ``split_group``), after its ``group_desc``; the default group is "world"; peers are global
  ranks. ``new_group`` is not wrapped to number groups: DeviceMesh calls the ``new_group`` and
  ``split_group`` it imported before anything could wrap them.
- Not seen: DistributedDataParallel's gradient all_reduce, issued from C++ during the backward
  pass. It is a collective on one group, which the in-order rule cannot break as long as every
  member issues the same sequence (DDP's buckets are the same on every replica).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import json
import os
import sys
import threading
from types import FrameType, ModuleType
from typing import Any, Callable

DIRECTORY = "SIDEWAYS_TRAFFIC_DIR"
P2P = {"isend": ("send", False), "irecv": ("recv", False), "send": ("send", True),
       "recv": ("recv", True)}  # name -> (kind, blocking)
# name -> the argument holding this rank's contribution, whose size every member must agree on
COLLECTIVES = {"all_reduce": "tensor", "broadcast": "tensor", "reduce": "tensor",
               "all_gather": "tensor", "all_gather_into_tensor": "input_tensor",
               "reduce_scatter": "output", "reduce_scatter_tensor": "output", "gather": "tensor",
               "scatter": "tensor", "barrier": None}
ROOTS = {"broadcast": "src", "reduce": "dst", "gather": "dst", "scatter": "src"}
# frames skipped when saying where an op was issued: this file and torch's own wrappers
_NOT_THE_CALLER = (__file__, os.sep + "distributed_c10d.py", os.sep + "c10d_logger.py")

Described = tuple[Any, dict[str, Any], bool]  # (group, the issue's fields, blocking)
# a call's arguments -> what it issues, None where this rank is not in the group
Describer = Callable[[dict[str, Any]], Described | None]

_c10d: ModuleType  # torch.distributed.distributed_c10d, once installed
_lock = threading.Lock()
_nesting = threading.local()  # inside a recorded call: the calls it makes are its own business
_file = None
_ops = 0
_labels: dict[str, str] = {}  # torch's group_name -> the trace's name for it


class _InstallWhenImported(importlib.abc.MetaPathFinder):
    """Installs the recorder as soon as torch.distributed has been imported (with torch), so that
    a process that never imports torch pays nothing."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "torch.distributed":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def load_and_install(module: ModuleType) -> None:
            load(module)
            install(module)

        spec.loader.exec_module = load_and_install
        return spec


def install_when_imported() -> None:
    sys.meta_path.insert(0, _InstallWhenImported())


def install(dist: ModuleType) -> None:
    """Replaces the ops of ``dist`` (torch.distributed) and of distributed_c10d by recorders."""
    global _c10d
    _c10d = sys.modules["torch.distributed.distributed_c10d"]
    describers: dict[str, Describer] = {
        "batch_isend_irecv": _batch,
        **{name: functools.partial(_p2p, *P2P[name]) for name in P2P},
        **{name: functools.partial(_collective, name) for name in COLLECTIVES},
    }
    for name, describe in describers.items():
        wrapper = _recorded(getattr(_c10d, name), describe)
        setattr(_c10d, name, wrapper)
        setattr(dist, name, wrapper)


def _recorded(original: Callable, describe: Describer) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if getattr(_nesting, "inside", False):
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        described = describe(bound.arguments)
        if described is None:  # this rank is not in the group: torch does nothing
            return original(*args, **kwargs)
        group, fields, blocking = described
        op = _issue(group, fields)
        if blocking:
            _write({"ev": "wait", "op": op})
        _nesting.inside = True
        try:
            result = original(*args, **kwargs)
        finally:
            _nesting.inside = False
        if isinstance(result, _c10d.Work):
            return _RecordedWork(result, op)
        if isinstance(result, list):  # batch_isend_irecv's: each waits for the whole batch
            return [_RecordedWork(work, op) for work in result]
        return result

    return wrapper


class _RecordedWork:
    """A Work whose waits are recorded."""

    def __init__(self, work: Any, op: int):
        self._work, self._op = work, op

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        _write({"ev": "wait", "op": self._op})
        return self._work.wait(*args, **kwargs)

    def is_completed(self) -> bool:
        completed = self._work.is_completed()
        if completed:
            _write({"ev": "wait", "op": self._op})
        return completed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def _p2p(kind: str, blocking: bool, args: dict[str, Any]) -> Described | None:
    group = args["group"]
    if _c10d._rank_not_in_group(group):
        return None
    peer = _global_rank(group, args, "dst" if kind == "send" else "src")
    return group, {"kind": kind, "peer": peer, **_size(args["tensor"])}, blocking


def _batch(args: dict[str, Any]) -> Described:
    ops = args["p2p_op_list"]
    parts = [{"kind": "send" if op.op.__name__ == "isend" else "recv", "peer": op.peer,
              **_size(op.tensor)} for op in ops]
    return ops[0].group, {"kind": "batch", "parts": parts}, False  # torch: one group per batch


def _collective(name: str, args: dict[str, Any]) -> Described | None:
    group = args["group"]
    if _c10d._rank_not_in_group(group):
        return None
    title = name
    if name in ROOTS:
        way = "from" if ROOTS[name] == "src" else "to"
        title = f"{name} {way} {_global_rank(group, args, ROOTS[name])}"
    contribution = COLLECTIVES[name]
    size = _size(args[contribution]) if contribution else {"numel": 0, "dtype": ""}
    return group, {"kind": "collective", "name": title, **size}, not args["async_op"]


def _global_rank(group: Any, args: dict[str, Any], key: str) -> int | None:
    """The peer or root as a global rank, given as one (``dst``) or as a group rank (``group_dst``);
    None: a receive from any source."""
    if args[key] is not None or args.get(f"group_{key}") is None:
        return args[key]
    return _c10d.get_global_rank(group or _c10d._get_default_group(), args[f"group_{key}"])


def _size(tensor: Any) -> dict[str, Any]:
    return {"numel": tensor.numel(), "dtype": str(tensor.dtype).removeprefix("torch.")}


def _issue(group: Any, fields: dict[str, Any]) -> int:
    global _ops
    with _lock:
        _ops += 1
        op = _ops
    _write({"ev": "issue", "op": op, "group": _label(group), **fields, "at": _caller()})
    return op


def _label(group: Any) -> str:
    """The group's name in the trace; its members go into the trace the first time it is used."""
    default = _c10d._get_default_group()
    pg = group if group is not None else default
    if pg.group_name not in _labels:
        desc = getattr(pg, "group_desc", "")
        label = "world" if pg.group_name == default.group_name else \
            f"{desc if desc and desc != 'undefined' else 'group'}#{pg.group_name}"
        _labels[pg.group_name] = label
        _write({"ev": "group", "group": label, "ranks": _c10d.get_process_group_ranks(pg)})
    return _labels[pg.group_name]


def _caller() -> str:
    """Where the op was issued: the first frame outside torch.distributed's wrappers, then the
    project's frames that led there, up to three frames in all."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.endswith(_NOT_THE_CALLER):
        frame = frame.f_back
    chain = []
    while frame is not None and len(chain) < 3:
        if not chain or "sideways_cli" in frame.f_code.co_filename:
            chain.append(_where(frame))
        frame = frame.f_back
    return " < ".join(chain)


def _where(frame: FrameType) -> str:
    path = "/".join(frame.f_code.co_filename.split(os.sep)[-2:])
    return f"{path}:{frame.f_lineno} {frame.f_code.co_name}"


def _write(event: dict[str, Any]) -> None:
    """One line, flushed; the file is opened at the first event, once the global rank is known."""
    global _file
    with _lock:
        if _file is None:
            name = f"rank{_c10d.get_rank()}-pid{os.getpid()}.jsonl"
            _file = open(os.path.join(os.environ[DIRECTORY], name), "a", buffering=1)
        _file.write(json.dumps(event) + "\n")
