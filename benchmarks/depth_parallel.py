"""Depth parallelism on this machine: Sideways with P = 1 and 2 stages against BP, in one run.

    python benchmarks/depth_parallel.py [--repeats 3] [--batches 4] [--set KEY=VALUE ...]

Two stage processes (gloo, one thread each) are spawned once; every repeat then runs each setting
in turn, interleaved, so that machine noise hits all alike; the table gives the median over
repeats of each setting's frames/s (random clips, the preset's model, AdamW, no data loading):

* Sideways as it runs by default (``update: clip``: the chunked executor, macro ticks of
  ``sideways.chunk`` ticks, 1F1B across stages) at chunk 4 and 8: P = 1 (one thread), P = 2 (one
  thread per stage), and P = 1 with two threads in one process (intra-op parallelism instead of
  stages); ``sideways.between_clips``: ``reset`` and ``continuous`` (the gap is the fill and drain of each clip);
  and chunk 8 P = 1 run by both processes at once, each on its own copy with no links: with the
  slowest stage's share of the work, it gives the ceiling of P = 2 / P = 1 on this machine;
* Sideways' tick rule (chunk 1, what ``update: every N ticks`` runs): P = 1 and P = 2, ``reset``
  and ``continuous`` (no stage waits for another within a tick: the depth parallelism of
  docs/sideways.md);
* BP: one process (one and two threads), and pipelined over the same 2 stages with
  torch.distributed.pipelining's GPipe and 1F1B schedules (``parallel.microbatches``);
* Sideways with ``sideways.stash: full`` (chunk 8, ``reset``), P = 1 and P = 2: BP's gradients,
  depth-parallel. At P = 2, with GPipe-BP and 1F1B-BP over the same stages, the three exact
  trainers side by side.

The throughput models (``sideways_cli/parallel/throughput_model.py``) predict the one-thread
Sideways rows: the chunked executor's from per-module macro-tick costs measured in this run (alone
for P = 1, with both cores busy for P = 2) by simulating the stages' 1F1B schedule; the tick
rule's from per-module tick costs. Their P = 1..64 sweeps are plotted.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from common import PRESET, emit, interleaved_arguments, spawn_two
from sideways_cli.config import load_config
from sideways_cli.engine import Schedule, make_rule
from sideways_cli.engine.losses import CLASSIFY
from sideways_cli.parallel.balance import measure_module_costs, partition
from sideways_cli.parallel.pipelined_bp import PipelinedBackprop
from sideways_cli.parallel.staged_chunked import StagedChunked
from sideways_cli.parallel.staged_sideways import StagedSideways
from sideways_cli.parallel.stages import output_specs, stage_ranges, stage_stack
from sideways_cli.parallel.topology import Topology, make_topology
from sideways_cli.run.build import build_network, make_optimizer
from sideways_cli.run.launch import free_port
from sideways_perf.chunked_model import predict_chunked, sweep_chunked
from sideways_perf.link import measure_link
from sideways_perf.macro_costs import measure_macro_costs
from sideways_perf.throughput_model import plot_model, predict, repeat_stack, sweep

RESULTS = Path(__file__).parent / "results"
# both processes train their own copy at once, no links: what sharing the cores costs each
SIDE_BY_SIDE = "sideways chunk 8 P=1, 2 copies side by side"
# name -> (rule, stages, threads, between_clips, chunk)
SETTINGS = {
    **{f"sideways chunk {c} P={p}{suffix}": ("sideways", p, 1, between_clips, c)
       for c in (4, 8) for between_clips, suffix in (("reset", ""), ("continuous", " continuous"))
       for p in (1, 2)},
    "sideways chunk 8 P=1, 2 threads": ("sideways", 1, 2, "reset", 8),
    SIDE_BY_SIDE: ("sideways", 1, 1, "reset", 8),
    **{f"sideways tick rule P={p}{suffix}": ("sideways", p, 1, between_clips, 1)
       for between_clips, suffix in (("reset", ""), ("continuous", " continuous")) for p in (1, 2)},
    "bp": ("bp", 1, 1, None, None),
    "bp, 2 threads": ("bp", 1, 2, None, None),
    "gpipe-bp P=2": ("gpipe", 2, 1, None, None),
    "1f1b-bp P=2": ("1f1b", 2, 1, None, None),
    **{f"sideways stash full chunk 8 P={p}": ("sideways", p, 1, "reset", 8) for p in (1, 2)},
}
STASH = {name: "full" for name in SETTINGS if "stash full" in name}  # the others: stash 0


def build(cfg, rank: int, setting: str, sizes: list[int], topology: Topology):
    """A fresh network (same seed for all), this rank's stage of it, its optimizer and rule."""
    kind, stages, _, between_clips, chunk = SETTINGS[setting]
    model = build_network(cfg, 10)
    stash = STASH.get(setting, 0)
    if stages == 1:
        optimizer = make_optimizer(cfg.train, model)
        rule = make_rule("sideways" if kind == "sideways" else "bp", model, between_clips or "reset",
                         chunk=chunk or 1, stash=stash)
        return rule, optimizer
    modules = stage_ranges(sizes)[rank]
    stack = stage_stack(model, modules)
    optimizer = make_optimizer(cfg.train, stack)
    if kind == "sideways":
        specs = output_specs(model, (3, cfg.data.size, cfg.data.size))
        if chunk > 1:
            rule = StagedChunked(stack, modules, Schedule.of(model, stash), topology, specs,
                                 between_clips, chunk, CLASSIFY, nullcontext)
        else:
            rule = StagedSideways(stack, modules, Schedule.of(model, stash), topology, specs,
                                  between_clips, "clip", CLASSIFY, nullcontext)
    else:
        rule = PipelinedBackprop(stack, rank, stages, kind, cfg.parallel.microbatches, CLASSIFY,
                                 torch.device("cpu"))
    return rule, optimizer


