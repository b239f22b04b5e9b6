"""Point-to-point traffic between stages over torch.distributed, with every wait bounded.

A stage that dies closes its sockets; one that hangs sends nothing. Either way its neighbour's
wait ends, within ``parallel.timeout_s`` at the latest, in a :class:`StageFailure` naming the
stage, so the launcher stops the whole job instead of leaving it blocked for c10d's default half
hour.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

_HEADER = 10  # int64 slots of a header: dtype, ndim, then up to 8 sizes
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64]


class StageFailure(RuntimeError):
    """Another stage died or stopped answering; the message names it."""


class Links:
    """This stage's sends and receives to the other stages of its replica, which it names by
    stage index; ``device`` is where tensors live for the backend.

    ``ranks``: each stage's global rank. ``up`` and ``down``: the groups that carry traffic toward
    higher and lower stages (one each, so that NCCL's in-order execution per group can never
    make a receive wait behind a send it is itself waited for: ``topology.py``); ``pipeline``:
    the replica's stages' group for collectives. ``replica``: which replica this is,
    for messages (None: a single one). Between a pair of stages, the k-th send in one direction
    meets the k-th receive: both sides issue them in the same order, which the clock fixes.
    """

    def __init__(self, rank: int, stages: int, timeout_s: float, device: torch.device,
                 ranks: list[int], up: dist.ProcessGroup, down: dist.ProcessGroup,
                 pipeline: dist.ProcessGroup, replica: int | None = None):
        self.rank, self.stages = rank, stages
        self.timeout = timedelta(seconds=timeout_s)
        self.device = device
        self.ranks, self.up, self.down, self.pipeline = ranks, up, down, pipeline
        self.replica = replica
        self.in_flight: list[tuple[dist.Work, torch.Tensor, int]] = []  # sends not yet complete

    # The group of the traffic's direction: a sender and its receiver always pick the same one.
    def _toward(self, peer: int) -> dist.ProcessGroup:
        return self.up if peer > self.rank else self.down

    def _from(self, peer: int) -> dist.ProcessGroup:
        return self.down if peer > self.rank else self.up

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Start sending ``tensor`` to stage ``dst``; it stays referenced until :meth:`settle`."""
        tensor = tensor.detach().contiguous()
        work = dist.isend(tensor, self.ranks[dst], group=self._toward(dst))
        self.in_flight.append((work, tensor, dst))

    def receive(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, src: int,
                what: str) -> PendingReceive:
        """Post a receive from stage ``src`` now (so it overlaps compute); ``.wait()`` it later."""
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        work = dist.irecv(buffer, self.ranks[src], group=self._from(src))
        return PendingReceive(self, work, buffer, src, what)

    def settle(self) -> None:
        """Wait until every send has left: a neighbour that stopped reading is found here too."""
        for work, _, dst in self.in_flight:
            self.wait(work, dst, "sending to it", point_to_point=True)
        self.in_flight.clear()

    def send_sized(self, tensor: torch.Tensor, dst: int) -> None:
        """Send a tensor whose shape and dtype the receiver does not know: a header first."""
        header = torch.zeros(_HEADER, dtype=torch.int64, device=self.device)
        header[0], header[1] = _DTYPES.index(tensor.dtype), tensor.dim()
        header[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
        self.send(header, dst)
        self.send(tensor, dst)

    def receive_sized(self, src: int, what: str) -> torch.Tensor:
        header = self.receive((_HEADER,), torch.int64, src, what).wait().tolist()
        shape = tuple(header[2:2 + header[1]])
        return self.receive(shape, _DTYPES[header[0]], src, what).wait()

    def wait(self, work: dist.Work, peer: int | None, doing: str,
             timeout: timedelta | None = None, point_to_point: bool = False) -> None:
        """Wait ``timeout`` (default ``parallel.timeout_s``) for ``work``, else StageFailure.

        On CUDA a point-to-point wait only makes the compute stream wait for the transfer, so the
        host goes on queueing the tick's kernels; the link groups' own timeout (the same
        ``parallel.timeout_s``) then bounds a hung exchange, through NCCL's watchdog."""
        if point_to_point and self.device.type == "cuda":
            work.wait()
            return
        bounded_wait(lambda: work, timeout or self.timeout,
                     lambda exc, waited: self.failure(peer, doing, exc, waited))

    def name(self, stage: int) -> str:
        return f"stage {stage}" if self.replica is None else f"replica {self.replica} stage {stage}"

    def failure(self, peer: int | None, doing: str, exc: BaseException | None,
                timeout: timedelta | None = None) -> StageFailure:
        """``peer`` None: a collective, whose failing member the backend does not name (of two
        stages, it is the other one)."""
        if peer is None and self.stages == 2:
            peer = 1 - self.rank
        who = self.name(peer) if peer is not None else "another stage"
        return StageFailure(f"{self.name(self.rank)}, {doing}: "
                            f"{why_silent(who, exc, timeout or self.timeout)}")


def bounded_wait(start: Callable[[], dist.Work], timeout: timedelta,
                 failure: Callable[[BaseException | None, timedelta], StageFailure]) -> None:
    """Start a transfer or collective (``start`` issues it, or returns one already issued) and
    wait ``timeout`` for it; raise ``failure(exception, timeout)`` if it cannot start, fails or
    hangs."""
    try:
        completed = start().wait(timeout)
    except RuntimeError as exc:  # a backend refuses to start one whose peer is already gone
        raise failure(exc, timeout) from None
    if completed is False:  # some backends report a timeout by returning False
        raise failure(None, timeout)


def is_link_failure(exc: BaseException) -> bool:
    """Whether a collective failed because a peer timed out or closed its connection."""
    text = str(exc).lower()
    return any(sign in text for sign in ("timed out", "timeout", "connection closed",
                                         "connection reset", "broken pipe"))


def why_silent(who: str, exc: BaseException | None, timeout: timedelta) -> str:
    """Why ``who`` failed to answer: it hung (a timeout) or it died (its connection closed)."""
    text = str(exc).lower() if exc is not None else "timed out"
    if "timed out" in text or "timeout" in text:
        return (f"{who} sent nothing for {timeout.total_seconds():.0f} s: it hung or is far "
                f"slower than this process (raise parallel.timeout_s if it is only slow)")
    return f"{who} closed its connection: it died ({str(exc).splitlines()[0]})"


class PendingReceive:
    def __init__(self, links: Links, work: dist.Work, buffer: torch.Tensor, src: int, what: str):
        self.links, self.work, self.buffer, self.src, self.what = links, work, buffer, src, what

    def wait(self) -> torch.Tensor:
        self.links.wait(self.work, self.src, f"waiting for {self.what}", point_to_point=True)
        return self.buffer
