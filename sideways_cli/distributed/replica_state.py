"""A rule's registers across data-parallel replicas, in the ordinary checkpoint's layout.

Replica r of R holds clips [r*b, (r+1)*b) of every batch of R*b, so its registers (activations,
windows, messages, targets: every tensor whose first dimension is the batch) are that slice of the
registers one process would hold for the whole batch. The checkpoint keeps the whole batch's:
replicas' tensors concatenated in replica order, which is what a single process, or any other
number of replicas (each taking its slice back), resumes from. Two kinds of entry need more:

- gradient messages: a frame's loss is a mean over the clips of the batch, so a replica's
  messages are R times the single process's for the same clips; concatenated, they are divided
  by R (and a replica's share multiplied back);
- pseudo-gradient sums are not per clip: every replica's are averaged before any update, so the
  checkpoint keeps their mean, and every replica continues from it (the mean of the sums is the
  single process's sum for the batch).

Clocks, counts and frame numbers are the same on every replica.
"""

from __future__ import annotations

from typing import Any

import torch

_AVERAGED = "pseudo"  # a rule's pseudo-gradient sums, in every layout
_MESSAGES = ("messages", "mailbox", "pending_message")  # gradient messages, in every layout
KIND_SLICE, KIND_MESSAGE, KIND_MEAN = "slice", "message", "mean"


def _kind(key: str, kind: str) -> str:
    if key == _AVERAGED:
        return KIND_MEAN
    return KIND_MESSAGE if key in _MESSAGES else kind


def merge_replica_states(states: list[Any], kind: str = KIND_SLICE) -> Any:
    """The whole batch's state from every replica's, in replica order."""
    first = states[0]
    if isinstance(first, torch.Tensor):
        if kind == KIND_MEAN:
            return torch.stack(states).mean(dim=0)
        merged = torch.cat(states)
        return merged / len(states) if kind == KIND_MESSAGE else merged
    if isinstance(first, dict):
        return {key: merge_replica_states([s[key] for s in states], _kind(key, kind)) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(merge_replica_states(list(items), kind) for items in zip(*states))
    if any(s != first for s in states):  # a clock or count that should agree
        raise ValueError(f"replicas disagree on {first!r} vs {states}")
    return first


def replica_share(state: Any, replica: int, replicas: int, kind: str = KIND_SLICE) -> Any:
    """Replica ``replica``'s slice of a whole batch's state (the inverse of the merge)."""
    if isinstance(state, torch.Tensor):
        if kind == KIND_MEAN:
            return state.clone()
        if len(state) % replicas:
            raise ValueError(f"a batch of {len(state)} does not split into {replicas} replicas")
        share = state.chunk(replicas)[replica].clone()
        return share * replicas if kind == KIND_MESSAGE else share
    if isinstance(state, dict):
        return {key: replica_share(value, replica, replicas, _kind(key, kind))
                for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(replica_share(item, replica, replicas, kind) for item in state)
    return state


def on_cpu(state: Any) -> Any:
    """``state`` with every tensor moved to the CPU: what may be pickled between processes whose
    devices differ."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {key: on_cpu(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(on_cpu(item) for item in state)
    return state
