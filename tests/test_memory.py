"""docs/sideways.md property 6: Sideways peak memory does not grow with clip length; BP's does."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sideways_cli.support.memory import fresh_process_env

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_vs_clip_length.py"


# every point the tests below read; each in a fresh process (memory freed by one measurement would
# hide growth in the next), two at a time: a process measures only its own peak
POINTS = [("bp", 16), ("bp", 96), ("bp", 192), ("sideways-tick", 16), ("sideways-tick", 96),
          ("sideways", 48), ("sideways", 192)]


def measure(point: tuple[str, int]) -> float:
    rule, clip_len = point
    out = subprocess.run([sys.executable, str(SCRIPT), "--one", rule, str(clip_len)], check=True,
                         capture_output=True, text=True, timeout=300, env=fresh_process_env())
    return float(out.stdout)


@pytest.fixture(scope="module")
def peaks() -> dict[tuple[str, int], float]:
    with ThreadPoolExecutor(max_workers=2) as pool:  # the threads only wait on the processes
        return dict(zip(POINTS, pool.map(measure, POINTS)))


def test_bp_memory_grows_with_clip_length(peaks):
    assert peaks["bp", 96] > 3 * peaks["bp", 16]


# The tick rule holds one window per module from the first frame on. The preset's batched executor
# (chunk 8) holds up to `chunk` windows per module; a short clip never fills a whole macro tick, so
# its peak ramps up to that bound over the first ~2(D-1) + 2 x chunk frames and is flat after it.
@pytest.mark.parametrize("rule, short, long", [("sideways-tick", 16, 96), ("sideways", 48, 192)])
def test_sideways_memory_is_flat_in_clip_length(peaks, rule, short, long):
    assert peaks[rule, long] < 1.1 * peaks[rule, short] + 4
    assert peaks[rule, long] < 0.3 * peaks["bp", long]
