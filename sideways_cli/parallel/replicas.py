"""Data parallelism: one stage's process group across the replicas (docs/sideways.md, "Depth
and data parallelism"). Each replica trains an equal shard of every batch; before every optimizer step each
module's gradient, exact or pseudo, is averaged over the replicas, so every replica applies the
same update and R replicas of b clips equal one process of R*b clips.

Every collective here waits at most ``parallel.timeout_s`` (the group was created with it), so a
replica that dies or hangs ends the job instead of blocking it, with a message naming it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from sideways_cli.parallel.links import StageFailure, bounded_wait, why_silent
from sideways_cli.parallel.resharding import replica_share

BUCKET_BYTES = 25 << 20  # gradients reduced per collective call: as DistributedDataParallel does


class ReplicaGroup:
    """Stage ``stage`` of replica ``replica``, and the same stage of every other replica."""

    def __init__(self, group: dist.ProcessGroup, replica: int, replicas: int, stage: int,
                 stages: int, timeout_s: float, device: torch.device):
        self.group, self.replica, self.replicas = group, replica, replicas
        self.stage, self.stages = stage, stages
        self.timeout, self.device = timedelta(seconds=timeout_s), device

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Every ``.grad`` (those set: the same on every replica, which runs the same schedule)
        replaced by its mean over the replicas, in buckets of about BUCKET_BYTES."""
        grads = [p.grad for p in params if p.grad is not None]
        for bucket in _buckets(grads):
            flat = _flatten_dense_tensors(bucket)
            self._reduce(flat, dist.ReduceOp.SUM, "averaging the gradients")
            flat /= self.replicas
            for grad, averaged in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                grad.copy_(averaged)

    def sum_(self, tensor: torch.Tensor, doing: str) -> torch.Tensor:
        """``tensor`` summed over the replicas, in place."""
        return self._reduce_anywhere(tensor, dist.ReduceOp.SUM, doing)

    def max_(self, tensor: torch.Tensor, doing: str) -> torch.Tensor:
        """``tensor``'s elementwise maximum over the replicas, in place."""
        return self._reduce_anywhere(tensor, dist.ReduceOp.MAX, doing)

    def _reduce_anywhere(self, tensor: torch.Tensor, op: dist.ReduceOp, doing: str) -> torch.Tensor:
        """``tensor`` reduced in place wherever it lives: through this group's device, the only
        one whose tensors its backend moves."""
        moved = tensor.to(self.device)
        self._reduce(moved, op, doing)
        tensor.copy_(moved)
        return tensor

    def own_share(self, rule_state: Any) -> Any:
        """This replica's slice of the whole batch's registers (``resharding.merge_replica_states``
        joins them)."""
        return replica_share(rule_state, self.replica, self.replicas)

    def _reduce(self, tensor: torch.Tensor, op: dist.ReduceOp, doing: str) -> None:
        bounded_wait(lambda: dist.all_reduce(tensor, op=op, group=self.group, async_op=True),
                     self.timeout, lambda exc, _: self.failure(doing, exc))

    def failure(self, doing: str, exc: BaseException | None) -> StageFailure:
        """Of two replicas the silent one is the other; of more the backend does not say which."""
        other = f"replica {1 - self.replica}" if self.replicas == 2 else "another replica"
        return StageFailure(f"replica {self.replica} stage {self.stage}, {doing}: "
                            f"{why_silent(f'{other} stage {self.stage}', exc, self.timeout)}")


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive runs of tensors of one dtype and device, each at most BUCKET_BYTES (or one)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        fits = buckets and size + nbytes <= BUCKET_BYTES and \
            (buckets[-1][0].dtype, buckets[-1][0].device) == (t.dtype, t.device)
        if fits:
            buckets[-1].append(t)
            size += nbytes
        else:
            buckets.append([t])
            size = nbytes
    return buckets
