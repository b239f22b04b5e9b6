"""The CLI end to end on a tiny synthetic config: files written, numbers consistent, errors clean."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cli_helpers import invoke, run_main
from tiny import tiny_run_config

SUMMARY_KEYS = {"mode", "model", "dataset", "steps", "frames_seen", "train_loss", "val_clip_top1",
                "val_video_top1", "frames_per_s", "peak_mem_mb", "wall_s"}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    return tiny_run_config(tmp_path_factory.mktemp("cli"))



def test_train_writes_a_complete_run_directory(tiny_config, tmp_path):
    run = tmp_path / "run"
    invoke("train", tiny_config, "--mode", "sideways", "--out", run, "--quiet")
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["mode"] == "sideways" and summary["steps"] == 3
    assert summary["frames_seen"] == 3 * 4 * 6
    assert 0.0 <= summary["val_clip_top1"] <= 1.0 and summary["frames_per_s"] > 0
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["mode"] == "sideways" and resolved["seed"] == 3
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["classes"][0] == "move_left" and ckpt["config"]["mode"] == "sideways"
    assert not list(run.rglob("*.tmp"))


def test_train_flags_amp_device_json_and_progress(tiny_config, tmp_path):
    run = tmp_path / "run"
    result = invoke("train", tiny_config, "--mode", "sideways", "--amp", "--device", "cpu", "--seed", 4,
                    "--set", "train.eval_every=2", "--out", run, "--json", tmp_path / "summary.json")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == json.loads((run / "summary.json").read_text())
    assert summary["seed"] == 4 and 0.0 < summary["train_loss"] < 10.0  # finite under bf16
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["amp"] is True and resolved["device"] == "cpu" and resolved["deterministic"] is False
    text = " ".join(result.output.split())
    assert "step 2/3: val clip top-1" in text and "sideways step 3/3: val clip top-1" in text
    assert len(re.findall(r", elapsed \d+:\d\d:\d\d", text)) == 2  # each evaluation: the time so far
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values() if t.is_floating_point())
    invoke("eval", run, "--json", tmp_path / "eval.json")  # evaluates under the run's AMP too
    assert json.loads((tmp_path / "eval.json").read_text())["val_clip_top1"] == summary["val_clip_top1"]


def test_every_evaluation_is_a_summary_row_and_the_best_is_kept(tiny_config, tmp_path):
    run = tmp_path / "run"
    invoke("train", tiny_config, "--mode", "sideways", "--set", "train.eval_every=1", "--out", run,
           "--quiet")
    with (run / "evaluations.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    summary = json.loads((run / "summary.json").read_text())
    assert float(rows[-1]["val_video_top1"]) == pytest.approx(summary["val_video_top1"])
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=False)
    scores = [float(r["val_video_top1"]) for r in rows]
    assert best["step"] == int(rows[scores.index(max(scores))]["step"])
    assert best["classes"] == torch.load(run / "checkpoints" / "last.pt", weights_only=False)["classes"]


def test_eval_reproduces_the_final_evaluation(tiny_config, tmp_path):
    run = tmp_path / "run"
    invoke("train", tiny_config, "--mode", "bp", "--out", run, "--quiet")
    result = invoke("eval", run, "--json", tmp_path / "eval.json")
    assert "2 clips x 1 centre crop per video" in " ".join(result.output.split())  # views stated
    result = json.loads((tmp_path / "eval.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    for key in ("val_clip_top1", "val_clip_top5", "val_video_top1", "val_video_top5",
                "val_mean_class_acc"):
        assert result[key] == pytest.approx(summary[key])
    assert (run / "confusion_val.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_other_split_and_views(tiny_config, tmp_path):
    run = tmp_path / "run"
    invoke("train", tiny_config, "--mode", "bp", "--out", run, "--quiet")
    invoke("eval", run, "--split", "train", "--clips", 3, "--json", tmp_path / "eval.json", "--quiet")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["split"] == "train" and result["clips_per_video"] == 3
    assert result["train_videos"] == 10 and result["train_clips"] == 30  # 1 video per class
    assert 0.0 <= result["train_mean_class_acc"] <= 1.0
    assert (run / "confusion_train.png").is_file()


@pytest.mark.slow  # a run and three evaluations
def test_eval_the_best_checkpoint_over_three_crops_with_a_dump(tiny_config, tmp_path):
    """best.pt is the best evaluation's: evaluated again it gives that row of evaluations.csv;
    3 crops triple the clips and the dump holds each video's probabilities."""
    run = tmp_path / "run"
    invoke("train", tiny_config, "--mode", "bp", "--out", run, "--quiet", "--set", "train.steps=4",
           "--set", "train.eval_every=1", "--set", "data.resize=40")  # 40 px frames, 32 px crops
    rows = list(csv.DictReader((run / "evaluations.csv").open()))
    best = max(rows, key=lambda row: float(row["val_video_top1"]))  # the first of equals
    invoke("eval", run, "--checkpoint", "best", "--json", tmp_path / "best.json", "--quiet")
    result = json.loads((tmp_path / "best.json").read_text())
    assert result["checkpoint"] == "best" and result["step"] == int(best["step"])
    assert result["val_video_top1"] == pytest.approx(float(best["val_video_top1"]))
    assert result["val_clip_top1"] == pytest.approx(float(best["val_clip_top1"]))

    out = invoke("eval", run, "--crops", "3", "--dump", tmp_path / "videos.csv", "--json",
                 tmp_path / "three.json").output
    assert "2 clips x 3 crops per video" in " ".join(out.split())
    three = json.loads((tmp_path / "three.json").read_text())
    assert three["crops"] == 3 and three["val_clips"] == 3 * 2 * three["val_videos"]
    dumped = list(csv.DictReader((tmp_path / "videos.csv").open()))
    assert len(dumped) == three["val_videos"]
    hits = sum(row["predicted"] == row["label"] for row in dumped) / len(dumped)
    assert hits == pytest.approx(three["val_video_top1"])
    invoke("eval", run, "--crops", "1", "--dump", tmp_path / "centre.csv", "--quiet")
    centre = list(csv.DictReader((tmp_path / "centre.csv").open()))
    assert [row["video"] for row in centre] == [row["video"] for row in dumped]
    classes = [k for k in centre[0] if k not in ("video", "label", "predicted")]
    assert len(classes) == 10 and any(a[k] != b[k] for a, b in zip(centre, dumped) for k in classes)


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "first"], "--checkpoint must be last, best or best_<step> (train.keep_best), got 'first'"),
    (["--crops", "2"], "--crops must be 1 or 3, got 2"),
])
def test_eval_options_are_checked(args, message, tiny_config, tmp_path, monkeypatch, capsys):
    code, err = run_main(["eval", tmp_path, *args], monkeypatch, capsys)
    assert code == 2 and message in err


