"""Evaluation runs the causal network a time chunk at a time (the same metrics as the whole clip),
over centre or 3-crop views, and keeps every video's probabilities for --dump."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from sideways_cli.data.transforms import ClipTransform
from sideways_cli.models import build_model
from sideways_cli.models.stack import causal_outputs
from sideways_cli.run.evaluate import evaluate_videos, write_video_scores
from sideways_cli.run.reconstruction import evaluate_reconstruction

CPU = torch.device("cpu")


def loader(batches: int = 3, t: int = 13):
    g = torch.Generator().manual_seed(0)
    return [{"clip": torch.randn(4, 3, t, 16, 16, generator=g),
             "label": torch.randint(0, 6, (4,), generator=g), "video": torch.arange(4) + 4 * i}
            for i in range(batches)]


def test_classification_metrics_do_not_depend_on_the_chunk():
    torch.manual_seed(0)
    model = build_model("c3d", 6, width=4, temporal_kernel=3, depth=2).double()
    data = loader()
    scores = evaluate_videos(model, data, 12, 6, CPU, chunk=13)
    whole, confusion = scores.metrics, scores.confusion
    for chunk in (1, 4, 64):
        chunked = evaluate_videos(model, data, 12, 6, CPU, chunk=chunk)
        metrics, matrix = chunked.metrics, chunked.confusion
        assert metrics == pytest.approx(whole, rel=1e-12) and torch.equal(matrix, confusion)
    assert whole["val_clips"] == 12 and whole["val_videos"] == 12


def test_reconstruction_metrics_do_not_depend_on_the_chunk():
    torch.manual_seed(0)
    model = build_model("autoencoder", 3, width=4, levels=2).double()
    data = loader()
    whole = evaluate_reconstruction(model, data, CPU, [0.45] * 3, [0.225] * 3, chunk=13)
    for chunk in (1, 5):
        chunked = evaluate_reconstruction(model, data, CPU, [0.45] * 3, [0.225] * 3, chunk=chunk)
        assert chunked == pytest.approx(whole, rel=1e-12)


def test_inputs_follow_the_weights_precision_and_chunks_are_checked():
    model = build_model("vgg", 6, width=4, depth=1).double()
    (batch,) = loader(1)
    outputs = list(causal_outputs(model, batch["clip"].double(), 5))
    assert [y.shape[2] for y in outputs] == [5, 5, 3] and outputs[0].dtype == torch.float64
    metrics = evaluate_videos(model, [batch], 4, 6, CPU, chunk=4).metrics  # float32 clips in
    assert 0.0 <= metrics["val_clip_top1"] <= 1.0
    with pytest.raises(ValueError, match="at least one frame"):
        next(causal_outputs(model, batch["clip"], 0))


def test_three_crops_run_along_the_long_side_and_one_is_the_centre():
    transform = ClipTransform(size=4)
    wide = torch.arange(2 * 3 * 6 * 10, dtype=torch.float32).view(2, 3, 6, 10)  # [T, 3, H, W]
    assert torch.equal(transform.view(wide, 0, 1), wide[..., 1:5, 3:7])
    for crop, left in enumerate((0, 3, 6)):
        assert torch.equal(transform.view(wide, crop, 3), wide[..., 1:5, left:left + 4])
    tall = wide.transpose(-1, -2)
    for crop, top in enumerate((0, 3, 6)):
        assert torch.equal(transform.view(tall, crop, 3), tall[..., top:top + 4, 1:5])
    frames = torch.randint(0, 256, (2, 6, 10, 3), dtype=torch.uint8)  # the dataset's side
    assert torch.equal(transform.spatial(frames, None), transform.view(transform.resized(frames), 0, 1))


def test_scores_hold_every_videos_probabilities_and_the_dump_writes_them(tmp_path):
    torch.manual_seed(0)
    model = build_model("c3d", 6, width=4, temporal_kernel=3, depth=2).double()
    data = loader()[:2]  # videos 0-7 of 12: the others have no clip
    scores = evaluate_videos(model, data, 12, 6, CPU, chunk=4)
    assert scores.videos.tolist() == list(range(8))
    torch.testing.assert_close(scores.probabilities.sum(dim=1), torch.ones(8))
    hits = (scores.probabilities.argmax(dim=1) == scores.labels).float().mean().item()
    assert hits == pytest.approx(scores.metrics["val_video_top1"])
    classes = [f"class{k}" for k in range(6)]
    paths = [tmp_path / f"v{i}.mp4" for i in range(12)]
    write_video_scores(tmp_path / "dump.csv", scores, paths, classes)
    rows = list(csv.DictReader((tmp_path / "dump.csv").open()))
    assert [row["video"] for row in rows] == [str(p) for p in paths[:8]]
    assert [row["label"] for row in rows] == [classes[k] for k in scores.labels]
    for row, probs in zip(rows, scores.probabilities):
        assert [float(row[c]) for c in classes] == pytest.approx(probs.tolist(), rel=1e-5)
        assert row["predicted"] == classes[int(probs.argmax())]
    write_video_scores(tmp_path / "dump.json", scores, paths, classes)
    dumped = json.loads((tmp_path / "dump.json").read_text())
    assert dumped["classes"] == classes and len(dumped["videos"]) == 8
    assert dumped["videos"][3]["probabilities"] == pytest.approx(scores.probabilities[3].tolist())
