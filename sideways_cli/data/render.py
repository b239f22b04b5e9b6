"""Procedurally rendered action videos where the direction of motion is the label.

Classes come in pairs that differ only by the direction of time (left/right, cw/ccw,
grow/shrink, ...): appearance is drawn identically for every class, so a single frame
cannot separate a pair and a network has to use motion. ``synthetic.py`` writes them to disk
as the embedded dataset; ``stream.py`` renders its streams directly.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

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
