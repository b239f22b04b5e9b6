"""The reconstruction task and the streaming demo from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import invoke, run_main
from tiny import tiny_run_config


@pytest.fixture(scope="module")
def tiny_reconstruct(tmp_path_factory) -> Path:
    return tiny_run_config(tmp_path_factory.mktemp("reconstruct"), {
        "seed": 1, "task": "reconstruct",
        "model": {"name": "autoencoder", "temporal_kernel": 2, "depth": 2},
        "data": {"clip_len": 5, "size": 16}, "train": {"steps": 2}, "eval": {"clips_per_video": 1},
        "sideways": None})



@pytest.mark.slow  # two whole runs
def test_both_modes_report_psnr_and_eval_reads_it_back(tiny_reconstruct, tmp_path, train_in_process):
    invoke("compare", tiny_reconstruct, "--out", tmp_path, "--quiet")
    for mode in ("bp", "sideways"):
        summary = json.loads((tmp_path / mode / "summary.json").read_text())
        assert summary["task"] == "reconstruct" and summary["val_clips"] == 10
        assert 0 < summary["val_psnr"] < 60 and summary["val_mse"] > 0
        header = (tmp_path / mode / "evaluations.csv").read_text().splitlines()[0]
        assert header.endswith("val_mse,val_psnr")
    invoke("eval", tmp_path / "sideways", "--json", tmp_path / "eval.json", "--quiet")
    result = json.loads((tmp_path / "eval.json").read_text())
    summary = json.loads((tmp_path / "sideways" / "summary.json").read_text())
    # the same weights on the same clips: equal as measured; 1e-6 allows float32 sums in
    # another order (another thread count)
    for metric in ("val_psnr", "val_mse"):
        assert result[metric] == pytest.approx(summary[metric], rel=1e-6)
    assert "confusion_png" not in result


def test_stream_bp_drops_frames_sideways_uses_every_one(tiny_reconstruct, tmp_path):
    out = tmp_path / "stream.json"
    invoke("stream", tiny_reconstruct, "--frames", "30", "--update-every", "2", "--json", out)
    result = json.loads(out.read_text())
    bp, sideways = result["learners"]
    depth = 2 * 2  # modules of a depth-2 autoencoder
    assert sideways["frames_used"] == sideways["frames_arrived"] == 30
    assert bp["frames_used"] == len(range(0, 30, 2 * depth)) < 30
    # every 2 ticks, but the first pair ends before the first loss reaches the top (tick D - 1)
    assert sideways["updates"] == 14 and bp["updates"] == bp["frames_used"]
    for learner in (bp, sideways):
        assert 0 < learner["psnr"] < 60 and 0 < learner["held_out_psnr"] < 60


def test_task_and_model_must_agree(tiny_reconstruct, tmp_path, monkeypatch, capsys):
    """What the user gets: exit status 2 and one line on stderr, saying what to change."""
    code, err = run_main(["train", tiny_reconstruct, "--set", "model.name=c3d", "--out",
                          tmp_path / "run"], monkeypatch, capsys)
    assert (code, err.splitlines()) == (2, [
        "error: task 'reconstruct' needs model.name autoencoder, got 'c3d' "
        "(experiments/reconstruct.yaml is the reconstruction preset)"])
    assert not (tmp_path / "run").exists()
    code, err = run_main(["stream", "--set", "task=classify", "--set", "model.name=c3d"],
                         monkeypatch, capsys)
    assert (code, err.splitlines()) == (2, [
        "error: sideways stream trains frame reconstruction: give a config with task: "
        "reconstruct (experiments/stream.yaml)"])
