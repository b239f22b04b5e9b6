"""Configs and run directories written before keys and files were renamed still work: the old keys
(train.schedule, parallel.schedule, sideways.pipeline) are read as the new ones wherever a config
comes from (YAML, --set, --sweep, a run directory, a checkpoint), and a run whose evaluation curve
is a summary.csv resumes appending to it and is read by eval and compare --runs."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from cli_helpers import invoke
from crash_after_checkpoint import Crash, crash_after_first_checkpoint
from sideways_cli.config import RENAMED_KEYS, load_config
from tiny import tiny_run_config

NEW_TO_OLD = {new: old for old, new in RENAMED_KEYS.items()}
SETTINGS = {"train.lr_schedule": "constant", "parallel.bp_schedule": "1f1b",
            "sideways.between_clips": "continuous"}  # none of them the default


def with_old_keys(config: dict) -> dict:
    """``config`` as a version before the renames wrote it."""
    old = {section: dict(values) if isinstance(values, dict) else values
           for section, values in config.items()}
    for new_key, old_key in NEW_TO_OLD.items():
        section, name = new_key.split(".")
        old[section][old_key.split(".")[1]] = old[section].pop(name)
    return old


def test_every_renamed_key_reads_as_its_new_name_from_yaml_and_set(tmp_path):
    path = tmp_path / "old.yaml"
    nested: dict = {}
    for new_key, value in SETTINGS.items():
        section, name = NEW_TO_OLD[new_key].split(".")
        nested.setdefault(section, {})[name] = value
    path.write_text(yaml.safe_dump(nested))
    from_yaml = load_config(path)
    from_set = load_config(None, [f"{NEW_TO_OLD[key]}={value}" for key, value in SETTINGS.items()])
    for cfg in (from_yaml, from_set):
        assert cfg.train.lr_schedule == "constant"
        assert cfg.parallel.bp_schedule == "1f1b"
        assert cfg.sideways.between_clips == "continuous"


@pytest.mark.slow
def test_an_old_run_directory_resumes_and_is_read(tmp_path, monkeypatch):
    config = tiny_run_config(tmp_path, {"train": {"steps": 4, "checkpoint_every": 2, "eval_every": 2},
                                        "sideways": {"chunk": 1, "between_clips": "continuous"}},
                             generate=True)
    run = tmp_path / "run"
    with monkeypatch.context() as crashing:
        crash_after_first_checkpoint(crashing)
        with pytest.raises(Crash):
            invoke("train", config, "--mode", "sideways", "--out", run, "--quiet")

    # what the version before the renames left: old keys in config.yaml, in the checkpoint's
    # config and in the user's YAML; the evaluation curve in summary.csv
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(with_old_keys(saved), sort_keys=False))
    checkpoint = run / "checkpoints" / "last.pt"
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["config"] = with_old_keys(ckpt["config"])
    torch.save(ckpt, checkpoint)
    (run / "evaluations.csv").rename(run / "summary.csv")
    user = yaml.safe_load(config.read_text())
    user["sideways"]["pipeline"] = user["sideways"].pop("between_clips")
    config.write_text(yaml.safe_dump(user))

    result = invoke("train", config, "--mode", "sideways", "--out", run)
    assert "from step 2" in " ".join(result.output.split())
    assert not (run / "evaluations.csv").exists()
    with (run / "summary.csv").open() as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [2, 4]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4

    invoke("eval", run, "--json", tmp_path / "eval.json", "--quiet")
    assert json.loads((tmp_path / "eval.json").read_text())["val_clip_top1"] == summary["val_clip_top1"]
    invoke("compare", "--runs", run, "--keys", "sideways.pipeline", "--out", tmp_path / "compare")
    compared = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert compared["runs"][0]["summary"]["train_loss"] == summary["train_loss"]
    assert compared["runs"][0]["settings"]["sideways.between_clips"] == "continuous"
