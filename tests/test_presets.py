"""Every preset in experiments/ is a valid config headed by its command, runtime and purpose."""

from __future__ import annotations

from pathlib import Path

import pytest

from sideways_cli.run.build import resolve_config

PRESETS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


def test_the_presets_are_there():
    names = {p.stem for p in PRESETS}
    assert {"synthetic", "smoothness", "reconstruct", "stream", "ucf101_vgg", "ucf101_c3d",
            "hmdb51_vgg", "hmdb51_c3d", "per_frame_resnet18", "torchvision_r2plus1d", "recipe",
            "ucf101_r2plus1d_finetune", "hmdb51_r2plus1d_finetune"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_loads_and_says_how_to_run_it(path):
    resolve_config(path)  # every layer's checks: a torchvision network's name and keys too
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert "sideways " in text and "Expected on 2 CPU cores" in text and "TODO" not in text
