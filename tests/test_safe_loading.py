"""Nothing the project reads runs code: a run directory or weights file someone shared, holding a
pickle that would run a command when loaded, is refused by every command in one line naming the
file, exit 2, and the command never runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from cli_helpers import invoke, run_main
from tiny import tiny_run_config


class Payload:
    """Unpickled, it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious(path: Path, marker: Path, inside: dict | None = None) -> Path:
    """A torch file at ``path`` that looks like ``inside`` with the payload added."""
    torch.save({**(inside or {}), "payload": Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("safe")
    config = tiny_run_config(root, {"train": {"steps": 2}})
    invoke("train", config, "--out", root / "run", "--quiet")
    return config, root / "run"


def test_the_payload_runs_when_loaded_unsafely(tmp_path):
    """The file really is malicious: the check below cannot pass on a harmless one."""
    marker = tmp_path / "ran"
    torch.load(malicious(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def shared_run(trained: tuple[Path, Path], tmp_path: Path, marker: Path, shard: bool) -> Path:
    """A copy of the trained run whose last checkpoint (or, with ``shard``, a shard the
    checkpoint names) carries the payload."""
    run = tmp_path / "shared"
    shutil.copytree(trained[1], run)
    last = run / "checkpoints" / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    if shard:
        (run / "checkpoints" / "shards").mkdir()
        malicious(run / "checkpoints" / "shards" / "last-step00000002-rank0.pt", marker)
        torch.save({**checkpoint, "shards": ["last-step00000002-rank0.pt"],
                    "topology": {"replicas": 1, "stages": 1}}, last)
    else:
        malicious(last, marker, checkpoint)
    (run / "summary.json").unlink()  # unfinished: train resumes it
    return run


@pytest.mark.parametrize("shard", [False, True], ids=["checkpoint", "shard"])
@pytest.mark.parametrize("command", ["eval", "train", "fidelity"])
def test_every_command_refuses_a_checkpoint_that_would_run_code(command, shard, trained, tmp_path,
                                                                monkeypatch, capsys):
    marker = tmp_path / "ran"
    run = shared_run(trained, tmp_path, marker, shard)
    args = {"eval": ["eval", run], "train": ["train", trained[0], "--out", run],
            "fidelity": ["fidelity", trained[0], "--run", run]}[command]
    code, err = run_main(args, monkeypatch, capsys)
    assert code == 2, err
    assert not marker.exists()
    bad = run / "checkpoints" / ("shards/last-step00000002-rank0.pt" if shard else "last.pt")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{bad} holds the object posix.system, not only tensors and plain data" in "".join(err.split("\n"))


def test_model_weights_that_would_run_code_are_refused(trained, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "ran"
    weights = malicious(tmp_path / "weights.pt", marker,
                        torch.load(trained[1] / "checkpoints" / "last.pt", weights_only=True)["model"])
    code, err = run_main(["train", trained[0], "--out", tmp_path / "run", "--set",
                          f"model.weights={weights}"], monkeypatch, capsys)
    assert code == 2, err
    assert not marker.exists()
    assert f"model.weights {weights} holds the object posix.system" in "".join(err.split("\n"))
