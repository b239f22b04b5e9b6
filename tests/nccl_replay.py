"""Replays every rank's recorded torch.distributed traffic under NCCL's in-order rule.

gloo lets a process's operations overtake one another; NCCL does not, so traffic that runs on the
CPU can hang on GPUs. The replay enforces NCCL's rule in its strictest form:

- a process's operations on one process group run one after another, in the order the process
  issued them: one FIFO queue per (rank, group), point-to-point ops and collectives alike; tags
  are ignored;
- a point-to-point op is a rendezvous: the k-th send from rank a to rank b on group g meets the
  k-th receive at b from a on g; both must be at the head of their queues at once to complete,
  and their sizes (numel) and dtypes must agree, else it is a mismatch;
- a collective on g completes when every member of g has it at the head of its queue for g, and
  they must all be the same collective (name, root) of the same size and dtype, else a mismatch;
- ``batch_isend_irecv`` is ONE queue entry on its group, complete once every one of its parts
  has met its partner part while both were at the head of their queues (the partner a plain op at
  the head, or a part of a batch at the head);
- the host: after a ``wait`` (or a blocking call, which is recorded as issue then wait) a process
  issues nothing more until that op has completed.

A trace is one JSON object per line, per rank, in program order (``tests/traffic`` writes them):

- ``{"ev": "group", "group": "world", "ranks": [0, 1]}``: a group's members (global ranks);
  "world", when no rank declares it, is every rank of the job;
- ``{"ev": "issue", "op": 3, "group": "world", "kind": "send" | "recv", "peer": 1, "numel": 8,
  "dtype": "float32", "at": "where"}``: a point-to-point op to or from global rank ``peer``;
- ``{"ev": "issue", "op": 4, "group": ..., "kind": "batch", "parts": [{"kind", "peer", "numel",
  "dtype"}, ...]}``: one ``batch_isend_irecv``;
- ``{"ev": "issue", "op": 5, "group": ..., "kind": "collective", "name": "broadcast from 0",
  "numel": 8, "dtype": "int64"}``;
- ``{"ev": "wait", "op": 3}``: the host blocks until op 3 of this rank has completed.

Ops are numbered per rank; "at" (optional) says where the program issued the op.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Event = dict[str, Any]


@dataclass(eq=False)
class Part:
    """One send or receive: a plain op's only part, or one part of a batch."""

    op: Op
    kind: str  # send | recv
    peer: int
    numel: int
    dtype: str
    pair: tuple[str, int, int, int]  # its rendezvous: group, sender, receiver, k
    matched: bool = False

    def describe(self) -> str:
        way = "to" if self.kind == "send" else "from"
        return f"{self.kind} {way} rank {self.peer} ({self.numel} x {self.dtype})"


@dataclass(eq=False)
class Op:
    rank: int
    id: int
    group: str
    kind: str  # send | recv | batch | collective
    at: str
    name: str = ""  # a collective's, with its root
    numel: int = 0
    dtype: str = ""
    parts: list[Part] = field(default_factory=list)
    done: bool = False

    def describe(self, where: bool = True) -> str:
        """What the op is, its group and number, and with ``where`` where it was issued."""
        place = f", at {self.at}" if where and self.at else ""
        if self.kind == "collective":
            what = f"{self.name} ({self.numel} x {self.dtype})"
        elif self.kind == "batch":
            what = "batch [" + ", ".join(p.describe() for p in self.parts) + "]"
        else:
            what = self.parts[0].describe()
        return f"{what} on group {self.group} (op {self.id}{place})"


@dataclass
class Verdict:
    """What the replay found: empty lists mean the traffic cannot hang under NCCL's rule."""

    mismatches: list[str]
    stuck: list[str]  # a deadlock: one line per rank that cannot go on

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.stuck

    def __str__(self) -> str:
        lines = [f"mismatch: {m}" for m in self.mismatches]
        if self.stuck:
            lines += ["deadlock:"] + [f"  {s}" for s in self.stuck]
        return "\n".join(lines) or "ok"


def load_traces(directory: Path) -> dict[int, list[Event]]:
    """Global rank -> its events, from the ``rank<R>-pid<P>.jsonl`` files of one job."""
    programs: dict[int, list[Event]] = {}
    for path in sorted(directory.glob("rank*-pid*.jsonl")):
        rank = int(path.name[len("rank"):path.name.index("-")])
        if rank in programs:
            raise ValueError(f"two processes recorded rank {rank} in {directory} (a restart?)")
        programs[rank] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return programs


