"""Peak memory of a stretch of work, in MiB above what was in use when it started.

CUDA: the caching allocator's own peak counter. CPU: PyTorch keeps no such counter, so a daemon
thread samples the process's resident set size every millisecond; activations live for the whole
forward/backward, far longer than the sampling interval, so the peak is caught.
"""

from __future__ import annotations

import os
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def fresh_process_env() -> dict[str, str]:
    """Environment for a child process whose resident memory should track its live tensors.

    By default glibc keeps freed blocks in its heap and raises its mmap threshold as it goes, so the
    same work reads up to ~10% apart from run to run; a fixed threshold hands every large block back
    to the system when it is freed. Other C libraries ignore the variable.
    """
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakMemory:
    def __init__(self, device: torch.device, interval_s: float = 0.001):
        self.device = device
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self.interval_s)

    def read(self) -> float:
        """The peak so far, in MiB above the starting point."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = max(self._peak, _rss_bytes())
        return (peak - self._base) / 2**20

    def __exit__(self, *exc) -> None:
        self.peak_mb = self.read()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
