"""benchmarks/gpu_check.py (``make gpu-check``): harmless without CUDA, and every single-device
check passing at tiny sizes on the CPU, which runs the same code as on a GPU but the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def run_check(*args: str, timeout: float,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.multiprocess
def test_without_cuda_it_checks_nothing_and_succeeds(tmp_path):
    no_gpu = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # as CI sees it, even on a GPU machine
    result = run_check("--json", str(tmp_path / "check.json"), "--work", str(tmp_path / "work"),
                       timeout=120, env=no_gpu)
    assert result.returncode == 0, result.stderr
    assert "no CUDA device" in result.stdout and "nothing was checked" in result.stdout
    assert not (tmp_path / "check.json").exists()  # a GPU day's results are not overwritten
    assert not (tmp_path / "work").exists()  # no run was started


# The checks with logic of their own (a run, kill and resume, the engine's timings); --amp,
# --deterministic and eval bp are the same kind of row over CLI paths that test_amp,
# test_torchvision_models and test_evaluate cover, each a process more on 2 cores.
CHECKED = ("train bp", "kill and resume", "engine")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_tiny_cpu_run_passes_every_single_device_check_it_is_asked_for(tmp_path):
    path = tmp_path / "check.json"
    only = [arg for text in CHECKED for arg in ("--only", text)]
    result = run_check("--device", "cpu", "--tiny", "--json", str(path), "--work",
                       str(tmp_path / "work"), *only, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(path.read_text())["rows"]
    single = {row["name"]: row for row in rows if not row["multi_gpu"]}
    ran = {name: row for name, row in single.items() if any(text in name for text in CHECKED)}
    failed = {name: row["reason"] for name, row in ran.items() if row["status"] != "pass"}
    assert not failed
    assert {"train bp", "kill and resume, --deterministic"} <= ran.keys()
    left_out = {"train sideways", "--amp (bf16)", "--deterministic torchvision:resnet18",
                "--deterministic torchvision:r2plus1d_18", "decoding on the GPU", "eval bp"}
    assert all(single[name]["reason"] == "not asked for (--only)" for name in left_out)
    engine = [row for name, row in single.items() if name.startswith("engine ")]
    assert len(engine) == 5 and all(row["figures"]["frames/s"] > 0 for row in engine)  # T=8: bp, chunk 1, 8, 16, stash full
    multi = [row for row in rows if row["multi_gpu"]]  # not asked for (--parallel): named, skipped
    assert multi and all(row["status"] == "skip" for row in multi)
    assert "budget:" in result.stdout and "no check failed" in result.stdout
