"""Safe, idempotent extraction of zip and rar archives.

Every member is checked before anything is written: absolute paths, drive letters, ``..``
components, duplicate names, members under a link, and links whose target leaves the extraction
root are refused, as are hard links and encrypted members, which no dataset archive needs. Files
are then written by this module itself (never by an external tool) into a temporary folder
inside the destination, which is renamed into place only when everything is out, and a marker
beside it records completion so a second run skips the archive.

RAR is read with the ``unrar2-cffi`` package, whose wheels bundle the unrar library, so no
system tool is needed; it is a dependency of sideways-cli.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sideways_cli.support.errors import UserError

ZIP_MAGIC = b"PK\x03\x04"
RAR_MAGIC = b"Rar!\x1a\x07"  # RAR 1.5-4 add b"\x00", RAR 5 b"\x01\x00"
INSTALL_RAR = ("install a RAR extractor into this environment with 'pip install unrar2-cffi' "
               "(a dependency of sideways-cli; wheels exist for Linux x86_64, macOS and Windows, "
               "elsewhere it builds from source with a C++ compiler)")


class UnsafeArchive(UserError):
    """A member would land outside the target, or cannot be extracted safely."""


@dataclass(frozen=True)
class Member:
    name: str  # as stored in the archive
    parts: tuple[str, ...]  # normalised relative path components
    kind: str  # file | dir | symlink
    link: str | None = None  # symlink target, as stored


def extract_once(archive: Path, dest: Path, target: str, *, top: str | None = None,
                 nested: bool = False, progress: bool = True) -> Path:
    """Extract ``archive`` so that it becomes ``dest/target``; skip when that is already done.

    ``top``: the archive's single top-level folder, which becomes ``target``. ``nested``: the
    archive holds inner archives (zip or rar), all extracted together into ``target``.
    """
    final = dest / target
    marker = dest / f".{target}.extracted"
    if marker.is_file() and final.is_dir():
        return final
    if final.exists():
        raise UserError(f"{final} exists but was not completely extracted from {archive.name}; "
                        "delete it and re-run")
    dest.mkdir(parents=True, exist_ok=True)
    # inside dest, so the final rename stays on one filesystem and is atomic
    tmp = Path(tempfile.mkdtemp(prefix=f".{target}-", suffix=".tmp", dir=dest))
    try:
        out = tmp / "out"
        out.mkdir()
        safe_extract(archive, out, progress=progress)
        if nested:
            built = tmp / "nested"
            built.mkdir()
            inner = sorted(p for p in out.rglob("*") if p.is_file() and archive_kind(p))
            if not inner:
                raise UserError(f"{archive} holds no inner archives; is it the right file? "
                                f"delete it and re-run")
            for path in inner:
                safe_extract(path, built, progress=progress)
                path.unlink()  # the inner archives are copies: free their space as we go
            out = built
        elif top is not None:
            out = out / top
            if not out.is_dir() or out.is_symlink():
                raise UserError(f"{archive} has no top-level folder {top}/; is it the right file? "
                                f"delete it and re-run")
        os.rename(out, final)
        marker.write_text(f"{archive.name}\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def archive_kind(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(RAR_MAGIC):
        return "rar"
    return None


def safe_extract(archive: Path, target: Path, progress: bool = True) -> None:
    """Extract every member of ``archive`` under the existing folder ``target``, or refuse."""
    kind = archive_kind(archive)
    if kind is None:
        raise UserError(f"{archive} is neither a zip nor a rar archive; delete it and re-run")
    backend = _Zip(archive) if kind == "zip" else _Rar(archive)
    members = backend.members()
    validate_members(archive, members)
    root = target.resolve()
    columns = (TextColumn("[bold]extracting {task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    console = Console(stderr=True)
    # off the terminal (CI logs, pipes) a transient bar would only leave blank lines behind
    with Progress(*columns, console=console, transient=True,
                  disable=not (progress and console.is_terminal)) as bar:
        task = bar.add_task(archive.name, total=len(members))

        def writer(member: Member) -> BinaryIO | None:
            bar.advance(task)
            return _write(archive, root, member)

        backend.extract(members, writer)


def validate_members(archive: Path, members: list[Member]) -> None:
    """Refuse the archive if any member could write outside the root, before writing anything."""
    links = {m.parts for m in members if m.kind == "symlink"}
    seen: set[tuple[str, ...]] = set()
    for m in members:
        why = _unsafe_path(m.name)
        if why is None and m.parts in seen:
            why = "appears twice"
        if why is None and any(m.parts[:i] in links for i in range(1, len(m.parts))):
            why = "lies under a link"
        if why is None and m.kind == "symlink":
            why = _unsafe_link(m)
        if why is not None:
            raise UnsafeArchive(f"refusing to extract {archive}: member {m.name!r} {why}; nothing "
                                "was written (delete the archive and download it again, or check "
                                "the mirror)")
        seen.add(m.parts)


def _unsafe_path(name: str) -> str | None:
    if "\x00" in name:
        return "has a NUL byte in its name"
    path = name.replace("\\", "/")  # a Windows separator is a separator here too
    if path.startswith("/"):
        return "has an absolute path"
    if re.match(r"[A-Za-z]:", path):
        return "has a drive letter"
    if ".." in path.split("/"):
        return "has a '..' component"
    return None


def _unsafe_link(m: Member) -> str | None:
    link = (m.link or "").replace("\\", "/")
    if not link:
        return "is a link whose target cannot be checked"
    if link.startswith("/") or re.match(r"[A-Za-z]:", link):
        return f"is a link to the absolute path {m.link!r}"
    resolved = posixpath.normpath(posixpath.join(*m.parts[:-1], link) if len(m.parts) > 1 else link)
    if resolved == ".." or resolved.startswith("../"):
        return f"is a link to {m.link!r}, outside the extraction folder"
    return None


def _parts(name: str) -> tuple[str, ...]:
    return tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))


def _write(archive: Path, root: Path, m: Member) -> BinaryIO | None:
    """Create ``m`` under ``root``; for a file, return it open for the backend to fill."""
    if not m.parts:
        return None
    path = root.joinpath(*m.parts)
    # defence in depth after validate_members: the real parent must still be inside the root
    parent = Path(os.path.realpath(path.parent if m.kind != "dir" else path))
    if parent != root and root not in parent.parents:
        raise UnsafeArchive(f"refusing to extract {archive}: member {m.name!r} resolves outside "
                            f"{root}; delete the archive and download it again")
    if m.kind == "dir":
        path.mkdir(parents=True, exist_ok=True)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    if m.kind == "symlink":
        os.symlink(m.link, path)
        return None
    try:
        # 'x': never follow or overwrite something already there
        return open(path, "xb")  # the backend writes and closes it
    except FileExistsError:  # e.g. two inner archives of a nested archive hold the same file
        raise UnsafeArchive(f"refusing to extract {archive}: member {m.name!r} would overwrite "
                            f"{path}; delete the archive and download it again") from None


class _Zip:
    def __init__(self, archive: Path):
        self.archive = archive

    def _open(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.archive)
        except zipfile.BadZipFile as exc:
            raise UserError(f"{self.archive} is not a valid zip ({exc}); delete it and re-run") from None

    def members(self) -> list[Member]:
        with self._open() as zf:
            return [self._member(zf, info) for info in zf.infolist()]

    def _member(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Member:
        if info.flag_bits & 0x1:
            raise UnsafeArchive(f"{self.archive}: member {info.filename!r} is encrypted; "
                                "delete the archive and download it again")
        if info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16):
            return Member(info.filename, _parts(info.filename), "symlink",
                          zf.read(info).decode("utf-8", "replace"))
        return Member(info.filename, _parts(info.filename), "dir" if info.is_dir() else "file")

    def extract(self, members: list[Member], writer: Callable[[Member], BinaryIO | None]) -> None:
        with self._open() as zf:
            for info, m in zip(zf.infolist(), members):
                f = writer(m)
                if f is None:
                    continue
                try:
                    with f, zf.open(info) as src:
                        shutil.copyfileobj(src, f, 1 << 20)
                except zipfile.BadZipFile as exc:  # a CRC mismatch
                    raise UserError(f"{self.archive}: member {m.name!r} is damaged ({exc}); "
                                    "delete the archive and download it again") from None


class _Rar:
    """RAR through the unrar library's DLL interface; the data is streamed through a callback
    (RAR_TEST mode), so unrar itself never writes a file: this module does."""

    LIST, EXTRACT = 0, 1  # RAR_OM_LIST, RAR_OM_EXTRACT
    SKIP, TEST = 0, 1  # RAR_SKIP, RAR_TEST
    END_ARCHIVE = 10  # ERAR_END_ARCHIVE
    DIRECTORY, ENCRYPTED = 0x20, 0x04  # RHDF_*
    UNIX_SYMLINK, WIN_SYMLINK = 1, 2  # FSREDIR_*; junctions, hard links and copies are refused

    def __init__(self, archive: Path):
        try:
            from unrar.cffi import unrarlib  # noqa: F401  (registers the data callback)
            from unrar.cffi._unrarlib import ffi, lib
        except ImportError:
            raise UserError(f"cannot extract {archive}: no RAR extractor; {INSTALL_RAR}") from None
        self.archive, self.ffi, self.lib = archive, ffi, lib

    def _headers(self, mode: int) -> Iterator[tuple[object, object]]:
        ffi, lib = self.ffi, self.lib
        name = ffi.new("wchar_t[]", str(self.archive))
        data = ffi.new("struct RAROpenArchiveDataEx *", {"ArcNameW": name, "OpenMode": mode})
        handle = lib.RAROpenArchiveEx(data)
        if data.OpenResult != 0:
            raise UserError(f"{self.archive} is not a readable rar archive (unrar error "
                            f"{data.OpenResult}); delete it and re-run")
        try:
            while True:
                header = ffi.new("struct RARHeaderDataEx *")
                redir = ffi.new("wchar_t[4096]")
                header.RedirName, header.RedirNameSize = redir, 4096
                result = lib.RARReadHeaderEx(handle, header)
                if result == self.END_ARCHIVE:
                    return
                if result != 0:
                    raise UserError(f"{self.archive} is damaged (unrar error {result}); "
                                    "delete it and re-run")
                yield handle, header
        finally:
            lib.RARCloseArchive(handle)

    def members(self) -> list[Member]:
        out = []
        for handle, h in self._headers(self.LIST):
            name = self.ffi.string(h.FileNameW)
            if h.Flags & self.ENCRYPTED:
                raise UnsafeArchive(f"{self.archive}: member {name!r} is encrypted; "
                                    "delete the archive and download it again")
            if h.RedirType in (self.UNIX_SYMLINK, self.WIN_SYMLINK):
                member = Member(name, _parts(name), "symlink", self.ffi.string(h.RedirName))
            elif h.RedirType:
                raise UnsafeArchive(f"refusing to extract {self.archive}: member {name!r} is a "
                                    "hard link, junction or file copy, which is not supported; "
                                    "nothing was written")
            else:
                member = Member(name, _parts(name), "dir" if h.Flags & self.DIRECTORY else "file")
            out.append(member)
            self.lib.RARProcessFileW(handle, self.SKIP, self.ffi.NULL, self.ffi.NULL)
        return out

    def extract(self, members: list[Member], writer: Callable[[Member], BinaryIO | None]) -> None:
        ffi, lib = self.ffi, self.lib
        headers = self._headers(self.EXTRACT)
        for (handle, h), m in zip(headers, members):
            if ffi.string(h.FileNameW) != m.name:  # the archive changed under us
                raise UserError(f"{self.archive} changed while extracting; re-run")
            f = writer(m)
            if f is None:
                lib.RARProcessFileW(handle, self.SKIP, ffi.NULL, ffi.NULL)
                continue
            with f:
                def on_data(msg, p1, p2, f=f):
                    if msg == lib.UCM_PROCESSDATA:
                        f.write(ffi.buffer(ffi.cast("char *", p1), p2))
                    return 1

                user_data = ffi.new_handle(on_data)
                lib.RARSetCallbackPtr(handle, lib.PyUNRARCALLBACKStub, user_data)
                result = lib.RARProcessFileW(handle, self.TEST, ffi.NULL, ffi.NULL)
                lib.RARSetCallbackPtr(handle, ffi.NULL, ffi.NULL)
            if result != 0:  # includes a CRC mismatch, checked by unrar in test mode
                raise UserError(f"{self.archive}: member {m.name!r} is damaged (unrar error "
                                f"{result}); delete the archive and download it again")
        headers.close()
