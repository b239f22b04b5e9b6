"""A video written frame by frame with a caption drawn on each (``predict --out-video``): H.264 in
MP4, at the source's frame rate and size, never half written (a kill or a failure leaves no file)."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sideways_cli.support.atomic import writing


class LabelledVideo:
    """``with LabelledVideo(path, fps) as video: video.write(frame, caption)``: each uint8
    [H, W, 3] RGB frame with ``caption`` on a dark band across its top. The file is encoded beside
    ``path`` and renamed onto it when the ``with`` ends without an error; otherwise removed."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = path, fps
        self.tmp = path.with_name(path.name + ".tmp")
        self.container = self.stream = self.font = None

    def __enter__(self) -> LabelledVideo:
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.container = av.open(str(self.tmp), "w", format="mp4")
        return self

    def write(self, frame: np.ndarray, caption: str) -> None:
        height, width = frame.shape[:2]
        if self.stream is None:
            self._start(width, height)
        image = Image.fromarray(frame)
        draw = ImageDraw.Draw(image)
        band = self.font.size + self.font.size // 2
        draw.rectangle([0, 0, width, band], fill=(0, 0, 0))
        draw.text((self.font.size // 4, self.font.size // 4), caption, font=self.font, fill=(255, 255, 255))
        # yuv420p (what every player takes) needs even sides: an odd one gets a last row or column
        padded = np.zeros((self.stream.height, self.stream.width, 3), dtype=np.uint8)
        padded[:height, :width] = np.asarray(image)
        with writing(self.path):
            self.container.mux(self.stream.encode(av.VideoFrame.from_ndarray(padded, format="rgb24")))

    def _start(self, width: int, height: int) -> None:
        rate = Fraction(self.fps).limit_denominator(1001) if self.fps > 0 else Fraction(25)
        self.stream = self.container.add_stream("libx264", rate=rate, options={"crf": "20"})
        self.stream.width, self.stream.height = width + width % 2, height + height % 2
        self.stream.pix_fmt = "yuv420p"
        self.font = ImageFont.load_default(size=max(10, height // 16))

    def __exit__(self, kind, *exc) -> None:
        if kind is None and self.stream is not None:
            try:
                with writing(self.path):
                    self.container.mux(self.stream.encode())  # what the encoder holds back
                    self.container.close()
                    with open(self.tmp, "rb+") as f:
                        os.fsync(f.fileno())  # the data on the disk before the name points at it
                    os.replace(self.tmp, self.path)
                return
            except BaseException:
                self._discard()
                raise
        self._discard()  # a failure, or no frame to write: nothing stands at ``path``

    def _discard(self) -> None:
        try:
            self.container.close()
        except (av.error.FFmpegError, OSError, ValueError):
            pass  # the half-written file goes anyway
        self.tmp.unlink(missing_ok=True)
