"""docs/sideways.md property 6: Sideways peak memory does not grow with clip length; BP's does; nor
does that of sideways.stash: full, which trains BP's weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sideways_cli.support.memory import fresh_process_env

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_vs_clip_length.py"


# every point the tests below read, in one fresh process: each rule's lengths after an unmeasured
# step (what the steps hold, not the first step's one-time allocations). With fresh_process_env's
# malloc setting every large block goes back to the system when freed, so no step's memory hides
# a later one's growth; the rules that hold least go first.
POINTS = {"sideways-tick": (16, 96), "sideways": (48, 192), "sideways-stash-full": (32, 128),
          "bp": (16, 96)}


@pytest.fixture(scope="module")
def peaks() -> dict[tuple[str, int], float]:
    specs = [f"{rule}={','.join(map(str, lengths))}" for rule, lengths in POINTS.items()]
    out = subprocess.run([sys.executable, str(SCRIPT), "--warm", *specs], check=True,
                         capture_output=True, text=True, timeout=300, env=fresh_process_env())
    measured = json.loads(out.stdout)
    return {(rule, t): peak for rule, lengths in POINTS.items() for t, peak in zip(lengths, measured[rule])}


def test_bp_memory_grows_with_clip_length(peaks):
    assert peaks["bp", 96] > 3 * peaks["bp", 16]


# The tick rule holds one window per module from the first frame on. The preset's batched executor
# (chunk 8) holds up to `chunk` windows per module; a short clip never fills a whole macro tick, so
# its peak ramps up to that bound over the first ~2(D-1) + 2 x chunk frames and is flat after it.
# stash: full keeps each module's inputs of as many frames as its messages are old (the schedule's
# depth, whatever the clip length) and recomputes the windows its messages meet
@pytest.mark.parametrize("rule, short, long", [("sideways-tick", 16, 96), ("sideways", 48, 192),
                                               ("sideways-stash-full", 32, 128)])
def test_sideways_memory_is_flat_in_clip_length(peaks, rule, short, long):
    assert peaks[rule, long] < 1.1 * peaks[rule, short] + 4
    assert peaks[rule, long] < 0.3 * peaks["bp", 96]  # BP on a clip as long, or half as long
