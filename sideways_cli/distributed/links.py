"""Point-to-point traffic between stages over torch.distributed, with every wait bounded.

A stage that dies closes its sockets; one that hangs sends nothing. Either way its neighbour's
wait ends, within ``timeout_s`` at the latest, in a :class:`StageFailure` naming the stage, so the
launcher stops the whole job instead of leaving it blocked for c10d's default half hour.
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

    ``ranks``: each stage's global rank (default: stage s is rank s, a single replica);
    ``group``: the replica's stages, over which :meth:`all_reduce` sums (default: every process);
    ``replica``: which replica this is, for messages (None: a single one).
    """

    def __init__(self, rank: int, stages: int, timeout_s: float, device: torch.device,
                 ranks: list[int] | None = None, group: dist.ProcessGroup | None = None,
                 replica: int | None = None):
        self.rank, self.stages = rank, stages
        self.timeout = timedelta(seconds=timeout_s)
        self.device = device
        self.ranks = ranks if ranks is not None else list(range(stages))
        self.group, self.replica = group, replica
        self.in_flight: list[tuple[dist.Work, torch.Tensor, int]] = []  # sends not yet complete

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        """Start sending ``tensor`` to stage ``dst``; it stays referenced until :meth:`settle`.
        ``tag`` keeps apart traffic that shares a pair of stages (ticks, targets, evaluation)."""
        tensor = tensor.detach().contiguous()
        self.in_flight.append((dist.isend(tensor, self.ranks[dst], tag=tag), tensor, dst))

    def receive(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, src: int,
                what: str, tag: int) -> PendingReceive:
        """Post a receive from stage ``src`` now (so it overlaps compute); ``.wait()`` it later."""
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        return PendingReceive(self, dist.irecv(buffer, self.ranks[src], tag=tag), buffer, src, what)

    def settle(self) -> None:
        """Wait until every send has left: a neighbour that stopped reading is found here too."""
        for work, _, dst in self.in_flight:
            self.wait(work, dst, "sending to it")
        self.in_flight.clear()

    def send_sized(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        """Send a tensor whose shape and dtype the receiver does not know: a header first."""
        header = torch.zeros(_HEADER, dtype=torch.int64, device=self.device)
        header[0], header[1] = _DTYPES.index(tensor.dtype), tensor.dim()
        header[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
        self.send(header, dst, tag)
        self.send(tensor, dst, tag)

    def receive_sized(self, src: int, what: str, tag: int) -> torch.Tensor:
        header = self.receive((_HEADER,), torch.int64, src, what, tag).wait().tolist()
        shape = tuple(header[2:2 + header[1]])
        return self.receive(shape, _DTYPES[header[0]], src, what, tag).wait()

    def all_reduce(self, tensor: torch.Tensor, doing: str) -> None:
        """Sum ``tensor`` over the replica's stages in place."""
        try:
            work = dist.all_reduce(tensor, group=self.group, async_op=True)
        except RuntimeError as exc:
            raise self.failure(None, doing, exc) from None
        self.wait(work, None, doing)

    def wait(self, work: dist.Work, peer: int | None, doing: str,
             timeout: timedelta | None = None) -> None:
        """Wait ``timeout`` (default ``parallel.timeout_s``) for ``work``, else StageFailure."""
        bounded_wait(work, timeout or self.timeout,
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


def bounded_wait(work: dist.Work, timeout: timedelta,
                 failure: Callable[[BaseException | None, timedelta], StageFailure]) -> None:
    """Wait ``timeout`` for ``work``; raise ``failure(exception, timeout)`` if it fails or hangs."""
    try:
        completed = work.wait(timeout)
    except RuntimeError as exc:
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
        self.links.wait(self.work, self.src, f"waiting for {self.what}")
        return self.buffer
