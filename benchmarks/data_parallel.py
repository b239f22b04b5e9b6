"""Data parallelism on this machine: BP and Sideways at R = 1 and R = 2 replicas, and R = 2 x P = 1
against P = 2 x R = 1, in one run.

    python benchmarks/data_parallel.py [--repeats 9] [--batches 12] [--set KEY=VALUE ...]

Two processes (gloo, one thread and one core each) are spawned once; every repeat then runs each
setting in turn, interleaved, so that machine noise hits all alike; ratios are medians of each
repeat's ratio. The table gives the median over repeats of each setting's frames/s of the global
batch (``data.batch_size`` random clips of the preset's model and optimizer, no data loading),
trained by the learners ``sideways train`` uses:

* R=1: one process's ``StageLearner`` over the whole batch on the first process, the other idle; and over
  half the batch, what each replica of R=2 trains (smaller kernels);
* R=2: ``ReplicatedLearner`` on both, half the batch each, its gradients averaged over the two
  (BP: DistributedDataParallel, during the backward pass; Sideways: the bucketed all_reduce
  before each step) and the batch's loss summed;
* R=2, no averaging: the same halves trained side by side by one-process ``StageLearner``s, no collective at
  all: what sharing the machine costs each process. 1 - R=2 / this is what averaging costs a step:
  the all-reduce itself, and waiting for the slower replica (the step's noise). The all-reduce
  alone (the gradients' size, bucketed as the learners do, back to back) is timed as well;
* R=2, chunk 16: Sideways' replicas at twice the ticks per kernel call: the same numbers, and
  the kernels (and memory) of R=1 at chunk 8;
* P=2: the same rule split into 2 stages, one process each (``benchmarks/depth_parallel.py``'s
  settings: chunked Sideways under 1F1B, BP under GPipe).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

import depth_parallel
from common import PRESET, emit, interleaved_arguments, random_batch, spawn_two
from sideways_cli.config import load_config
from sideways_cli.parallel.balance import measure_module_costs, partition
from sideways_cli.parallel.replicas import ReplicaGroup
from sideways_cli.parallel.topology import Topology, make_topology
from sideways_cli.run.build import build_network
from sideways_cli.run.launch import free_port
from sideways_cli.run.learner import StageLearner

RESULTS = Path(__file__).parent / "results"
CPU = torch.device("cpu")


class Replicas(NamedTuple):
    mode: str
    processes: int
    averaged: bool = True
    shards: int = 1  # of the batch: each process trains 1/shards of it
    sets: tuple[str, ...] = ()  # config overrides of this setting


# name -> a replica setting, or the name of depth_parallel's setting
SETTINGS: dict[str, Replicas | str] = {
    **{name: setting for mode in ("bp", "sideways") for name, setting in (
        (f"{mode} R=1", Replicas(mode, 1)),
        (f"{mode} R=1, half batch", Replicas(mode, 1, shards=2)),
        (f"{mode} R=2", Replicas(mode, 2, shards=2)),
        (f"{mode} R=2, no averaging", Replicas(mode, 2, averaged=False, shards=2)))},
    # the same numbers (the chunk never changes them) with R=1's kernel sizes: half the clips,
    # twice the ticks per call
    "sideways R=2, chunk 16": Replicas("sideways", 2, shards=2, sets=("sideways.chunk=16",)),
    "bp P=2 (gpipe)": "gpipe-bp P=2",
    "sideways P=2 (chunk 8, 1f1b)": "sideways chunk 8 P=2",
}


class TimedReplicaGroup(ReplicaGroup):
    """A replica group that adds up the seconds its collectives take, waiting included."""

    seconds = 0.0

    def _reduce(self, tensor, op, doing):
        start = time.perf_counter()
        super()._reduce(tensor, op, doing)
        self.seconds += time.perf_counter() - start


def run_replicas(overrides: list[str], rank: int, setting: str, batches: int):
    """(frames/s, seconds in collectives) on the first process; None on the other, or when it idles."""
    mode, replicas, averaged, shards, sets = SETTINGS[setting]
    dist.barrier()
    if rank >= replicas:
        dist.barrier()
        return None
    cfg = load_config(PRESET, [*overrides, f"mode={mode}", *sets])
    torch.manual_seed(cfg.seed)
    clips, labels = random_batch(cfg)
    share = len(clips) // shards
    clips, labels = clips[rank * share:(rank + 1) * share], labels[rank * share:(rank + 1) * share]
    group = None
    if replicas > 1 and averaged:
        group = TimedReplicaGroup(dist.group.WORLD, rank, replicas, 0, 1, 120, CPU)
        topology = Topology(CPU, replicas=replicas, replica=rank, hang_timeout_s=120, across=group)
    else:  # one process's learner over this process's share of the batch
        cfg.data.batch_size = share
        topology = Topology(CPU, hang_timeout_s=120)
    learner = StageLearner(cfg, topology, build_network(cfg, 10))
    learner.train_batch(clips, labels)  # warm-up: allocators, kernels, DDP's buckets
    if replicas > 1:
        dist.barrier()
    if group is not None:
        group.seconds = 0.0
    start = time.perf_counter()
    for _ in range(batches):
        learner.train_batch(clips, labels)
    elapsed = time.perf_counter() - start
    if replicas == 1:
        dist.barrier()  # the other process waits here through this one's R = 1 setting
    else:  # the batches are done when both processes are done with theirs
        slowest = torch.tensor([elapsed])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        elapsed = slowest.item()
    if rank > 0:
        return None
    frames = share * replicas * cfg.data.clip_len * batches
    return frames / elapsed, (group.seconds / elapsed if group is not None else None)


def all_reduce_s(cfg, calls: int = 50) -> float:
    """Median seconds of averaging the network's gradients over both processes, nothing else
    running: the collective's own cost."""
    model = build_network(cfg, 10)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    group = ReplicaGroup(dist.group.WORLD, dist.get_rank(), 2, 0, 1, 120, CPU)
    times = []
    for _ in range(calls):
        dist.barrier()
        start = time.perf_counter()
        group.average_gradients(model.parameters())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank: int, port: int, overrides: list[str], sizes: list[int], repeats: int,
           batches: int, out: str) -> None:
    if hasattr(os, "sched_setaffinity"):  # a core each: no migrations between the two processes
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank % len(os.sched_getaffinity(0))]})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = load_config(PRESET, overrides)
    stages = make_topology(1, 2, CPU, 120)  # for depth_parallel's settings
    alone_s = all_reduce_s(cfg)
    fps: dict[str, list[float]] = {name: [] for name in SETTINGS}
    collective_share: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, setting in SETTINGS.items():
            if isinstance(setting, str):
                value = depth_parallel.run_setting(cfg, rank, setting, sizes, batches, stages)
            else:
                value = run_replicas(overrides, rank, name, batches)
                if value is not None:
                    value, share = value
                    if share is not None:
                        collective_share.setdefault(name, []).append(share)
            if value is not None:
                fps[name].append(value)
    if rank == 0:
        torch.save({"fps": fps, "collective_share": collective_share, "all_reduce_s": alone_s}, out)
    dist.destroy_process_group()


