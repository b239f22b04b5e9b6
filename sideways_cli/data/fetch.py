"""Download one file over HTTP(S) with resume, retries and verification; stdlib urllib only.

The file is written to ``<file>.part`` and renamed into place only once its size and sha256 check
out, so the final name always holds a complete, verified file. An interrupted transfer resumes
from the ``.part`` with an HTTP Range request. A verified file gets a record beside it
(``<file>.sha256``: sha256, size, mtime); while the file's size and mtime match the record a later
run trusts it without network I/O or rehashing, and otherwise rehashes and compares.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from sideways_cli.support.errors import UserError

CHUNK = 1 << 20
USER_AGENT = "sideways-cli (dataset download)"
SCHEMES = ("http://", "https://", "file://")


class DownloadError(UserError):
    """The transfer failed for good (HTTP error, retries exhausted, bad URL)."""


class ChecksumError(UserError):
    """A downloaded or existing file does not match its expected size or sha256."""


class _Transient(Exception):
    """A failure worth retrying (short read, 5xx, inconsistent Range answer)."""


@dataclass(frozen=True)
class Record:
    sha256: str
    size: int
    mtime_ns: int

    @staticmethod
    def path_for(file: Path) -> Path:
        return file.with_name(file.name + ".sha256")

    @classmethod
    def read(cls, file: Path) -> Record | None:
        path = cls.path_for(file)
        if not path.is_file():
            return None
        fields = dict(line.split(None, 1) for line in path.read_text().splitlines() if " " in line)
        try:
            return cls(fields["sha256"].strip(), int(fields["size"]), int(fields.get("mtime_ns", -1)))
        except (KeyError, ValueError):
            raise UserError(f"{path} is not a valid download record; delete it and re-run") from None

    def write(self, file: Path) -> None:
        path = self.path_for(file)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"sha256 {self.sha256}\nsize {self.size}\nmtime_ns {self.mtime_ns}\n")
        os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_file(url: str, dest: Path, *, sha256: str | None = None, size: int | None = None,
                progress: bool = True, retries: int = 5, timeout: float = 30.0,
                backoff: float = 1.0) -> Path:
    """Return ``dest`` holding the verified file at ``url``, downloading only what is missing.

    Expected size and sha256 come from the arguments (published values) or, failing those, from
    the record of the first verified download.
    """
    record = Record.read(dest)
    sha256 = sha256 or (record.sha256 if record else None)
    size = size if size is not None else (record.size if record else None)
    if dest.is_file():
        stat = dest.stat()
        if record and (stat.st_size, stat.st_mtime_ns) == (record.size, record.mtime_ns) \
                and (sha256 is None or sha256 == record.sha256):
            return dest  # verified earlier and untouched since
        _verify(dest, dest, sha256, size, fix=f"delete {dest} and re-run to download it again")
        return dest
    if not url.startswith(SCHEMES):
        raise DownloadError(f"cannot download {dest.name} from {url!r}: the URL must start with "
                            f"{', '.join(SCHEMES)} (check --mirror)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _download(url, part, progress=progress, retries=retries, timeout=timeout, backoff=backoff)
    _verify(part, dest, sha256, size,
            fix=f"delete {part} and re-run, or check the mirror serving {url}")
    os.replace(part, dest)  # atomic: the final name only ever holds a verified file
    return dest


def _verify(path: Path, dest: Path, sha256: str | None, size: int | None, fix: str) -> None:
    """Check ``path`` against the expectations, then record what was verified for ``dest``."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(f"{path}: size mismatch: expected {size} bytes, got {actual_size}; {fix}")
    actual = sha256_file(path)
    if sha256 is not None and actual != sha256.lower():
        raise ChecksumError(f"{path}: sha256 mismatch: expected {sha256}, got {actual}; {fix}")
    # the mtime is the final file's: os.replace keeps it, so the record matches after the rename
    Record(actual, actual_size, path.stat().st_mtime_ns).write(dest)


def _download(url: str, part: Path, *, progress: bool, retries: int, timeout: float,
              backoff: float) -> None:
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    # off the terminal (CI logs, pipes) a transient bar would only leave blank lines behind
    with Progress(*columns, console=console, transient=True,
                  disable=not (progress and console.is_terminal)) as bar:
        task = bar.add_task(part.name.removesuffix(".part"), total=None)
        failures = 0
        while True:
            before = _size(part)
            try:
                _transfer(url, part, timeout, bar, task)
                return
            except (urllib.error.HTTPError, _Transient, urllib.error.URLError, ConnectionError,
                    TimeoutError, http.client.HTTPException) as exc:
                if isinstance(exc, urllib.error.HTTPError) and not _retryable(exc.code):
                    raise DownloadError(f"could not download {url}: HTTP {exc.code} {exc.reason}; "
                                        "check the URL or --mirror") from None
                # a failure after some progress starts a fresh retry budget: slow links still finish
                failures = 1 if _size(part) > before else failures + 1
                if failures > retries:
                    reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
                    kept = _size(part)
                    fix = (f"re-run to resume from {part} ({kept} bytes kept)" if kept else
                           "check the network or --mirror, then re-run")
                    raise DownloadError(f"could not download {url} after {retries} retries "
                                        f"({reason}); {fix}") from None
                time.sleep(backoff * 2 ** (failures - 1))


def _retryable(code: int) -> bool:
    return code in (408, 429) or code >= 500


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _transfer(url: str, part: Path, timeout: float, bar: Progress, task) -> None:
    """One request: resume ``part`` from its current size, or restart it when the server won't."""
    offset = _size(part)
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not offset:
            raise
        # Range Not Satisfiable: the .part is already whole, or longer than the remote file
        if _content_range_total(exc.headers.get("Content-Range")) == offset:
            bar.update(task, total=offset, completed=offset)
            return
        part.unlink()
        raise _Transient("partial file does not match the remote file; restarting") from None
    except ValueError as exc:  # malformed URL
        raise DownloadError(f"cannot download {url}: {exc}; check --mirror") from None
    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if offset and response.status == 206:
            if _content_range_start(response.headers.get("Content-Range")) != offset:
                part.unlink()
                raise _Transient("server answered a different range; restarting")
            mode = "ab"
        else:
            offset, mode = 0, "wb"  # the server ignored Range (200): start again from zero
        total = offset + length if length is not None else None
        bar.update(task, total=total, completed=offset)
        with open(part, mode) as f:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.advance(task, len(chunk))
    if total is not None and _size(part) < total:
        raise _Transient(f"connection closed after {_size(part)} of {total} bytes")


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value or "")
    return int(match.group(1)) if match else None


def _content_range_total(value: str | None) -> int | None:
    match = re.match(r"bytes (?:\*|\d+-\d+)/(\d+)", value or "")
    return int(match.group(1)) if match else None