def run_setting(cfg, rank: int, setting: str, sizes: list[int], batches: int,
                topology: Topology) -> float | None:
    """frames/s of ``setting`` on rank 0 (None elsewhere); rank 1 idles through P = 1 settings
    but :data:`SIDE_BY_SIDE`."""
    kind, stages, threads, _, _ = SETTINGS[setting]
    dist.barrier()
    if stages == 1 and rank > 0 and setting != SIDE_BY_SIDE:
        dist.barrier()
        return None
    torch.set_num_threads(threads)
    rule, optimizer = build(cfg, rank, setting, sizes, topology)
    g = torch.Generator().manual_seed(0)
    shape = (cfg.data.batch_size, 3, cfg.data.clip_len, cfg.data.size, cfg.data.size)
    clips, labels = torch.randn(shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)

    def apply_update() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def one_batch() -> None:
        if stages == 1:
            rule.train_batch(clips, labels, apply_update)
        elif kind == "sideways":  # the batch's statistics summed over the stages, as in training
            topology.batch_stats(rule.train_batch(clips, labels, apply_update, clips.shape))
        else:
            rule.train_batch(clips, labels, apply_update)

    one_batch()  # warm-up: allocators, kernels, pipelining's shape inference
    if stages > 1 or setting == SIDE_BY_SIDE:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(batches):
        one_batch()
    elapsed = time.perf_counter() - start
    torch.set_num_threads(1)
    if stages == 1:
        dist.barrier()  # rank 1 waits here through rank 0's P = 1 settings
    return shape[0] * shape[2] * batches / elapsed if rank == 0 else None