def test_eval_of_a_best_checkpoint_not_yet_written_says_so(tiny_config, tmp_path, monkeypatch,
                                                           capsys):
    run = tmp_path / "run"
    invoke("train", tiny_config, "--mode", "bp", "--out", run, "--quiet", "--set", "train.steps=1")
    (run / "checkpoints" / "best.pt").unlink()  # as a run stopped before its first evaluation
    code, err = run_main(["eval", run, "--checkpoint", "best"], monkeypatch, capsys)
    assert code == 2 and "best.pt not found: the run has not evaluated yet" in " ".join(err.split())


@pytest.mark.slow  # test_executor_equivalence checks the engine's side in make test-fast
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_in_float64_every_executor_trains_to_the_same_weights(optimizer, tiny_config, tmp_path):
    """The engine's promise checked from the command line, over several optimizer steps: the tick
    rule and the chunked executor (a chunk that splits the batch's 15 ticks, and the default)."""
    sets = ["model.name=c3d", "model.temporal_kernel=3", "model.depth=3", "data.clip_len=12",
            "precision=float64", f"train.optimizer={optimizer}", "train.lr=0.05"]
    weights = {}
    for chunk in (1, 4, 8):
        run = tmp_path / f"chunk{chunk}"
        args = [a for key in sets + [f"sideways.chunk={chunk}"] for a in ("--set", key)]
        invoke("train", tiny_config, "--mode", "sideways", *args, "--out", run, "--quiet")
        weights[chunk] = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(w.dtype == torch.float64 for w in weights[1].values() if w.is_floating_point())
    for chunk in (4, 8):
        for key, want in weights[1].items():
            torch.testing.assert_close(weights[chunk][key], want, rtol=1e-10, atol=1e-12)
    invoke("eval", tmp_path / "chunk8", "--json", tmp_path / "eval.json", "--quiet")  # float64 too
    summary = json.loads((tmp_path / "chunk8" / "summary.json").read_text())
    assert json.loads((tmp_path / "eval.json").read_text())["val_clip_top1"] == summary["val_clip_top1"]