def ratios(runs: dict[str, list[float]], all_reduce: float, frames_per_batch: int) -> dict[str, float]:
    """Each ratio is the median over repeats of that repeat's ratio: settings run next to each
    other within a repeat, so the machine's drift over minutes cancels."""
    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(runs[a], runs[b]))

    out = {}
    for mode in ("bp", "sideways"):
        out[f"{mode}: R=2 / R=1 (target >= 1.8)"] = ratio(f"{mode} R=2", f"{mode} R=1")
        out[f"{mode}: R=1, half batch / R=1 (the smaller batch)"] = ratio(
            f"{mode} R=1, half batch", f"{mode} R=1")
        out[f"{mode}: R=2, no averaging / (2 x R=1, half batch) (sharing the machine)"] = ratio(
            f"{mode} R=2, no averaging", f"{mode} R=1, half batch") / 2
        out[f"{mode}: averaging's share of a step (1 - R=2 / no averaging)"] = 1 - ratio(
            f"{mode} R=2", f"{mode} R=2, no averaging")
        out[f"{mode}: the all-reduce alone / R=2 step"] = (
            all_reduce * statistics.median(runs[f"{mode} R=2"]) / frames_per_batch)
    out["sideways: R=2, chunk 16 / R=1 (chunk 8)"] = ratio("sideways R=2, chunk 16", "sideways R=1")
    out["bp: R=2 x P=1 / P=2 x R=1"] = ratio("bp R=2", "bp P=2 (gpipe)")
    out["sideways: R=2 x P=1 / P=2 x R=1"] = ratio("sideways R=2", "sideways P=2 (chunk 8, 1f1b)")
    return out


def main() -> None:
    args = interleaved_arguments(__doc__.splitlines()[0], RESULTS / "data_parallel.json", 9, 12)

    cfg = load_config(PRESET, args.set)
    torch.set_num_threads(1)
    frame = (cfg.data.batch_size, 3, cfg.data.size, cfg.data.size)
    sizes = partition(measure_module_costs(build_network(cfg, 10), frame, repeats=9).total_s, 2)
    runs = spawn_two(worker, free_port(), args.set, sizes, args.repeats, args.batches,
                     raw=RESULTS / "data_parallel_raw.pt")
    fps = {name: statistics.median(values) for name, values in runs["fps"].items()}
    timed = {name: statistics.median(values) for name, values in runs["collective_share"].items()}
    b, t = cfg.data.batch_size, cfg.data.clip_len
    targets = ratios(runs["fps"], runs["all_reduce_s"], b * t)
    for name, share in timed.items():
        targets[f"{name}: collectives timed in the step, waiting included / step"] = share
    rows = [[name, fps[name], fps[name] / fps[f"{name.split()[0]} R=1"]] for name in SETTINGS]
    payload = {"model": cfg.model.name, "width": cfg.model.width, "depth": cfg.model.depth,
               "batch": b, "clip_len": t, "size": cfg.data.size, "optimizer": cfg.train.optimizer,
               "stage_sizes": sizes, "repeats": args.repeats, "batches": args.batches,
               "frames_per_s": fps, "runs": runs["fps"], "ratios": targets,
               "all_reduce_s": runs["all_reduce_s"],
               "gradient_bytes": 4 * sum(p.numel() for p in build_network(cfg, 10).parameters())}
    emit(f"data-parallel training, {cfg.model.name}, global B={b}, T={t}, {cfg.data.size}px, "
         f"medians of {args.repeats}", ["setting", "frames/s", "x R=1 of its rule"], rows, payload,
         args.json)
    for name, value in targets.items():
        print(f"{name}: {value:.3f}")


if __name__ == "__main__":
    main()
