"""docs/sideways.md property 6: Sideways peak memory does not grow with clip length; BP's does."""

from __future__ import annotations

import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from sideways_cli.support.memory import fresh_process_env

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_vs_clip_length.py"


@cache
def peak_mb(rule: str, clip_len: int) -> float:
    # a fresh process per point: memory freed by one measurement would hide growth in the next
    out = subprocess.run([sys.executable, str(SCRIPT), "--one", rule, str(clip_len)], check=True,
                         capture_output=True, text=True, timeout=300, env=fresh_process_env())
    return float(out.stdout)


def test_bp_memory_grows_with_clip_length():
    assert peak_mb("bp", 96) > 3 * peak_mb("bp", 16)


# The tick rule holds one window per module from the first frame on. The preset's batched executor
# (chunk 8) holds up to `chunk` windows per module; a short clip never fills a whole macro tick, so
# its peak ramps up to that bound over the first ~2(D-1) + 2 x chunk frames and is flat after it.
@pytest.mark.parametrize("rule, short, long", [("sideways-tick", 16, 96), ("sideways", 48, 192)])
def test_sideways_memory_is_flat_in_clip_length(rule, short, long):
    assert peak_mb(rule, long) < 1.1 * peak_mb(rule, short) + 4
    assert peak_mb(rule, long) < 0.3 * peak_mb("bp", long)