@pytest.mark.slow  # two whole runs
def test_compare_starts_both_modes_from_the_same_weights(tiny_config, tmp_path, train_in_process):
    # a step of 1e-30 is below every weight's float32 resolution: nothing moves, so equal initial
    # weights mean equal evaluations
    out = tmp_path / "cmp"
    result = invoke("compare", tiny_config, "--set", "train.lr=1e-30", "--out", out, "--quiet")
    assert "BP vs Sideways" in result.output
    summaries = [run["summary"] for run in json.loads((out / "compare.json").read_text())["runs"]]
    assert [s["mode"] for s in summaries] == ["bp", "sideways"]
    assert summaries[0]["val_clip_top1"] == summaries[1]["val_clip_top1"]
    w_bp = torch.load(out / "bp" / "checkpoints" / "last.pt", weights_only=False)["model"]
    w_sw = torch.load(out / "sideways" / "checkpoints" / "last.pt", weights_only=False)["model"]
    for key in w_bp:
        torch.testing.assert_close(w_bp[key], w_sw[key])


def test_fidelity_static_is_exact_and_shuffled_degrades_at_the_bottom(tiny_config, tmp_path):
    cosines = {}
    for video in ("static", "shuffled"):
        path = tmp_path / f"{video}.json"
        invoke("fidelity", tiny_config, "--video", video, "--json", path, "--quiet")
        modules = json.loads(path.read_text())["modules"]
        assert [m["index"] for m in modules] == list(range(len(modules)))
        cosines[video] = [m["cosine"] for m in modules]
    assert min(cosines["static"]) >= 0.9999
    assert cosines["shuffled"][0] < cosines["shuffled"][-1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sideways_cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["train", "--set", "train.lrr=1"], "unknown config key 'train.lrr'"),
    (["train", "--set", "train.steps=many"], "expects int"),
    (["train", "--mode", "sgd"], "must be one of bp, sideways"),
    (["train", "--set", "model.depth=9"], "between 1 and 8 for c3d"),
    (["train", "--device", "tpu"], "'device' must be one of auto, cpu, cuda"),
    (["train", "--set", "train.checkpoint_every=-1"], "'train.checkpoint_every' must be >= 0"),
    (["compare", "--set", "amp=maybe"], "'amp' expects bool"),
    (["train", "--set", "precision=float16"], "'precision' must be one of float32, float64"),
    (["train", "--amp", "--set", "precision=float64"], "drop --amp or set precision=float32"),
    (["train", "nope.yaml"], "nope.yaml does not exist"),
    (["eval", "no-such-run"], "train first"),
    (["eval", "no-such-run", "--split", "test"], "--split must be val or train"),
    (["compare", "--modes", "bp,magic"], "unknown mode 'magic'"),
])
def test_user_mistakes_are_one_clean_line(args, message, monkeypatch, capsys):
    code, err = run_main(args, monkeypatch, capsys)  # the entry point, in this process
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3  # one logical line, possibly wrapped


@pytest.mark.multiprocess
def test_a_user_mistake_exits_2_from_a_real_process():
    result = run_cli("train", "--set", "train.lrr=1")
    assert result.returncode == 2
    assert "unknown config key 'train.lrr'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) <= 3
