"""Procedurally generated action videos where the direction of motion is the label.

Classes come in pairs that differ only by the direction of time (left/right, cw/ccw,
grow/shrink, ...): appearance is drawn identically for every class, so a single frame
cannot separate a pair and a network has to use motion. Videos are written as real
H.264 mp4 files so the data path is the same as for a downloaded dataset; lossless ones, so that
every generation decodes to the same pixels (``lossless.py``).
"""

from __future__ import annotations

import colorsys
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

SYNTHETIC_CLASSES: list[str] = [
    "move_left",
    "move_right",
    "move_up",
    "move_down",
    "rotate_cw",
    "rotate_ccw",
    "grow",
    "shrink",
    "fade_in",
    "fade_out",
]

# Bump whenever rendering or encoding changes, so cached datasets are regenerated.
# 4: lossless H.264 (version 3's lossy encoding decoded differently from one generation to the next)
_GENERATOR_VERSION = 4
_SPLITS = {"train": 0, "val": 1}

# Unit screen directions (x right, y down) for the translation classes.
_DIRECTIONS = {
    "move_left": (-1.0, 0.0),
    "move_right": (1.0, 0.0),
    "move_up": (0.0, -1.0),
    "move_down": (0.0, 1.0),
}


# --- shapes -------------------------------------------------------------------------------
# A shape is a union of convex pieces in local coordinates spanning roughly [-1, 1]^2. Each
# piece is an intersection of half-planes n.p <= c (unit n), optionally with a disc, which gives
# a cheap signed-distance approximation and so anti-aliased edges with sub-pixel motion.
# No shape has rotational symmetry, so rotation direction is always visible.


@dataclass(frozen=True)
class _Piece:
    planes: tuple[tuple[float, float, float], ...]
    disc: tuple[float, float, float] | None = None


def _box(x0: float, x1: float, y0: float, y1: float) -> _Piece:
    return _Piece(((-1, 0, -x0), (1, 0, x1), (0, -1, -y0), (0, 1, y1)))


def _triangle(*vertices: tuple[float, float]) -> _Piece:
    centre = np.mean(vertices, axis=0)
    planes = []
    for a, b in zip(vertices, vertices[1:] + vertices[:1]):
        normal = np.array([b[1] - a[1], a[0] - b[0]])
        normal /= np.linalg.norm(normal)
        if normal @ (centre - a) > 0:
            normal = -normal
        planes.append((float(normal[0]), float(normal[1]), float(normal @ a)))
    return _Piece(tuple(planes))


_SHAPES: dict[str, tuple[_Piece, ...]] = {
    "L": (_box(-0.8, -0.3, -0.9, 0.9), _box(-0.8, 0.8, 0.4, 0.9)),
    "T": (_box(-0.9, 0.9, -0.9, -0.4), _box(-0.25, 0.25, -0.9, 0.9)),
    "P": (_box(-0.7, -0.3, -0.9, 0.9), _box(-0.3, 0.7, -0.9, -0.1)),
    "cross": (_box(-0.2, 0.2, -0.9, 0.9), _box(-0.6, 0.6, -0.55, -0.15)),
    "triangle": (_triangle((0.0, -0.95), (-0.55, 0.8), (0.55, 0.8)),),
    "arrow": (_box(-0.9, 0.15, -0.2, 0.2), _triangle((0.15, -0.6), (0.15, 0.6), (0.95, 0.0))),
    "half_disc": (_Piece(((0, -1, 0.4),), disc=(0.0, -0.4, 1.0)),),
}
_SHAPE_NAMES = sorted(_SHAPES)


