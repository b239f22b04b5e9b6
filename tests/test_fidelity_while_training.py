"""train.fidelity_every: each module's gradient fidelity, measured on the step's batch from the
weights the step starts from, into fidelity.jsonl and the trackers, without changing the training;
a resumed run's file continues as metrics.jsonl does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import invoke, run_main
from crash_after_checkpoint import Crash, crash_after_first_checkpoint
from sideways_cli.run.rundir import RunDir
from tiny import tiny_run_config
from tracked import tensorboard_scalars

pytestmark = pytest.mark.slow  # whole (tiny) training runs

STEPS = 4


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    # float64, and registers and pseudo-gradient sums carried across batches (continuous, an update
    # every 5 ticks of 6-frame clips), which the measurement must leave as they are
    return tiny_run_config(tmp_path_factory.mktemp("fidelity"), {
        "mode": "sideways", "precision": "float64",
        "train": {"steps": STEPS, "checkpoint_every": 2, "optimizer": "sgd"},
        "sideways": {"chunk": 1, "update": "every 5 ticks", "between_clips": "continuous"}},
        generate=True)


def train(config: Path, out: Path, *sets: str) -> Path:
    invoke("train", config, "--out", out, "--quiet", *[a for s in sets for a in ("--set", s)])
    return out


def measured(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "fidelity.jsonl").read_text().splitlines()]


def test_fidelity_is_measured_without_changing_the_training_and_resumes(config, tmp_path, monkeypatch):
    plain = train(config, tmp_path / "plain")
    straight = train(config, tmp_path / "straight", "train.fidelity_every=1", "log.tensorboard=true")
    a, b = (RunDir(r).load_checkpoint() for r in (plain, straight))
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    assert a["summary"]["train_loss"] == b["summary"]["train_loss"]
    records = measured(straight)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    names = [m["name"] for m in records[0]["modules"]]
    assert len(names) > 1 and all([m["name"] for m in r["modules"]] == names for r in records)
    for record in records:
        assert all(-1 <= m["cosine"] <= 1 + 1e-9 for m in record["modules"])
        assert record["modules"][-1]["cosine"] == pytest.approx(1, abs=1e-9)  # the head is exact
    scalars = tensorboard_scalars(straight)
    tags = [tag for tag in scalars if tag.startswith("fidelity/")]
    assert len(tags) == len(names)
    assert all([step for step, _ in scalars[tag]] == list(range(1, STEPS + 1)) for tag in tags)
    assert not (plain / "fidelity.jsonl").exists()

    run = tmp_path / "resumed"  # killed past its first checkpoint, then started again
    with monkeypatch.context() as patched:
        crash_after_first_checkpoint(patched)
        with pytest.raises(Crash):
            train(config, run, "train.fidelity_every=1")
    assert [r["step"] for r in measured(run)] == [1, 2, 3]  # past the checkpoint at 2
    train(config, run, "train.fidelity_every=1")
    assert measured(run) == records


def test_with_stages_it_is_refused_in_one_line(config, monkeypatch, capsys):
    code, err = run_main(["train", config, "--set", "train.fidelity_every=2", "--set",
                          "parallel.stages=2"], monkeypatch, capsys)
    assert code == 2 and "'train.fidelity_every' measures the whole network in one process" in err
