"""The index of a real dataset: every video probed once, each split a CSV, bad videos reported.

A dataset module (ucf101.py, hmdb51.py, lists.py) reads its layout into a `Plan` (classes, and
per split the listed videos with their labels) without opening a video. `ensure_index` then
probes each distinct video once, in a small process pool, and writes

    <index dir>/labels.txt          one class name per line, in label-id order
    <index dir>/<split>.csv         path,label,num_frames,fps (e.g. train_fold1.csv, val_fold1.csv)
    <index dir>/bad_files.csv       path,reason: videos that are missing or cannot be decoded
    <index dir>/index.json          fingerprint of the plan and per-split counts; written last

Paths are relative to the dataset dir. Unreadable videos are left out of the split CSVs and
counted per split in index.json, so the trainer can refuse a split with too many of them. The
whole directory is built beside its target and renamed into place: an interrupted indexing
leaves nothing half-written. The fingerprint covers the plan and every video's size, so an
edited list or a replaced video triggers a fresh index and an unchanged dataset never does.
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
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sideways_cli.support.errors import UserError

from .decode import VideoDecodeError, open_video

INDEX_FORMAT = 1
MAX_PROBE_WORKERS = 2  # the machines this runs on are small and shared; probing is I/O + decode
INDEX_COLUMNS = ("path", "label", "num_frames", "fps")
VIDEO_SUFFIXES = frozenset(
    {".avi", ".mp4", ".m4v", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ogv"}
)


@dataclass
class Plan:
    """What a dataset's layout and split files say, before any video is opened."""

    name: str
    classes: list[str]
    # split name (train_fold1, val_fold1, ...) -> [(path relative to the dataset dir, label)]
    splits: dict[str, list[tuple[str, int]]]
    # listed videos already known to be bad (e.g. no such file) -> reason
    missing: dict[str, str] = field(default_factory=dict)

    def videos(self) -> list[str]:
        """Every distinct listed video, in first-listed order."""
        return list(dict.fromkeys(path for items in self.splits.values() for path, _ in items))

    def fingerprint(self, dataset_dir: Path) -> str:
        blob = json.dumps([INDEX_FORMAT, self.name, self.classes, self.splits, sorted(self.missing.items())])
        digest = hashlib.sha256(blob.encode())
        for path in self.videos():
            if path not in self.missing:
                digest.update(f"{path}\0{_size(dataset_dir / path)}\n".encode())
        return digest.hexdigest()[:16]


@dataclass
class Split:
    entries_csv: Path
    listed: int  # videos the split files list
    bad: int  # of which missing or unreadable (left out of the CSV)


@dataclass
class Index:
    dir: Path
    labels: Path
    bad_files: Path
    bad_total: int  # rows of bad_files.csv
    splits: dict[str, Split]


def require_layout(dataset_dir: Path, dataset: str, folders: dict[str, str]) -> None:
    """Refuse a dataset folder that lacks one of ``folders`` (name -> what it holds)."""
    for name in folders:
        if not (dataset_dir / name).is_dir():
            layout = " and ".join(f"{n}/{what}" for n, what in folders.items())
            raise UserError(f"{dataset_dir / name} not found: {dataset.upper()} needs {layout} under "
                            f"{dataset_dir} (run 'sideways download {dataset}' or unpack the "
                            "official archives there)")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def ensure_index(plan: Plan, dataset_dir: Path, index_dir: Path, progress: bool = True) -> Index:
    """Build the index on first use (or when the plan changed); reuse it otherwise."""
    fingerprint = plan.fingerprint(dataset_dir)
    info = _read_info(index_dir)
    if info is None or info.get("fingerprint") != fingerprint:
        _build(plan, dataset_dir, index_dir, fingerprint, progress)
        info = _read_info(index_dir)
    return Index(
        dir=index_dir,
        labels=index_dir / "labels.txt",
        bad_files=index_dir / "bad_files.csv",
        bad_total=info["bad_files"],
        splits={name: Split(index_dir / f"{name}.csv", counts["listed"], counts["bad"])
                for name, counts in info["splits"].items()},
    )