def _shape_distance(pieces: tuple[_Piece, ...], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    best = None
    for piece in pieces:
        d = None
        for nx, ny, c in piece.planes:
            plane = nx * u + ny * v - c
            d = plane if d is None else np.maximum(d, plane)
        if piece.disc is not None:
            cx, cy, r = piece.disc
            circle = np.hypot(u - cx, v - cy) - r
            d = circle if d is None else np.maximum(d, circle)
        best = d if best is None else np.minimum(best, d)
    return best


# --- rendering ----------------------------------------------------------------------------


def _smooth_walk(
    rng: np.random.Generator, num_frames: int, speed_std: float, rho: float = 0.94
) -> np.ndarray:
    """Offsets [T, 2] of an integrated AR(1) velocity: a random walk without jerks."""
    noise = rng.normal(size=(num_frames, 2))
    velocity = np.empty((num_frames, 2))
    velocity[0] = noise[0] * speed_std
    innovation = speed_std * np.sqrt(1 - rho**2)
    for t in range(1, num_frames):
        velocity[t] = rho * velocity[t - 1] + innovation * noise[t]
    return np.cumsum(velocity, axis=0) - velocity[0]


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.uniform(0, 1), rng.uniform(0.55, 1.0), rng.uniform(0.7, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v))


def _coverage(distance_px: np.ndarray) -> np.ndarray:
    return np.clip(0.5 - distance_px, 0.0, 1.0).astype(np.float32)


def _blend(canvas: np.ndarray, coverage: np.ndarray, colour: np.ndarray) -> None:
    a = coverage[..., None]
    canvas *= 1 - a
    canvas += a * colour


def _background(
    rng: np.random.Generator, num_frames: int, size: int, k: float
) -> tuple[np.ndarray, np.ndarray]:
    """Base colour [3] and a slowly drifting periodic texture [T, S, S, 3] (periodic, so it wraps)."""
    # Muted colours keep the saturated objects visible against the background.
    base = rng.uniform(0.25, 0.45) + rng.uniform(-0.08, 0.08, size=3)
    freqs = rng.integers(-3, 4, size=(6, 2))
    freqs[(freqs == 0).all(axis=1)] = (1, 2)
    amps = rng.uniform(0.5, 1.0, size=6) / np.linalg.norm(freqs, axis=1)
    amps *= 0.10 / amps.sum()
    phases = rng.uniform(0, 2 * np.pi, size=6)
    gains = rng.uniform(0.6, 1.0, size=3)
    heading = rng.uniform(0, 2 * np.pi)
    drift = rng.uniform(0.0, 0.1) * k * np.array([np.cos(heading), np.sin(heading)])

    # cos(a + b) = cos a cos b - sin a sin b separates x from y: one batched matmul per video
    # instead of a cosine per pixel, frame and component.
    t = np.arange(num_frames)[None, :, None]
    coords = np.arange(size)[None, None, :] + 0.5
    ax = 2 * np.pi * freqs[:, 0, None, None] * (coords - drift[0] * t) / size + phases[:, None, None]
    by = 2 * np.pi * freqs[:, 1, None, None] * (coords - drift[1] * t) / size
    a = amps[:, None, None]
    along_y = np.concatenate([a * np.cos(by), -a * np.sin(by)]).transpose(1, 2, 0)  # [T, S(y), 2K]
    along_x = np.concatenate([np.cos(ax), np.sin(ax)]).transpose(1, 0, 2)  # [T, 2K, S(x)]
    texture = along_y @ along_x
    return base, texture[..., None] * gains


@dataclass(frozen=True)
class _Track:
    """The main object over time: per-frame centre [T, 2], angle, scale and opacity [T]."""

    shape: tuple[_Piece, ...]
    colour: np.ndarray
    radius: float
    centre: np.ndarray
    angle: np.ndarray
    scale: np.ndarray
    alpha: np.ndarray


