"""The embedded dataset: the rendered action videos (``render.py``) written as real H.264 mp4 files,
so the data path is the same as for a downloaded dataset; lossless ones, so that every generation
decodes to the same pixels (``lossless.py``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sideways_cli.data.lossless import write_lossless_mp4
from sideways_cli.data.render import SYNTHETIC_CLASSES, render_video

# Bump whenever rendering or encoding changes, so cached datasets are regenerated.
# 4: lossless H.264 (version 3's lossy encoding decoded differently from one generation to the next)
_GENERATOR_VERSION = 4
_SPLITS = {"train": 0, "val": 1}

# --- dataset on disk ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    out_path: Path
    class_index: int
    entropy: tuple[int, ...]
    num_frames: int
    size: int
    fps: int


def _run_job(job: _Job) -> None:
    rng = np.random.default_rng(np.random.SeedSequence(job.entropy))
    frames = render_video(job.class_index, rng, job.num_frames, job.size)
    write_lossless_mp4(job.out_path, frames, job.fps)


def _fingerprint(params: dict) -> str:
    blob = json.dumps({**params, "classes": SYNTHETIC_CLASSES, "version": _GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _is_complete(dataset_dir: Path) -> bool:
    names = ("labels.txt", "train.csv", "val.csv", "params.json")
    return all((dataset_dir / name).is_file() for name in names)


def _pool_size() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


def _ignore_sigint() -> None:
    # Ctrl-C is handled once, by the parent, which terminates the pool and removes the partial output.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _render_all(jobs: list[_Job], progress: bool, processes: int) -> None:
    # Workers only run numpy and PyAV, so fork is safe on Linux even when torch is loaded in the
    # parent; elsewhere fork is unsafe (macOS) or unavailable.
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    columns = (
        TextColumn("generating synthetic videos"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    )
    # The pool is created before the progress bar starts its refresh thread, so no lock is forked.
    with ctx.Pool(processes=min(processes, len(jobs)), initializer=_ignore_sigint) as pool:
        with Progress(*columns, console=Console(stderr=True), transient=True, disable=not progress) as bar:
            task = bar.add_task("videos", total=len(jobs))
            for _ in pool.imap_unordered(_run_job, jobs, chunksize=4):
                bar.advance(task)


def _plan_jobs(dataset_dir: Path, params: dict) -> dict[str, list[_Job]]:
    # Each video's rng depends only on (seed, split, class, index), never on scheduling.
    jobs: dict[str, list[_Job]] = {}
    for split, code in _SPLITS.items():
        jobs[split] = [
            _Job(
                out_path=dataset_dir / "videos" / split / name / f"{i:04d}.mp4",
                class_index=c,
                entropy=(params["seed"], code, c, i),
                num_frames=params["num_frames"],
                size=params["size"],
                fps=params["fps"],
            )
            for c, name in enumerate(SYNTHETIC_CLASSES)
            for i in range(params[f"{split}_per_class"])
        ]
    return jobs


def _write_split_index(dataset_dir: Path, split: str, jobs: list[_Job]) -> None:
    with open(dataset_dir / f"{split}.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "label", "num_frames", "fps"])
        for job in jobs:
            path = job.out_path.relative_to(dataset_dir).as_posix()
            writer.writerow([path, job.class_index, job.num_frames, job.fps])


def _move_into_place(tmp: Path, target: Path) -> None:
    if target.exists() and not _is_complete(target):
        shutil.rmtree(target)  # a damaged copy of this very dataset; it is regenerated below
    try:
        os.replace(tmp, target)
    except OSError:
        if not _is_complete(target):  # otherwise a concurrent run finished first: use its copy
            raise


def ensure_synthetic(
    root: str | os.PathLike,
    *,
    train_per_class: int = 40,
    val_per_class: int = 10,
    num_frames: int = 64,
    size: int = 32,
    fps: int = 25,
    seed: int = 0,
    progress: bool = True,
    processes: int | None = None,
) -> Path:
    """Generate the synthetic dataset under `root` on first use and return its directory.

    The directory name fingerprints the parameters, so different settings coexist and a
    repeated call with the same settings returns immediately without touching any file. Every
    generation with the same parameters decodes to the same frames, whatever ``processes`` (the
    pool's size; default: the cores, at most 8), scheduling or machine load.
    """
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number >= 16 (H.264 yuv420p), got {size}")
    if num_frames < 1 or train_per_class < 1 or val_per_class < 1:
        raise ValueError("num_frames, train_per_class and val_per_class must be positive")
    params = dict(
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        num_frames=num_frames,
        size=size,
        fps=fps,
        seed=seed,
    )
    root = Path(root)
    target = root / f"synthetic-{_fingerprint(params)}"
    if _is_complete(target):
        return target

    root.mkdir(parents=True, exist_ok=True)
    # Build next to the target so the final os.replace is an atomic rename on the same filesystem.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", suffix=".tmp", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset should not be
    try:
        jobs_by_split = _plan_jobs(tmp, params)
        all_jobs = [job for jobs in jobs_by_split.values() for job in jobs]
        for job in all_jobs:
            job.out_path.parent.mkdir(parents=True, exist_ok=True)
        _render_all(all_jobs, progress, processes or _pool_size())
        for split, jobs in jobs_by_split.items():
            _write_split_index(tmp, split, jobs)
        (tmp / "labels.txt").write_text("".join(f"{name}\n" for name in SYNTHETIC_CLASSES))
        provenance = {**params, "generator_version": _GENERATOR_VERSION}
        (tmp / "params.json").write_text(json.dumps(provenance, indent=2) + "\n")
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left after a successful replace
    return target