def _read_info(index_dir: Path) -> dict | None:
    try:
        info = json.loads((index_dir / "index.json").read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("format") == INDEX_FORMAT else None


# --- probing ------------------------------------------------------------------------------


def probe(path: str) -> tuple[str, int, float, str]:
    """(path, num_frames, fps, reason): reason is empty when the video is usable.

    Decoding the first and the last frame catches files that open but end early (a header that
    promises more frames than the data holds) at the price of one seek, not a full decode.
    """
    try:
        with closing(open_video(path)) as video:
            video.get([0, video.num_frames - 1])
            return path, video.num_frames, video.fps, ""
    except VideoDecodeError as exc:
        return path, 0, 0.0, exc.reason
    except Exception as exc:  # a decoder bug on one odd file must not abort indexing the rest
        text = str(exc).strip().splitlines()
        return path, 0, 0.0, f"{type(exc).__name__}: {text[0] if text else 'no message'}"


def _init_prober() -> None:
    # Ctrl-C is handled once, by the parent, which terminates the pool and removes the partial
    # index. FFmpeg and decord print every broken file's complaints straight to fd 2, which would
    # bury the progress bar; the reasons are kept in bad_files.csv instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # one thread, as a DataLoader worker: a forked child that runs a parallel op in a pool its
    # parent had started hangs (TorchCodec's frame conversion does, after the parent decoded)
    torch.set_num_threads(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def _probe_all(paths: list[str], label: str, progress: bool) -> dict[str, tuple[int, float, str]]:
    if not paths:
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(MAX_PROBE_WORKERS, cores, len(paths)))
    # Readers are opened only in the workers. Fork is safe on Linux (workers only decode);
    # elsewhere fork is unsafe (macOS) or unavailable.
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    columns = (TextColumn(f"indexing {label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    results = {}
    # The pool is created before the progress bar starts its refresh thread, so no lock is forked.
    with ctx.Pool(processes=workers, initializer=_init_prober) as pool:
        with Progress(*columns, console=Console(stderr=True), transient=True, disable=not progress) as bar:
            task = bar.add_task("videos", total=len(paths))
            for path, num_frames, fps, reason in pool.imap_unordered(probe, paths, chunksize=4):
                results[path] = (num_frames, fps, reason)
                bar.advance(task)
    return results


# --- writing ------------------------------------------------------------------------------


def _build(plan: Plan, dataset_dir: Path, index_dir: Path, fingerprint: str, progress: bool) -> None:
    to_probe = [p for p in plan.videos() if p not in plan.missing]
    probed = _probe_all([str(dataset_dir / p) for p in to_probe], plan.name, progress)
    found = {p: probed[str(dataset_dir / p)] for p in to_probe}
    bad = dict(plan.missing)
    bad.update({p: reason for p, (_, _, reason) in found.items() if reason})

    index_dir.parent.mkdir(parents=True, exist_ok=True)
    # Built next to the target so the final rename is atomic (same filesystem).
    tmp = Path(tempfile.mkdtemp(prefix=f".{index_dir.name}-", suffix=".tmp", dir=index_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the index should not be
    try:
        (tmp / "labels.txt").write_text("".join(f"{name}\n" for name in plan.classes))
        counts = {}
        for name, items in plan.splits.items():
            with open(tmp / f"{name}.csv", "w", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(INDEX_COLUMNS)
                for path, label in items:
                    if path not in bad:
                        num_frames, fps, _ = found[path]
                        writer.writerow([path, label, num_frames, f"{fps:g}"])
            counts[name] = {"listed": len(items), "bad": sum(path in bad for path, _ in items)}
        with open(tmp / "bad_files.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["path", "reason"])
            writer.writerows(sorted(bad.items()))
        info = {"format": INDEX_FORMAT, "dataset": plan.name, "fingerprint": fingerprint,
                "videos": len(plan.videos()), "bad_files": len(bad), "splits": counts}
        (tmp / "index.json").write_text(json.dumps(info, indent=2) + "\n")  # last: marks it complete
        _move_into_place(tmp, index_dir, fingerprint)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left after a successful rename


def _move_into_place(tmp: Path, target: Path, fingerprint: str) -> None:
    old = None
    if target.exists():  # a stale or damaged index: moved aside, removed once the new one is in
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        os.replace(target, old / "index")
    try:
        os.replace(tmp, target)
    except OSError:
        info = _read_info(target)
        if info is None or info.get("fingerprint") != fingerprint:  # else a concurrent run won
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
