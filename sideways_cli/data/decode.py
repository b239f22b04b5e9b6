"""Video decoding behind a small interface: PyAV, always installed; TorchCodec and decord where
they are.

TorchCodec (PyTorch's own decoder, the ``torchcodec`` extra, with the system's FFmpeg libraries)
and decord (no wheels for macOS on Apple Silicon or Linux on aarch64: ``pip`` installs it only
where it has) seek to the frames a clip needs instead of decoding from the start; both are
optional and imported only when used. ``data.decoder: auto`` takes the best installed: TorchCodec,
else decord (PyAV takes over a file either fails on), else PyAV; :func:`auto_decoder` says which,
and the run's log line names it. Every backend gives the same frames of a lossless video.
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Iterator, Literal, Protocol, Sequence

import numpy as np
import torch  # decord must be imported after torch: the other order can crash on clashing shared libraries

# isort: split
import av
from av.video.reformatter import VideoReformatter

# PyAV 17 scales frames in threads, as many as there are cores unless told; older PyAV has no
# such option and scales in the calling thread.
_SCALING_HAS_THREADS = int(av.__version__.split(".")[0]) >= 17

Backend = Literal["auto", "torchcodec", "torchcodec-cuda", "decord", "pyav"]


@cache
def decord_module() -> ModuleType | None:
    """decord, imported on first use; None where it is not installed (or cannot load)."""
    try:
        return importlib.import_module("decord")
    except ImportError:
        return None


@cache
def torchcodec_decoders() -> ModuleType | None:
    """``torchcodec.decoders``, imported on first use; None where torchcodec is not installed or
    cannot load FFmpeg's libraries (which it leaves to the system)."""
    try:
        decoders = importlib.import_module("torchcodec.decoders")
        ops = importlib.import_module("torchcodec._core.ops")
    except Exception:  # noqa: BLE001 - ImportError, or an OSError from a library that fails to load
        return None
    # newer torchcodec imports without FFmpeg (its image decoders need none) and says so here
    return decoders if getattr(ops, "_FFMPEG_AVAILABLE", True) else None


def auto_decoder() -> str:
    """What ``data.decoder: auto`` decodes with here."""
    if torchcodec_decoders() is not None:
        return "TorchCodec, PyAV where it fails"
    if decord_module() is not None:
        return "decord, PyAV where decord fails (TorchCodec is not installed)"
    return "PyAV (neither TorchCodec nor decord is installed)"


class DecodeError(Exception):
    """A problem with the user's data that should be reported without a traceback."""


class VideoDecodeError(DecodeError):
    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot decode video {self.path}: {reason}")


