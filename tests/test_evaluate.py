"""Evaluation runs the causal network a time chunk at a time: the same metrics as the whole clip."""

from __future__ import annotations

import pytest
import torch

from sideways_cli.models import build_model
from sideways_cli.models.stack import causal_outputs
from sideways_cli.run.evaluate import evaluate_with_confusion
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
    whole, confusion = evaluate_with_confusion(model, data, 12, 6, CPU, chunk=13)
    for chunk in (1, 4, 64):
        metrics, matrix = evaluate_with_confusion(model, data, 12, 6, CPU, chunk=chunk)
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
    metrics, _ = evaluate_with_confusion(model, [batch], 4, 6, CPU, chunk=4)  # float32 clips in
    assert 0.0 <= metrics["val_clip_top1"] <= 1.0
    with pytest.raises(ValueError, match="at least one frame"):
        next(causal_outputs(model, batch["clip"], 0))
