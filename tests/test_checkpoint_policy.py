"""train.monitor, train.keep_best and train.early_stop_patience: which checkpoints an evaluation
earns, which it pushes out, and when a run stops for want of a better one; and the EMA's
weights in eval and predict."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sideways_cli.cli import app
from sideways_cli.config import load_config
from sideways_cli.run.evaluations import Evaluations
from sideways_cli.run.resume import RunState
from sideways_cli.run.rundir import RunDir
from tiny import tiny_run_config


def policy(tmp_path, sets: list[str]) -> tuple[Evaluations, RunState, list[str]]:
    cfg = load_config(None, sets)
    run = RunDir(tmp_path)
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    state = RunState()
    saved: list[str] = []
    return Evaluations(cfg, run, 0.0, state), state, saved


def record(evaluations: Evaluations, saved: list[str], step: int, **val: float) -> None:
    def save(which: str) -> None:
        saved.append(which)
        evaluations.run.checkpoint(which).write_text(str(step))

    metrics = {key: 0.0 for key in evaluations.keys if key.startswith("val_")}
    evaluations.record(step, step, 1.0, metrics | val, save)


def test_keep_best_keeps_the_k_best_of_a_lower_is_better_metric(tmp_path):
    evaluations, state, saved = policy(tmp_path, ["task=reconstruct", "model.name=autoencoder",
                                                  "train.monitor=val_mse", "train.keep_best=2"])
    for step, mse in ((1, 0.5), (2, 0.3), (3, 0.4), (4, 0.3), (5, 0.1)):
        record(evaluations, saved, step, val_mse=mse)
    # best.pt follows each new lowest MSE; a tie keeps the earlier one
    assert [w for w in saved if w == "best"] == ["best"] * 3
    assert (tmp_path / "checkpoints" / "best.pt").read_text() == "5"
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("best_*.pt"))
    assert kept == ["best_2.pt", "best_5.pt"]  # 0.1 and the earlier 0.3
    assert state.kept_best == [[5, -0.1], [2, -0.3]]
    assert state.since_best == 0


def test_patience_counts_evaluations_without_a_better_one(tmp_path):
    evaluations, state, saved = policy(tmp_path, ["train.early_stop_patience=2"])
    record(evaluations, saved, 1, val_video_top1=0.5)
    record(evaluations, saved, 2, val_video_top1=0.5)  # a tie is not better
    assert not evaluations.exhausted()
    record(evaluations, saved, 3, val_video_top1=0.4)
    assert evaluations.exhausted() and state.since_best == 2


def test_a_diverged_evaluation_is_never_the_best(tmp_path):
    evaluations, state, saved = policy(tmp_path, [])
    record(evaluations, saved, 1, val_video_top1=float("nan"))
    assert saved == [] and state.since_best == 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run that stops early and keeps an EMA and two best checkpoints."""
    root = tmp_path_factory.mktemp("policy")
    config = tiny_run_config(root, {"train": {"steps": 8, "eval_every": 2, "ema_decay": 0.5,
                                              "keep_best": 2, "early_stop_patience": 1,
                                              "lr": 1e-6}}, generate=True)
    run = root / "run"
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    return run


def test_an_early_stopped_run_ends_at_its_step_and_is_finished(trained):
    summary = json.loads((trained / "summary.json").read_text())
    # an lr of 1e-6 leaves the accuracies flat: the second evaluation is not better
    assert summary["stopped_early"] and summary["steps"] == 4
    assert {"val_ema_video_top1", "val_video_top1"} <= summary.keys()
    rows = (trained / "evaluations.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["2", "4"]  # its last evaluation once
    again = CliRunner().invoke(app, ["train", str(trained.parent / "tiny.yaml"), "--out",
                                     str(trained)])
    assert again.exit_code == 0 and "has finished its 4 steps" in " ".join(again.output.split())


def test_eval_and_predict_use_the_ema_when_asked(trained, tmp_path):
    ckpt = torch.load(trained / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["ema"].keys() == ckpt["model"].keys()
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    results = {}
    for flags in ([], ["--ema"]):
        out = tmp_path / f"eval{len(flags)}.json"
        result = CliRunner().invoke(app, ["eval", str(trained), "--json", str(out), "--quiet", *flags])
        assert result.exit_code == 0, result.output
        results[bool(flags)] = json.loads(out.read_text())
    summary = json.loads((trained / "summary.json").read_text())
    assert results[True]["ema"] and results[True]["val_clip_top1"] == pytest.approx(
        summary["val_ema_clip_top1"])
    assert results[False]["val_clip_top1"] == pytest.approx(summary["val_clip_top1"])
    kept = CliRunner().invoke(app, ["eval", str(trained), "--checkpoint", "best_2", "--quiet"])
    assert kept.exit_code == 0, kept.output


def test_ema_of_a_run_without_one_is_one_line(tmp_path):
    config = tiny_run_config(tmp_path, {"train": {"steps": 1}})
    run = tmp_path / "run"
    assert CliRunner().invoke(app, ["train", str(config), "--out", str(run), "--quiet"]).exit_code == 0
    result = CliRunner().invoke(app, ["eval", str(run), "--ema"])
    assert result.exit_code != 0
    assert "holds no moving average of the weights" in str(result.exception)