def worker(rank: int, port: int, overrides: list[str], sizes: list[int], repeats: int,
           batches: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = load_config(PRESET, overrides)
    topology = make_topology(1, 2, torch.device("cpu"), 120)
    fps: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(repeats):
        for name in SETTINGS:
            value = run_setting(cfg, rank, name, sizes, batches, topology)
            if value is not None:
                fps[name].append(value)
    if rank == 0:
        torch.save(fps, out)
    dist.destroy_process_group()


def best(fps: dict[str, float], stages: int, between_clips: str) -> tuple[str, float]:
    """The fastest chunked Sideways setting with ``stages`` stages, one thread, ``between_clips``."""
    names = [name for name, (kind, p, threads, mode, chunk) in SETTINGS.items()
             if kind == "sideways" and p == stages and threads == 1 and mode == between_clips and chunk > 1
             and name != SIDE_BY_SIDE and name not in STASH]
    name = max(names, key=fps.__getitem__)
    return name, fps[name]


def ratios(fps: dict[str, float]) -> dict[str, float]:
    """The issue's targets, per pipeline mode (reset flushes every batch, as GPipe does), and the
    same-chunk and tick-rule speedups."""
    out = {}
    for between_clips in ("reset", "continuous"):
        (p2, two), (p1, one) = best(fps, 2, between_clips), best(fps, 1, between_clips)
        out[f"{between_clips}: {p2} / {p1} (target >= 1.8)"] = two / one
        out[f"{between_clips}: {p2} / gpipe-bp P=2 (target >= 1.2)"] = two / fps["gpipe-bp P=2"]
    for c in (4, 8):
        for suffix in ("", " continuous"):
            out[f"chunk {c}{suffix}: P=2 / P=1"] = (fps[f"sideways chunk {c} P=2{suffix}"]
                                                    / fps[f"sideways chunk {c} P=1{suffix}"])
        out[f"chunk {c}, fill and drain at P=2: reset / continuous"] = (
            fps[f"sideways chunk {c} P=2"] / fps[f"sideways chunk {c} P=2 continuous"])
    for bp in ("gpipe-bp P=2", "1f1b-bp P=2"):  # the exact trainers over the same two stages
        out[f"exact: sideways stash full chunk 8 P=2 / {bp}"] = (
            fps["sideways stash full chunk 8 P=2"] / fps[bp])
    out["stash full chunk 8: P=2 / P=1"] = (fps["sideways stash full chunk 8 P=2"]
                                          / fps["sideways stash full chunk 8 P=1"])
    for suffix in ("", " continuous"):
        out[f"tick rule{suffix}: P=2 / P=1"] = (fps[f"sideways tick rule P=2{suffix}"]
                                               / fps[f"sideways tick rule P=1{suffix}"])
    return out


def ceiling(fps: dict[str, float], module_s: list[float], sizes: list[int]) -> dict[str, float]:
    """The most two stages can give over one process here, whatever the schedule: all the work
    over the slowest stage's share (``module_s``: seconds per module), times the speed each of two
    processes keeps when both compute (measured side by side, no links)."""
    stages = [sum(module_s[r.start:r.stop]) for r in stage_ranges(sizes)]
    balance = sum(stages) / max(stages)
    shared = fps[SIDE_BY_SIDE] / fps["sideways chunk 8 P=1"]
    return {"balance: all work / slowest stage's": balance,
            f"shared cores: {SIDE_BY_SIDE} / alone": shared,
            "ceiling of P=2 / P=1 here (balance x shared cores)": balance * shared}


def main() -> None:
    args = interleaved_arguments(__doc__.splitlines()[0], RESULTS / "depth_parallel.json", 3, 4)

    cfg = load_config(PRESET, args.set)
    torch.set_num_threads(1)
    frame = (cfg.data.batch_size, 3, cfg.data.size, cfg.data.size)
    costs = measure_module_costs(build_network(cfg, 10), frame, repeats=9)
    sizes = partition(costs.total_s, 2)
    # the chunked model's costs, alone (P = 1) and with both cores busy (P = 2), measured in
    # this run: the machine's speed drifts over minutes
    alone = measure_macro_costs(build_network(cfg, 10), frame, repeats=7)
    loaded = measure_macro_costs(build_network(cfg, 10), frame, repeats=7, concurrent=2)
    link = measure_link()
    runs = spawn_two(worker, free_port(), args.set, sizes, args.repeats, args.batches,
                     raw=RESULTS / "depth_parallel_raw.pt")
    fps = {name: statistics.median(values) for name, values in runs.items()}

    b, t = cfg.data.batch_size, cfg.data.clip_len
    predicted = {}
    for name, (kind, stages, threads, between_clips, chunk) in SETTINGS.items():
        if kind != "sideways" or threads != 1 or name == SIDE_BY_SIDE or name in STASH:
            continue
        if chunk == 1:
            predicted[name] = predict(costs, stages, link, b, t, between_clips, cores=2).frames_per_s
        else:
            predicted[name] = predict_chunked(alone if stages == 1 else loaded, stages, link, b, t,
                                              chunk, between_clips, cores=2,
                                              sizes=sizes if stages == 2 else None).frames_per_s
    targets = {**ratios(fps), **ceiling(fps, alone.full_s(8), sizes)}
    base = max(fps[name] for name in fps if name.startswith("sideways") and name.endswith("P=1"))
    rows = [[name, fps[name], fps[name] / base, predicted.get(name, "")] for name in SETTINGS]
    agreement = {name: predicted[name] / fps[name] for name in predicted}
    depth, chunk = len(costs.names), 4
    curves = {f"{cfg.model.name} D={depth}, chunk {chunk}, {p}":
              sweep_chunked(alone, link, b, t, chunk, p, concurrent_costs=loaded)
              for p in ("reset", "continuous")}
    curves.update({f"64-module stack, chunk {chunk}, {p}":
                   sweep_chunked(repeat_stack(alone, 64), link, b, t, chunk, p,
                                 concurrent_costs=repeat_stack(loaded, 64))
                   for p in ("reset", "continuous")})
    curves[f"{cfg.model.name} D={depth}, tick rule, reset"] = sweep(costs, link, b, t, "reset")
    measured = {f"{cfg.model.name} D={depth}, chunk {chunk}, {p}":
                [(1, fps[f"sideways chunk {chunk} P=1{suffix}"]),
                 (2, fps[f"sideways chunk {chunk} P=2{suffix}"])]
                for p, suffix in (("reset", ""), ("continuous", " continuous"))}
    measured[f"{cfg.model.name} D={depth}, tick rule, reset"] = [
        (1, fps["sideways tick rule P=1"]), (2, fps["sideways tick rule P=2"])]
    plot_model(RESULTS / "depth_parallel_model.png", curves, measured)
    payload = {"model": cfg.model.name, "width": cfg.model.width, "depth": len(costs.names),
               "batch": b, "clip_len": t, "size": cfg.data.size, "stage_sizes": sizes,
               "microbatches": cfg.parallel.microbatches, "repeats": args.repeats,
               "batches": args.batches, "frames_per_s": fps, "runs": runs, "ratios": targets,
               "predicted_frames_per_s": predicted, "predicted_over_measured": agreement,
               "link": {"alpha_s": link.alpha, "beta_bytes_per_s": link.beta},
               "module_costs_s": dict(zip(costs.names, costs.total_s)),
               "sweep": {label: [[p.stages, p.frames_per_s] for p in curve]
                         for label, curve in curves.items()}}
    emit(f"depth-parallel training, {cfg.model.name}, B={b}, T={t}, {cfg.data.size}px, stages "
         f"{sizes}, medians of {args.repeats}", ["setting", "frames/s", "x best sideways P=1",
                                                 "model frames/s"], rows, payload, args.json)
    for name, value in {**targets, **{f"model / measured, {k}": v for k, v in agreement.items()}}.items():
        print(f"{name}: {value:.2f}")
    print(f"wrote {RESULTS / 'depth_parallel_model.png'}")


if __name__ == "__main__":
    main()