class _Replay:
    def __init__(self, programs: dict[int, list[Event]]):
        self.programs = programs
        self.pc = {rank: 0 for rank in programs}  # the next event of each rank
        self.queues: dict[int, dict[str, deque[Op]]] = {r: defaultdict(deque) for r in programs}
        self.ops: dict[tuple[int, int], Op] = {}
        self.members: dict[str, list[int]] = {"world": sorted(programs)}
        # (group, sender, receiver, k) -> {"send": part, "recv": part}: the k-th of that pair
        self.pairs: dict[tuple[str, int, int, int], dict[str, Part]] = defaultdict(dict)
        self.counts: dict[tuple[str, int, int, str], int] = defaultdict(int)
        self.mismatches: list[str] = []

    def run(self) -> Verdict:
        while self._advance() | self._complete():
            pass
        return Verdict(self.mismatches, self._stuck())

    def _advance(self) -> bool:
        """Every rank runs its program until it waits for an op not yet complete."""
        moved = False
        for rank, program in self.programs.items():
            while self.pc[rank] < len(program):
                event = program[self.pc[rank]]
                if event["ev"] == "wait" and not self.ops[rank, event["op"]].done:
                    break
                if event["ev"] == "issue":
                    self._issue(rank, event)
                elif event["ev"] == "group":
                    self.members[event["group"]] = event["ranks"]
                self.pc[rank] += 1
                moved = True
        return moved

    def _issue(self, rank: int, event: Event) -> None:
        op = Op(rank, event["op"], event["group"], event["kind"], event.get("at", ""),
                event.get("name", ""), event.get("numel", 0), event.get("dtype", ""))
        if op.kind != "collective":
            for p in event["parts"] if op.kind == "batch" else [event]:
                if p["peer"] is None:
                    raise ValueError(f"rank {rank} op {op.id}: a receive from any source")
                sender, receiver = (rank, p["peer"]) if p["kind"] == "send" else (p["peer"], rank)
                count = (op.group, sender, receiver, p["kind"])
                pair = (op.group, sender, receiver, self.counts[count])
                self.counts[count] += 1
                part = Part(op, p["kind"], p["peer"], p["numel"], p["dtype"], pair)
                self.pairs[pair][part.kind] = part
                op.parts.append(part)
        self.ops[rank, op.id] = op
        self.queues[rank][op.group].append(op)

    def _at_head(self, op: Op) -> bool:
        queue = self.queues[op.rank][op.group]
        return bool(queue) and queue[0] is op

    def _complete(self) -> bool:
        """Completes every op at the head of its queue that can complete now."""
        moved = False
        for rank in self.programs:
            for queue in list(self.queues[rank].values()):
                while queue and self._try(queue[0]):
                    moved = True
        return moved

    def _try(self, op: Op) -> bool:
        if op.kind == "collective":
            return self._try_collective(op)
        for part in op.parts:
            partner = self.pairs[part.pair].get("recv" if part.kind == "send" else "send")
            if part.matched or partner is None or not self._at_head(partner.op):
                continue
            part.matched = partner.matched = True
            if (part.numel, part.dtype) != (partner.numel, partner.dtype):
                self.mismatches.append(
                    f"size mismatch on group {op.group}: rank {op.rank}'s {op.describe()} meets "
                    f"rank {partner.op.rank}'s {partner.op.describe()}")
        if not all(part.matched for part in op.parts):
            return False
        self._finish(op)  # a plain partner, matched too, completes when its queue is next looked at
        return True

    def _try_collective(self, op: Op) -> bool:
        members = self.members.get(op.group, [])
        if op.rank not in members:
            raise ValueError(f"rank {op.rank} issued {op.describe()} on a group it is not in")
        heads = []
        for member in members:
            queue = self.queues[member][op.group]
            if not queue or queue[0].kind != "collective":
                return False
            heads.append(queue[0])
        signatures = {(h.name, h.numel, h.dtype) for h in heads}
        if len(signatures) > 1:
            self.mismatches.append(f"collective mismatch on group {op.group}: " + "; ".join(
                f"rank {h.rank}: {h.describe()}" for h in heads))
        for head in heads:
            self._finish(head)
        return True

    def _finish(self, op: Op) -> None:
        op.done = True
        queue = self.queues[op.rank][op.group]
        assert queue[0] is op, "only the head of a queue completes"
        queue.popleft()

    def _stuck(self) -> list[str]:
        lines = []
        for rank, program in self.programs.items():
            heads = "; ".join(q[0].describe(where=False) for q in self.queues[rank].values() if q)
            if self.pc[rank] < len(program):
                waited = self.ops[rank, program[self.pc[rank]]["op"]]
                lines.append(f"rank {rank} waits for {waited.describe()}, queue heads: {heads}")
            elif heads:
                lines.append(f"rank {rank} ended with ops never completed, queue heads: {heads}")
        return lines


def replay(programs: dict[int, list[Event]]) -> Verdict:
    """Runs every rank's program (global rank -> events) under the rule in this module's doc."""
    return _Replay(programs).run()


TRAFFIC = Path(__file__).parent / "traffic"  # the recorder every process of a job loads (sitecustomize)


def recording(traffic: Path) -> dict[str, str]:
    """The environment that makes every process of a job record its traffic into ``traffic``."""
    traffic.mkdir(parents=True)
    path = os.pathsep.join(filter(None, [str(TRAFFIC), os.environ.get("PYTHONPATH")]))
    return {"SIDEWAYS_TRAFFIC_DIR": str(traffic), "PYTHONPATH": path}
