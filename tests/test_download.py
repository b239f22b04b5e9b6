"""`sideways download` against a local HTTP server: official layouts through --mirror, resume,
retries, verification, idempotence, and archives that try to write outside the data root.

The server (127.0.0.1 only) speaks Range requests and can drop a connection part-way. RAR archives
are written here in the RAR 4 "store" format (uncompressed, documented in the RAR technote), so
the real .rar sources are exercised without a RAR compressor.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import re
import struct
import sys
import threading
import zipfile
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from cli_helpers import run_main
from sideways_cli.data import catalog, sources
from sideways_cli.data.download import download_dataset
from sideways_cli.data.extract import UnsafeArchive, extract_once, safe_extract
from sideways_cli.data.fetch import ChecksumError, DownloadError, Record, ensure_file
from sideways_cli.data.sources import Source
from sideways_cli.support.errors import UserError

try:
    import unrar.cffi  # noqa: F401

    HAVE_RAR = True
except ImportError:
    HAVE_RAR = False
needs_rar = pytest.mark.skipif(not HAVE_RAR, reason="unrar2-cffi is not installed")


# --- a local server with Range support ----------------------------------------------------


class Server:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (file, Range header)
        self.drop_after: dict[str, int] = {}  # file -> bytes sent before dropping, once
        self.honour_range = True
        self.url = ""


def _handler(state: Server) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            name = self.path.lstrip("/")
            state.requests.append((name, self.headers.get("Range")))
            data = state.files.get(name)
            if data is None:
                self.send_error(404)
                return
            start, status = 0, 200
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match and state.honour_range:
                start, status = int(match.group(1)), 206
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            body = data[start:]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            drop = state.drop_after.pop(name, None)
            self.wfile.write(body if drop is None else body[:drop])
            if drop is not None:
                self.close_connection = True  # short body: the client sees the transfer cut

        def log_message(self, *args) -> None:
            pass

    return Handler


@pytest.fixture
def server():
    state = Server()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


# --- archives in the official layouts -----------------------------------------------------


def _rar_block(kind: int, flags: int, body: bytes) -> bytes:
    head = struct.pack("<BHH", kind, flags, 7 + len(body)) + body
    return struct.pack("<H", zlib.crc32(head) & 0xFFFF) + head


def rar4(entries: dict[str, bytes | None], modes: dict[str, int] | None = None) -> bytes:
    """A RAR 4 store archive; None marks a directory, ``modes`` sets Unix modes (symlinks)."""
    out = b"Rar!\x1a\x07\x00" + _rar_block(0x73, 0, bytes(6))  # marker, main header
    for name, data in entries.items():
        raw, payload = name.encode(), data or b""
        mode = (modes or {}).get(name, 0o40755 if data is None else 0o100644)
        flags = 0x8000 | (0xE0 if data is None else 0)  # LONG_BLOCK, directory
        body = struct.pack("<IIBIIBBHI", len(payload), len(payload), 3, zlib.crc32(payload),
                           0x21 << 16, 20, 0x30, len(raw), mode) + raw  # host Unix, method store
        out += _rar_block(0x74, flags, body) + payload
    return out + _rar_block(0x7B, 0x4000, b"")


def zip_bytes(entries: dict[str, bytes | None], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name if data is not None else name.rstrip("/") + "/", data or b"")
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system, info.external_attr = 3, (0o120777 << 16)
            zf.writestr(info, target)
    return buf.getvalue()


@pytest.fixture(scope="module")
def videos() -> list[bytes]:
    """Two distinct tiny AVIs (8 frames, 32x32, MPEG-4 part 2)."""
    out = []
    for seed in range(2):
        buf = io.BytesIO()
        with av.open(buf, "w", format="avi") as container:
            stream = container.add_stream("mpeg4", rate=Fraction(25))
            stream.width = stream.height = 32
            stream.pix_fmt = "yuv420p"
            rng = np.random.default_rng(seed)
            for _ in range(8):
                frame = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        out.append(buf.getvalue())
    return out


UCF_CLASSES = ["ApplyEyeMakeup", "Archery"]
HMDB_CLASSES = ["brush_hair", "cartwheel"]


def ucf_archives(videos: list[bytes], fmt: str = "rar") -> dict[str, bytes]:
    members: dict[str, bytes | None] = {"UCF-101": None}
    for c in UCF_CLASSES:
        members[f"UCF-101/{c}"] = None
        for g, data in enumerate(videos, 1):
            members[f"UCF-101/{c}/v_{c}_g{g:02d}_c01.avi"] = data
    lists = {"ucfTrainTestlist/classInd.txt":
             "".join(f"{i} {c}\n" for i, c in enumerate(UCF_CLASSES, 1)).encode()}
    for s in (1, 2, 3):
        lists[f"ucfTrainTestlist/trainlist0{s}.txt"] = "".join(
            f"{c}/v_{c}_g01_c01.avi {i}\n" for i, c in enumerate(UCF_CLASSES, 1)).encode()
        lists[f"ucfTrainTestlist/testlist0{s}.txt"] = "".join(
            f"{c}/v_{c}_g02_c01.avi\n" for c in UCF_CLASSES).encode()
    pack = rar4 if fmt == "rar" else zip_bytes
    return {"UCF101.rar": pack(members),
            "UCF101TrainTestSplits-RecognitionTask.zip": zip_bytes(lists)}


def hmdb_archives(videos: list[bytes]) -> dict[str, bytes]:
    outer = {f"{c}.rar": rar4({c: None, **{f"{c}/{c}_{i}.avi": v for i, v in enumerate(videos)}})
             for c in HMDB_CLASSES}
    splits: dict[str, bytes | None] = {"testTrainMulti_7030_splits": None}
    for c in HMDB_CLASSES:
        for s in (1, 2, 3):
            splits[f"testTrainMulti_7030_splits/{c}_test_split{s}.txt"] = \
                f"{c}_0.avi 1 \n{c}_1.avi 2 \n".encode()
    return {"hmdb51_org.rar": rar4(outer), "test_train_splits.rar": rar4(splits)}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith((".part", ".tmp"))]


# --- whole datasets -----------------------------------------------------------------------


@needs_rar
def test_ucf101_through_the_cli_with_a_mirror_then_idempotent(server, videos, tmp_path,
                                                              monkeypatch, capsys):
    server.files = ucf_archives(videos)
    indexed = []
    monkeypatch.setattr(catalog, "index_dataset", lambda *a, **k: indexed.append(a), raising=False)
    root = tmp_path / "data"
    code, err = run_main(["download", "ucf101", "--root", root,
                         "--mirror", server.url + "/", "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    ds = root / "ucf101"
    for c in UCF_CLASSES:
        assert (ds / "UCF-101" / c / f"v_{c}_g02_c01.avi").read_bytes() == videos[1]
    assert sorted(p.name for p in (ds / "ucfTrainTestlist").iterdir()) == sorted(
        ["classInd.txt"] + [f"{k}list0{s}.txt" for k in ("train", "test") for s in (1, 2, 3)])
    for name, data in server.files.items():
        assert (ds / "downloads" / name).read_bytes() == data
        record = Record.read(ds / "downloads" / name)
        assert (record.sha256, record.size) == (sha(data), len(data))
    assert indexed == [("ucf101", root)]
    assert not leftovers(root)
    assert len(server.requests) == 2 and all(r is None for _, r in server.requests)

    server.requests.clear()
    code, err = run_main(["download", "ucf101", "--root", root,
                         "--mirror", server.url, "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    assert server.requests == []  # verified files and extraction markers: no network I/O at all


@needs_rar
def test_hmdb51_inner_archives_are_extracted_too(server, videos, tmp_path):
    server.files = hmdb_archives(videos)
    ds = download_dataset("hmdb51", tmp_path, mirror=server.url, progress=True)  # bars drawn too
    assert ds == tmp_path / "hmdb51"
    for c in HMDB_CLASSES:
        assert sorted(p.name for p in (ds / "videos" / c).iterdir()) == [f"{c}_0.avi", f"{c}_1.avi"]
        assert (ds / "videos" / c / f"{c}_1.avi").read_bytes() == videos[1]
        assert (ds / "testTrainMulti_7030_splits" / f"{c}_test_split3.txt").is_file()
    assert sorted(p.name for p in (ds / "videos").iterdir()) == HMDB_CLASSES  # no inner .rar left
    assert not leftovers(tmp_path)


def test_sources_may_be_zip_archives(server, videos, tmp_path, monkeypatch):
    server.files = ucf_archives(videos, fmt="zip")
    server.files["UCF101.zip"] = server.files.pop("UCF101.rar")
    monkeypatch.setitem(sources.SOURCES, "ucf101", (
        Source("UCF101.zip", "https://unused.invalid/UCF101.zip", target="UCF-101", top="UCF-101"),
        sources.SOURCES["ucf101"][1]))
    ds = download_dataset("ucf101", tmp_path, mirror=server.url, progress=False)
    assert (ds / "UCF-101" / "Archery" / "v_Archery_g01_c01.avi").read_bytes() == videos[0]
    assert (ds / "ucfTrainTestlist" / "classInd.txt").read_text().startswith("1 ApplyEyeMakeup")


def test_synthetic_uses_the_config_defaults(tmp_path, monkeypatch):
    from sideways_cli.config import DataConfig, SyntheticConfig
    from sideways_cli.data import synthetic

    calls = []
    monkeypatch.setattr(synthetic, "ensure_synthetic",
                        lambda root, **kw: calls.append((root, kw)) or root / "synthetic-x")
    assert download_dataset("synthetic", tmp_path, progress=False) == tmp_path / "synthetic-x"
    syn = SyntheticConfig()
    assert calls == [(tmp_path, dict(train_per_class=syn.train_per_class,
                                     val_per_class=syn.val_per_class, num_frames=syn.num_frames,
                                     size=DataConfig().size, seed=syn.seed, progress=False))]


def test_unknown_dataset_is_one_line(monkeypatch, capsys, tmp_path):
    code, err = run_main(["download", "kinetics", "--root", tmp_path], monkeypatch, capsys)
    assert code == 2
    assert "unknown dataset 'kinetics'; choose from ucf101, hmdb51, synthetic" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# --- transfers ----------------------------------------------------------------------------

PAYLOAD = bytes(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8))


def test_resume_after_an_interrupted_transfer(server, tmp_path):
    server.files["big.bin"] = PAYLOAD
    server.drop_after["big.bin"] = 100_000
    dest = tmp_path / "big.bin"
    with pytest.raises(DownloadError, match="re-run to resume"):
        ensure_file(f"{server.url}/big.bin", dest, progress=False, retries=0)
    part = tmp_path / "big.bin.part"
    assert part.stat().st_size == 100_000 and not dest.exists()
    ensure_file(f"{server.url}/big.bin", dest, progress=False, retries=0)
    assert server.requests[-1] == ("big.bin", "bytes=100000-")
    assert dest.read_bytes() == PAYLOAD and not part.exists()


def test_a_dropped_connection_is_retried_and_resumed_in_one_run(server, tmp_path):
    server.files["big.bin"] = PAYLOAD
    server.drop_after["big.bin"] = 70_000
    dest = ensure_file(f"{server.url}/big.bin", tmp_path / "big.bin", sha256=sha(PAYLOAD),
                       progress=False, retries=2, backoff=0)
    assert server.requests == [("big.bin", None), ("big.bin", "bytes=70000-")]
    assert dest.read_bytes() == PAYLOAD


def test_a_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.files["big.bin"] = PAYLOAD
    server.honour_range = False
    (tmp_path / "big.bin.part").write_bytes(b"stale bytes from another file")
    dest = ensure_file(f"{server.url}/big.bin", tmp_path / "big.bin", progress=False)
    assert server.requests == [("big.bin", "bytes=29-")]
    assert dest.read_bytes() == PAYLOAD


def test_a_complete_part_answered_416_is_finished(server, tmp_path):
    server.files["big.bin"] = PAYLOAD
    (tmp_path / "big.bin.part").write_bytes(PAYLOAD)
    dest = ensure_file(f"{server.url}/big.bin", tmp_path / "big.bin", sha256=sha(PAYLOAD),
                       progress=False)
    assert server.requests == [("big.bin", f"bytes={len(PAYLOAD)}-")]
    assert dest.read_bytes() == PAYLOAD


def test_checksum_mismatch_is_refused_and_nothing_renamed(server, tmp_path):
    server.files["big.bin"] = PAYLOAD
    dest = tmp_path / "big.bin"
    with pytest.raises(ChecksumError) as exc:
        ensure_file(f"{server.url}/big.bin", dest, sha256="0" * 64, progress=False)
    message = str(exc.value)
    assert "big.bin.part" in message and "0" * 64 in message and sha(PAYLOAD) in message
    assert "delete" in message and "\n" not in message
    assert not dest.exists() and (tmp_path / "big.bin.part").read_bytes() == PAYLOAD


def test_a_redownload_is_checked_against_the_first_record(server, tmp_path):
    server.files["big.bin"] = PAYLOAD
    dest = ensure_file(f"{server.url}/big.bin", tmp_path / "big.bin", progress=False)
    dest.unlink()
    server.files["big.bin"] = PAYLOAD[::-1]  # the mirror now serves something else
    with pytest.raises(ChecksumError, match=sha(PAYLOAD)):
        ensure_file(f"{server.url}/big.bin", dest, progress=False)
    assert not dest.exists()


def test_a_changed_local_file_is_refused(server, tmp_path):
    server.files["big.bin"] = PAYLOAD
    dest = ensure_file(f"{server.url}/big.bin", tmp_path / "big.bin", progress=False)
    dest.write_bytes(PAYLOAD[:-1] + b"!")
    with pytest.raises(ChecksumError, match=f"delete {dest}"):
        ensure_file(f"{server.url}/big.bin", dest, progress=False)
    assert len(server.requests) == 1


def test_http_errors_are_one_line_through_the_cli(server, tmp_path, monkeypatch, capsys):
    code, err = run_main(["download", "hmdb51", "--root", tmp_path,
                         "--mirror", server.url, "--quiet"], monkeypatch, capsys)
    assert code == 2
    assert f"could not download {server.url}/hmdb51_org.rar: HTTP 404" in err and "--mirror" in err
    assert "Traceback" not in err
    with pytest.raises(DownloadError, match="must start with"):
        ensure_file("ftp://example/x", tmp_path / "x", progress=False)


# --- unsafe archives ----------------------------------------------------------------------


UNSAFE_ZIPS = {
    "parent": ({"ok.txt": b"fine", "../evil": b"x"}, None, "'..' component"),
    "backslash": ({"..\\evil": b"x"}, None, "'..' component"),
    "absolute": ({"ok.txt": b"fine", "/tmp/evil": b"x"}, None, "absolute path"),
    "drive": ({"C:/evil": b"x"}, None, "drive letter"),
    "symlink": ({"ok.txt": b"fine"}, {"top/link": "../../evil"}, "outside the extraction folder"),
    "abs-symlink": ({}, {"link": "/etc"}, "absolute path"),
    "chained-links": ({}, {"d/up": "..", "d/up/up2": ".."}, "lies under a link"),
}


def _assert_nothing_written(tmp_path: Path, root: Path) -> None:
    assert [p.name for p in tmp_path.iterdir()] == ["root"]  # nothing beside the root
    assert [p.name for p in root.iterdir()] == [f"a.{'zip' if (root / 'a.zip').exists() else 'rar'}"]


@pytest.mark.parametrize("case", UNSAFE_ZIPS)
def test_unsafe_zip_members_are_refused_before_writing(case, tmp_path):
    entries, links, why = UNSAFE_ZIPS[case]
    root = tmp_path / "root"
    root.mkdir()
    archive = root / "a.zip"
    archive.write_bytes(zip_bytes(entries, links))
    with pytest.raises(UnsafeArchive, match=re.escape(why)) as exc:
        extract_once(archive, root, "out", progress=False)
    assert str(archive) in str(exc.value)
    _assert_nothing_written(tmp_path, root)


@needs_rar
@pytest.mark.parametrize("entries, modes, why", [
    ({"ok.txt": b"fine", "../evil": b"x"}, None, "'..' component"),
    ({"/tmp/evil": b"x"}, None, "absolute path"),
    ({"link": b"../../evil"}, {"link": 0o120777}, "link"),
])
def test_unsafe_rar_members_are_refused_before_writing(entries, modes, why, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    archive = root / "a.rar"
    archive.write_bytes(rar4(entries, modes))
    with pytest.raises(UnsafeArchive, match=re.escape(why)):
        extract_once(archive, root, "out", progress=False)
    _assert_nothing_written(tmp_path, root)


def test_links_inside_the_root_are_kept(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes({"top/real.txt": b"data"}, {"top/alias": "real.txt"}))
    out = extract_once(archive, tmp_path, "top", top="top", progress=False)
    assert os.readlink(out / "alias") == "real.txt" and (out / "alias").read_bytes() == b"data"


def test_extraction_is_skipped_once_done_and_partial_folders_are_not_trusted(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes({"top/x.txt": b"1"}))
    out = extract_once(archive, tmp_path, "top", top="top", progress=False)
    (out / "x.txt").write_bytes(b"edited")
    extract_once(archive, tmp_path, "top", top="top", progress=False)
    assert (out / "x.txt").read_bytes() == b"edited"  # the marker says done: not redone
    (tmp_path / ".top.extracted").unlink()
    with pytest.raises(UserError, match="delete it and re-run"):
        extract_once(archive, tmp_path, "top", top="top", progress=False)


@needs_rar
def test_a_damaged_rar_is_reported(tmp_path):
    data = bytearray(rar4({"top": None, "top/x.bin": PAYLOAD[:1000]}))
    data[-200] ^= 0xFF  # inside the stored data: the member's CRC no longer matches
    archive = tmp_path / "a.rar"
    archive.write_bytes(bytes(data))
    with pytest.raises(UserError, match="'top/x.bin' is damaged"):
        extract_once(archive, tmp_path, "top", top="top", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.rar"]


def test_a_missing_rar_extractor_names_the_archive_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "unrar.cffi", None)  # makes the import fail
    archive = tmp_path / "UCF101.rar"
    archive.write_bytes(rar4({"top/x.txt": b"1"}))
    with pytest.raises(UserError, match=r"UCF101\.rar: no RAR extractor; .*pip install unrar2-cffi"):
        safe_extract(archive, tmp_path, progress=False)
