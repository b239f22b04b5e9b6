"""Can the data loader keep the trainer fed? Decoded frames/s of the training loader vs the
frames/s that training consumes, each measured alone, in one run.

    python benchmarks/loader.py [--batches 40] [--set data.dataset=ucf101 ...] [--json PATH]

The loader is timed over ``--batches`` batches after its first (worker start-up excluded); the
consumers are the BP and Sideways training steps on batches of the same shape (medians of
``--repeats``). The target is loader >= 3x the faster consumer with the preset's 2 workers.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import PRESET, emit, median, rule_for
from sideways_cli.config import load_config
from sideways_cli.data.catalog import resolve_dataset
from sideways_cli.run.build import build_network
from sideways_cli.run.loaders import data_loaders, forever


def loader_frames_per_s(loader, batches: int) -> float:
    iterator = forever(loader)  # the training loader is endless; forever() also takes finite ones
    next(iterator)  # workers start and open their first videos
    frames, start = 0, time.perf_counter()
    for _ in range(batches):
        clips = next(iterator)["clip"]
        frames += clips.shape[0] * clips.shape[2]
    return frames / (time.perf_counter() - start)


def step_frames_per_s(rule, clips, labels, repeats: int) -> float:
    rule.train_batch(clips, labels, apply_update=lambda: None)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rule.train_batch(clips, labels, apply_update=lambda: None)
        times.append(time.perf_counter() - start)
    return clips.shape[0] * clips.shape[2] / median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "loader.json")
    args = parser.parse_args()

    cfg = load_config(PRESET, args.set)
    data = resolve_dataset(cfg.data, progress=False)
    train_loader, _ = data_loaders(cfg, data)
    loader_fps = loader_frames_per_s(train_loader, args.batches)
    batch = next(iter(train_loader))
    model = build_network(cfg, len(data.classes))
    consumers = {name: step_frames_per_s(rule_for(name, cfg, model), batch["clip"], batch["label"],
                                         args.repeats) for name in ("bp", "sideways")}
    fastest = max(consumers.values())
    rows = [["loader", loader_fps, loader_fps / fastest]]
    rows += [[f"train step ({name})", fps, fps / fastest] for name, fps in consumers.items()]
    payload = {"dataset": cfg.data.dataset, "num_workers": cfg.data.num_workers,
               "batch": cfg.data.batch_size, "clip_len": cfg.data.clip_len, "size": cfg.data.size,
               "loader_frames_per_s": loader_fps, "consumer_frames_per_s": consumers,
               "loader_over_fastest_consumer": loader_fps / fastest}
    emit(f"loader vs training, {cfg.data.dataset}, {cfg.data.num_workers} workers, "
         f"B={cfg.data.batch_size}, T={cfg.data.clip_len}, {cfg.data.size}px",
         ["", "frames/s", "x fastest step"], rows, payload, args.json)


if __name__ == "__main__":
    main()
