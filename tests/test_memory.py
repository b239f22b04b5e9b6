"""SIDEWAYS.md property 6: Sideways peak memory does not grow with clip length; BP's does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_vs_clip_length.py"


def peak_mb(rule: str, clip_len: int) -> float:
    # a fresh process per point: memory freed by one measurement would hide growth in the next
    out = subprocess.run([sys.executable, str(SCRIPT), "--one", rule, str(clip_len)],
                         check=True, capture_output=True, text=True, timeout=300)
    return float(out.stdout)


@pytest.mark.parametrize("rule", ["sideways-tick"])  # the batched executor (chunk > 1) still grows: open
def test_sideways_memory_is_flat_while_bp_grows(rule):
    bp_short, bp_long = peak_mb("bp", 16), peak_mb("bp", 96)
    sw_short, sw_long = peak_mb(rule, 16), peak_mb(rule, 96)
    assert bp_long > 3 * bp_short
    assert sw_long < 1.15 * sw_short + 4
    assert sw_long < 0.3 * bp_long
