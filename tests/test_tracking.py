"""Live tracking: TensorBoard's curves are the run's own logs, with its config as hparams; a tracker
that is missing or fails is one warning line and the run goes on; W&B and MLflow log through their
own clients and continue the same tracked run on resume (where they are installed).

The resumed curves (a kill after a checkpoint, a kill during the final evaluation) are checked
with the resumed runs themselves, in test_resume.py."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from cli_helpers import invoke, run_main
from crash_after_checkpoint import Crash, crash_after_first_checkpoint
from sideways_cli.config import load_config
from sideways_cli.run.rundir import RunDir
from sideways_cli.run.tracking import TensorBoard, Trackers, local_mlflow_store
from tiny import tiny_run_config
from tracked import tensorboard_scalars

pytestmark = pytest.mark.slow  # whole (tiny) training runs

STEPS = 4


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return tiny_run_config(tmp_path_factory.mktemp("tracking"), {
        "train": {"steps": STEPS, "log_every": 1, "eval_every": 2, "checkpoint_every": 2}},
        generate=True)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def evaluations(run: Path) -> list[dict]:
    with (run / "evaluations.csv").open() as f:
        return list(csv.DictReader(f))


def event_files(run: Path) -> list[Path]:
    return sorted((run / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_holds_the_runs_logs_and_config_and_restart_forgets_them(config, tmp_path):
    run = tmp_path / "run"
    invoke("train", config, "--out", run, "--quiet", "--set", "log.tensorboard=true")
    scalars, logged = tensorboard_scalars(run), metrics(run)
    assert [step for step, _ in scalars["train/loss"]] == [m["step"] for m in logged] == [1, 2, 3, 4]
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/frames_per_s", "frames_per_s"),
                     ("train/data_wait_share", "data_wait_share"), ("memory/peak_mb", "peak_mem_mb")):
        assert [value for _, value in scalars[tag]] == pytest.approx([m[key] for m in logged], rel=1e-6), tag
    rows = evaluations(run)
    for name in ("clip_top1", "clip_top5", "video_top1", "video_top5", "mean_class_acc"):
        assert [step for step, _ in scalars[f"val/{name}"]] == [int(r["step"]) for r in rows] == [2, 4]
        assert [value for _, value in scalars[f"val/{name}"]] == \
            pytest.approx([float(r[f"val_{name}"]) for r in rows], rel=1e-6), name

    hparams, text = tensorboard_config(run)
    assert hparams["train.lr"].number_value == pytest.approx(0.001)
    assert hparams["mode"].string_value == "bp" and hparams["log.tensorboard"].number_value == 1  # torch writes flags as numbers
    assert "clip_len: 6" in text

    invoke("train", config, "--out", run, "--quiet", "--restart", "--set", "log.tensorboard=true",
           "--set", "train.steps=2")
    assert len(event_files(run)) == 1  # the discarded run's curves went with it
    assert [step for step, _ in tensorboard_scalars(run)["train/loss"]] == [1, 2]


def tensorboard_config(run: Path) -> tuple[dict, str]:
    """The hparams TensorBoard's HPARAMS tab shows for ``run`` (name -> protobuf Value) and the
    config's text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.metadata import SESSION_START_INFO_TAG, parse_session_start_info_plugin_data

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    start = parse_session_start_info_plugin_data(
        events.SummaryMetadata(SESSION_START_INFO_TAG).plugin_data.content)
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    return dict(start.hparams), text


def test_missing_trackers_are_one_warning_line_each_and_the_run_trains(config, tmp_path, monkeypatch,
                                                                       capsys):
    for module in ("torch.utils.tensorboard", "wandb", "mlflow", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it fails
    run = tmp_path / "run"
    code, err = run_main(["train", config, "--out", run, "--quiet", "--set", "train.steps=1",
                          "--set", "log.tensorboard=true", "--set", "log.wandb=true",
                          "--set", "log.mlflow=true"], monkeypatch, capsys)
    assert code == 0, err
    assert err.splitlines() == [
        f"warning: log.{name} is on but {name} is not installed ({install}); training goes on without it"
        for name, install in (("tensorboard", "pip install tensorboard"),
                              ("wandb", "pip install 'sideways-cli[wandb]'"),
                              ("mlflow", "pip install 'sideways-cli[mlflow]'"))]
    assert (run / "summary.json").is_file()


def test_a_tracker_failing_mid_run_is_one_warning_line_and_the_run_finishes(config, tmp_path,
                                                                           monkeypatch, capsys):
    written = []

    def full_disk(self, step, values):
        if written:
            raise OSError(28, "No space left on device")
        written.append(step)

    monkeypatch.setattr(TensorBoard, "scalars", full_disk)
    run = tmp_path / "run"
    code, err = run_main(["train", config, "--out", run, "--quiet", "--set", "log.tensorboard=true"],
                         monkeypatch, capsys)
    assert code == 0, err
    assert err.splitlines() == ["warning: log.tensorboard stopped ([Errno 28] No space left on "
                                "device); training goes on without it"]
    assert written == [1] and json.loads((run / "summary.json").read_text())["steps"] == STEPS


def test_only_global_rank_0_tracks(config, tmp_path):
    cfg = load_config(config, ["log.tensorboard=true"])
    assert Trackers(cfg, RunDir(tmp_path), 0, writes=False).live == []
    assert not (tmp_path / "tensorboard").exists()


def test_tracking_switched_on_when_resuming_starts_at_the_resumed_step(config, tmp_path, monkeypatch):
    """log.* may differ between the starts of a run (it changes no number)."""
    run = tmp_path / "run"
    with monkeypatch.context() as patched:
        crash_after_first_checkpoint(patched)
        with pytest.raises(Crash):
            invoke("train", config, "--out", run, "--quiet")
    invoke("train", config, "--out", run, "--quiet", "--set", "log.tensorboard=true")
    assert [step for step, _ in tensorboard_scalars(run)["train/loss"]] == [3, 4]


# -- W&B and MLflow, through their own clients, where installed ------------------------------------

def test_wandb_offline_logs_the_run_and_a_resume_continues_the_same_run(config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    with monkeypatch.context() as patched:
        crash_after_first_checkpoint(patched)
        with pytest.raises(Crash):
            invoke("train", config, "--out", run, "--quiet", "--set", "log.wandb=true")
    first = json.loads((run / "tracking.json").read_text())["wandb"]
    invoke("train", config, "--out", run, "--quiet", "--set", "log.wandb=true")
    assert json.loads((run / "tracking.json").read_text())["wandb"] == first
    offline = sorted((run / "wandb").glob(f"offline-run-*-{first}"))
    assert len(offline) == 2  # two starts of one W&B run, synced together by `wandb sync`


def test_mlflow_logs_the_run_and_a_resume_adds_only_the_steps_it_lacks(config, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    with monkeypatch.context() as patched:
        crash_after_first_checkpoint(patched)
        with pytest.raises(Crash):
            invoke("train", config, "--out", run, "--quiet", "--set", "log.mlflow=true")
    invoke("train", config, "--out", run, "--quiet", "--set", "log.mlflow=true")
    run_id = json.loads((run / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=local_mlflow_store(RunDir(run)))
    losses = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in losses) == [m["step"] for m in metrics(run)] == [1, 2, 3, 4]
    assert [m.value for m in sorted(losses, key=lambda m: m.step)] == \
        pytest.approx([m["loss"] for m in metrics(run)])
    tracked = client.get_run(run_id)
    assert tracked.data.params["train.steps"] == str(STEPS) and tracked.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/video_top1")) == [2, 4]