def _main_track(name: str, rng: np.random.Generator, num_frames: int, size: int, k: float) -> _Track:
    # Every parameter is drawn for every class, so the rng stream (and thus everything drawn
    # after it) does not depend on the class.
    shape = _SHAPES[_SHAPE_NAMES[rng.integers(len(_SHAPE_NAMES))]]
    colour = _random_colour(rng)
    radius = size * rng.uniform(0.28, 0.36)
    start = rng.uniform(0, size, size=2)
    angle0 = rng.uniform(0, 2 * np.pi)
    # Static classes get a size and opacity inside the ranges the grow/shrink and fade
    # classes sweep through, so neither reveals the class on its own.
    static_scale, static_alpha = rng.uniform(0.8, 1.1), rng.uniform(0.7, 1.0)
    speed = rng.uniform(1.0, 2.0) * k
    heading_jitter = rng.uniform(-np.pi / 12, np.pi / 12)
    spin = rng.uniform(1.0, 2.0) * k / radius  # rad/frame: the shape's tips move 1-2 px/frame
    scale_small, scale_large = rng.uniform(0.6, 0.7), rng.uniform(1.1, 1.2)
    alpha_low, alpha_high = rng.uniform(0.1, 0.3), rng.uniform(0.85, 1.0)
    wobble = _smooth_walk(rng, num_frames, speed_std=0.04 * k)

    t = np.arange(num_frames, dtype=np.float64)
    ramp = t / max(num_frames - 1, 1)
    centre = start + wobble
    if name in _DIRECTIONS:
        dx, dy = _DIRECTIONS[name]
        c, s = np.cos(heading_jitter), np.sin(heading_jitter)
        centre = centre + speed * t[:, None] * np.array([c * dx - s * dy, s * dx + c * dy])
    angle = angle0 + {"rotate_cw": spin, "rotate_ccw": -spin}.get(name, 0.0) * t
    scale = {
        "grow": scale_small + (scale_large - scale_small) * ramp,
        "shrink": scale_large + (scale_small - scale_large) * ramp,
    }.get(name, np.full(num_frames, static_scale))
    alpha = {
        "fade_in": alpha_low + (alpha_high - alpha_low) * ramp,
        "fade_out": alpha_high + (alpha_low - alpha_high) * ramp,
    }.get(name, np.full(num_frames, static_alpha))
    return _Track(shape, colour, radius, centre, angle, scale, alpha)


def _offsets(centre: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Torus offsets [T, 1, W] and [T, H, 1] of every pixel centre from a moving point [T, 2]."""
    pix = np.arange(size) + 0.5
    dx = (pix[None, None, :] - centre[:, 0, None, None] + size / 2) % size - size / 2
    dy = (pix[None, :, None] - centre[:, 1, None, None] + size / 2) % size - size / 2
    return dx, dy


def _draw_track(canvas: np.ndarray, track: _Track, size: int) -> None:
    dx, dy = _offsets(track.centre, size)
    cos, sin = np.cos(track.angle)[:, None, None], np.sin(track.angle)[:, None, None]
    extent = (track.radius * track.scale)[:, None, None]
    # Inverse rotation into shape coordinates; a growing angle turns clockwise on screen (y down).
    u = (cos * dx + sin * dy) / extent
    v = (-sin * dx + cos * dy) / extent
    coverage = _coverage(_shape_distance(track.shape, u, v) * extent)
    _blend(canvas, coverage * track.alpha[:, None, None], track.colour)


def _draw_distractors(canvas: np.ndarray, rng: np.random.Generator, size: int, k: float) -> None:
    num_frames = canvas.shape[0]
    for _ in range(rng.integers(0, 3)):
        radius, colour = rng.uniform(0.04, 0.07) * size, _random_colour(rng)
        is_box = rng.integers(2)
        path = rng.uniform(0, size, size=2) + _smooth_walk(rng, num_frames, speed_std=0.2 * k)
        dx, dy = _offsets(path, size)
        distance = np.maximum(np.abs(dx), np.abs(dy)) if is_box else np.hypot(dx, dy)
        _blend(canvas, _coverage(distance - radius), colour)


def render_video(
    class_index: int, rng: np.random.Generator, num_frames: int, size: int, *, clutter: bool = True
) -> np.ndarray:
    """Render one video as uint8 [T, H, W, 3].

    The same rng state gives the same appearance in every class (and, for the translation and
    rotation pairs, the same first frame). `clutter=False` leaves out the background texture,
    distractors and noise but keeps the main object identical, which makes motion easy to
    measure in tests.
    """
    k = size / 32  # motion and sizes are specified at 32x32
    track = _main_track(SYNTHETIC_CLASSES[class_index], rng, num_frames, size, k)
    base, texture = _background(rng, num_frames, size, k)
    canvas = np.broadcast_to(base.astype(np.float32), (num_frames, size, size, 3)).copy()
    if clutter:
        canvas += texture
        _draw_distractors(canvas, rng, size, k)
        _draw_track(canvas, track, size)
        canvas += rng.normal(0, 1.0 / 255, size=canvas.shape)
    else:
        _draw_track(canvas, track, size)
    return np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8)


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
