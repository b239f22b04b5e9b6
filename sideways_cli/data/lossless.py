"""Lossless H.264 for generated video: what a reader decodes is fixed by the frames, not the encoder.

A lossy encoder's output depends on its decisions (rate control, mode choice), and libx264's
differ between runs of the same frames (its macroblock-tree lookahead, measured: 4 of 30 videos
encoded twice in one process) and between versions. Lossless coding (``qp 0``) makes every
decision irrelevant to the result: the decoded YUV planes are exactly the ones given to the
encoder. Those planes are computed here, in integer arithmetic, rather than by FFmpeg's swscale,
whose rounding may change between the FFmpeg builds that PyAV wheels bundle.

So two generations of the same frames decode to the same pixels, on any machine and with any PyAV;
only the container bytes (encoder version string, bitstream choices) may differ.
"""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np

# ITU-R BT.601, limited range ("tv"): what decoders assume for a stream that states no colour
# matrix, as these do. Coefficients x 256 (luma) and x 256 for chroma of a 2x2 sum (so x 1024).
_LUMA = (66, 129, 25)
_CB = (-38, -74, 112)
_CR = (112, -94, -18)


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> the yuv420p planes as one uint8 [H * 3 / 2, W] array (Y, then U, V).

    Chroma is taken from the mean RGB of each 2x2 block; every step is integer arithmetic with
    round-half-up, so the result is the same on every platform.
    """
    h, w, _ = frame.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even frame sides, got {w}x{h}")
    r, g, b = (frame[..., i].astype(np.int32) for i in range(3))
    y = ((_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b + 128) >> 8) + 16

    def block_sum(c: np.ndarray) -> np.ndarray:
        return c.reshape(h // 2, 2, w // 2, 2).sum(axis=(1, 3))

    rs, gs, bs = block_sum(r), block_sum(g), block_sum(b)
    u = ((_CB[0] * rs + _CB[1] * gs + _CB[2] * bs + 512) >> 10) + 128
    v = ((_CR[0] * rs + _CR[1] * gs + _CR[2] * bs + 512) >> 10) + 128
    planes = np.concatenate([y.ravel(), u.ravel(), v.ravel()])
    return planes.astype(np.uint8).reshape(h * 3 // 2, w)


def write_lossless_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int) -> None:
    """Encode uint8 [T, H, W, 3] RGB frames as lossless H.264 (yuv420p, High 4:4:4 Predictive)."""
    with av.open(str(path), "w") as container:
        # veryfast: as small as the slower presets for lossless coding of these frames, 2x faster
        stream = container.add_stream("libx264", rate=Fraction(fps),
                                      options={"qp": "0", "preset": "veryfast"})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # the generation pool already keeps every core busy
        for frame in frames:
            planes = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
            container.mux(stream.encode(planes))
        container.mux(stream.encode())