class VideoDecoder(Protocol):
    num_frames: int
    fps: float

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames at `indices` as uint8 [N, H, W, 3] (RGB)."""
        ...

    def close(self) -> None: ...


def _bounded_threads(num_threads: int) -> int:
    # decord treats 0 as "all cores", which oversubscribes DataLoader workers.
    return max(1, min(int(num_threads), os.cpu_count() or 1))


def _check_indices(path: Path, indices: Sequence[int], num_frames: int) -> list[int]:
    idx = [int(i) for i in indices]
    bad = [i for i in idx if not 0 <= i < num_frames]
    if bad:
        raise IndexError(f"frame indices {bad[:5]} out of range for {path} ({num_frames} frames)")
    return idx


class SeekingRequest:
    """The frames a seeking decoder is asked for: ``indices`` checked against ``num_frames``; it
    reads the distinct ones in ascending order (``unique``: fastest, and decord's most reliable
    order) and :meth:`ordered` gives them back as asked, repeats included."""

    def __init__(self, path: Path, indices: Sequence[int], num_frames: int) -> None:
        self.indices = _check_indices(path, indices, num_frames)
        if not self.indices:
            raise ValueError("no frame indices requested")
        self.unique = sorted(set(self.indices))

    def ordered(self, frames):
        """``frames`` of ``unique`` (a tensor or an array) in the order asked for."""
        position = {frame: i for i, frame in enumerate(self.unique)}
        return frames[[position[i] for i in self.indices]]


class DecordDecoder:
    def __init__(self, path: str | os.PathLike, num_threads: int = 1) -> None:
        self.path = Path(path)
        decord = decord_module()
        if decord is None:
            raise DecodeError("data.decoder=decord but decord is not installed (it has no wheels "
                              "for this platform, or was left out); set data.decoder=pyav or auto")
        try:
            self._reader = decord.VideoReader(str(self.path), num_threads=_bounded_threads(num_threads))
        except Exception as exc:  # decord raises DECORDError/RuntimeError with C++ stack dumps
            raise VideoDecodeError(self.path, f"decord could not open it ({_first_line(exc)})") from exc
        self.num_frames = len(self._reader)
        if self.num_frames == 0:
            raise VideoDecodeError(self.path, "it contains no video frames")
        self.fps = float(self._reader.get_avg_fps())

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        request = SeekingRequest(self.path, indices, self.num_frames)
        try:
            frames = self._reader.get_batch(request.unique).asnumpy()
        except Exception as exc:
            raise VideoDecodeError(self.path, f"decord failed to decode frames ({_first_line(exc)})") from exc
        if frames.ndim != 4 or frames.shape[-1] != 3:
            # Seen with decord 0.6 on some frame sizes (e.g. 48x48 H.264): 4-channel buffers.
            raise VideoDecodeError(self.path, f"decord returned frames of shape {frames.shape[1:]}")
        return torch.from_numpy(request.ordered(frames))

    def close(self) -> None:
        self._reader = None


class TorchCodecDecoder:
    """PyTorch's own decoder: FFmpeg through TorchCodec, seeking exactly to each frame asked for.
    ``device="cuda"`` decodes on the GPU (NVDEC) where TorchCodec was built for it."""

    def __init__(self, path: str | os.PathLike, num_threads: int = 1, device: str = "cpu") -> None:
        self.path = Path(path)
        decoders = torchcodec_decoders()
        if decoders is None:
            raise DecodeError("data.decoder=torchcodec but TorchCodec is not installed or cannot load "
                              "FFmpeg's libraries (pip install 'sideways-cli[torchcodec]' and FFmpeg "
                              "4 to 8); set data.decoder=pyav or auto")
        try:
            self._decoder = decoders.VideoDecoder(str(self.path), dimension_order="NHWC", seek_mode="exact",
                                                  num_ffmpeg_threads=_bounded_threads(num_threads),
                                                  device=device)
            self.num_frames = len(self._decoder)
            self.fps = float(self._decoder.metadata.average_fps or 0.0)
        except Exception as exc:  # noqa: BLE001 - TorchCodec raises RuntimeError/ValueError from C++
            raise VideoDecodeError(self.path, f"TorchCodec could not open it ({_first_line(exc)})") from exc
        if self.num_frames == 0:
            raise VideoDecodeError(self.path, "it contains no video frames")

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        request = SeekingRequest(self.path, indices, self.num_frames)
        try:
            frames = self._decoder.get_frames_at(request.unique).data
        except Exception as exc:  # noqa: BLE001
            raise VideoDecodeError(self.path, f"TorchCodec failed to decode frames ({_first_line(exc)})") from exc
        return request.ordered(frames)

    def close(self) -> None:
        self._decoder = None


class PyAVDecoder:
    """Sequential decoder: each `get` decodes from the start up to the last requested frame.

    Slower than decord for random access, but frame-exact and robust to odd containers.
    """

    def __init__(self, path: str | os.PathLike, num_threads: int = 1) -> None:
        self.path = Path(path)
        try:
            self._container = av.open(str(self.path))
        except Exception as exc:
            raise VideoDecodeError(self.path, f"PyAV could not open it ({_first_line(exc)})") from exc
        try:
            self._setup(num_threads)
        except VideoDecodeError:
            self._container.close()
            raise
        except Exception as exc:  # e.g. a demuxing error while counting packets
            self._container.close()
            raise VideoDecodeError(self.path, f"PyAV could not read it ({_first_line(exc)})") from exc

    def _setup(self, num_threads: int) -> None:
        if not self._container.streams.video:
            raise VideoDecodeError(self.path, "it has no video stream")
        self._stream = self._container.streams.video[0]
        if self._stream.codec_context is None:
            # A codec FFmpeg has no decoder for (or an unknown codec tag): PyAV opens the
            # container but gives the stream no codec context.
            raise VideoDecodeError(self.path, "PyAV has no decoder for its video codec")
        self._stream.thread_type = "AUTO"
        self._stream.codec_context.thread_count = _bounded_threads(num_threads)
        # A reformatter of its own rather than the one PyAV shares per thread: that one keeps its
        # scaling threads, which exist only in the process that started them, so a child forked
        # after its parent converted a frame (a DataLoader worker) waited on them for ever.
        self._reformatter = VideoReformatter()
        self._scaling = {"threads": _bounded_threads(num_threads)} if _SCALING_HAS_THREADS else {}
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = float(rate) if rate else 0.0
        self.num_frames = self._stream.frames or self._count_packets()
        if self.num_frames == 0:
            raise VideoDecodeError(self.path, "it contains no video frames")

    def _count_packets(self) -> int:
        # Some containers (e.g. raw streams) carry no frame count; demuxing is cheap, decoding is not.
        count = sum(1 for packet in self._container.demux(self._stream) if packet.size)
        self._container.seek(0)
        return count

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        idx = _check_indices(self.path, indices, self.num_frames)
        if not idx:
            raise ValueError("no frame indices requested")
        wanted, last = set(idx), max(idx)
        found: dict[int, np.ndarray] = {}
        try:
            self._container.seek(0)
            for i, frame in enumerate(self._container.decode(self._stream)):
                if i in wanted:
                    found[i] = self._rgb(frame)
                if i == last:
                    break
        except Exception as exc:
            raise VideoDecodeError(self.path, f"PyAV failed to decode frames ({_first_line(exc)})") from exc
        if len(found) < len(wanted):
            reason = f"stream ended before frame {last} ({self.num_frames} declared)"
            raise VideoDecodeError(self.path, reason)
        return torch.from_numpy(np.stack([found[i] for i in idx]))

    def frames(self) -> Iterator[torch.Tensor]:
        """Every frame from the first, uint8 [H, W, 3], decoded as it is taken."""
        try:
            self._container.seek(0)
            for frame in self._container.decode(self._stream):
                yield torch.from_numpy(self._rgb(frame))
        except av.error.FFmpegError as exc:
            raise VideoDecodeError(self.path, f"PyAV failed to decode frames ({_first_line(exc)})") from exc

    def _rgb(self, frame: av.VideoFrame) -> np.ndarray:
        return self._reformatter.reformat(frame, format="rgb24", **self._scaling).to_ndarray()

    def close(self) -> None:
        self._container.close()


class _FallbackDecoder:
    """TorchCodec or decord, switching to PyAV for good if it opens a file but fails to decode it
    (decord 0.6 mangles some frame sizes that FFmpeg itself decodes fine)."""

    def __init__(self, decoder: TorchCodecDecoder | DecordDecoder, num_threads: int) -> None:
        self._decoder: VideoDecoder = decoder
        self._num_threads = num_threads
        self.path, self.num_frames, self.fps = decoder.path, decoder.num_frames, decoder.fps

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        try:
            return self._decoder.get(indices)
        except VideoDecodeError as seeking_error:
            if isinstance(self._decoder, PyAVDecoder):
                raise
            self._decoder.close()
            try:
                self._decoder = PyAVDecoder(self.path, self._num_threads)
            except VideoDecodeError as pyav_error:
                reason = f"{seeking_error.reason}; {pyav_error.reason}"
                raise VideoDecodeError(self.path, reason) from pyav_error
            # The caller's indices were checked against the first decoder's count, which comes
            # from demuxing the whole file; PyAV's may be a header's claim, smaller or larger. PyAV
            # decodes sequentially and raises if the stream ends before a requested frame, so
            # letting it reach that count is safe; clamping indices would return substituted frames.
            self._decoder.num_frames = max(self._decoder.num_frames, self.num_frames)
            return self._decoder.get(indices)

    def close(self) -> None:
        self._decoder.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_video(path: str | os.PathLike, backend: Backend = "auto", num_threads: int = 1) -> VideoDecoder:
    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError(path, "file does not exist")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "file is empty")
    if backend == "torchcodec":
        return TorchCodecDecoder(path, num_threads)
    if backend == "torchcodec-cuda":  # frames on this process's GPU
        return TorchCodecDecoder(path, num_threads, device="cuda")
    if backend == "decord":
        return DecordDecoder(path, num_threads)
    if backend == "pyav":
        return PyAVDecoder(path, num_threads)
    if backend != "auto":
        raise ValueError(f"unknown decoder backend {backend!r} (expected 'auto', 'torchcodec', "
                         "'torchcodec-cuda', 'decord' or 'pyav')")
    seeking = (TorchCodecDecoder if torchcodec_decoders() is not None
               else DecordDecoder if decord_module() is not None else None)
    if seeking is None:
        return PyAVDecoder(path, num_threads)
    try:
        return _FallbackDecoder(seeking(path, num_threads), num_threads)
    except VideoDecodeError as seeking_error:
        try:
            return PyAVDecoder(path, num_threads)
        except VideoDecodeError as pyav_error:
            raise VideoDecodeError(path, f"{seeking_error.reason}; {pyav_error.reason}") from pyav_error
