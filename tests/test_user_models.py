"""Networks users bring (docs/networks.md, "Bring your own network"): a builder named by ``model.name`` in a
file or a module outside the repository trains, resumes and is evaluated from its run directory;
its arguments come from ``model.args``; every way a builder can be wrong is one line naming it."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from cli_helpers import invoke, run_main
from crash_after_checkpoint import Crash, crash_after_first_checkpoint
from sideways_cli.engine.registers import tick_forward
from sideways_cli.run.build import build_network, resolve_config
from sideways_cli.support.errors import UserError
from tiny import tiny_run_config

NETWORK = '''
from sideways_cli.models import FrameStack
from sideways_cli.models.blocks import ClassifierHead, ConvUnit


def build(num_classes, width=4, k=3):
    """Two causal 3D conv units and a head."""
    modules = [ConvUnit(3, width, k), ConvUnit(width, 2 * width, k, pool=True),
               ClassifierHead(2 * width, num_classes)]
    return FrameStack(modules, ["conv1", "conv2", "head"])


def not_a_stack(num_classes):
    return ConvUnit(3, num_classes)


def wrong_classes(num_classes):
    return build(num_classes + 1)


def mixed(num_classes):
    import torch.nn as nn
    stack = build(num_classes)
    stack.stack[1] = nn.Conv3d(4, 8, 1)
    return stack


NOT_CALLABLE = 3
'''


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A directory outside the repository holding the user's network and a run config."""
    root = tmp_path_factory.mktemp("user")
    (root / "mynet.py").write_text(NETWORK)
    package = root / "lab" / "nets"
    package.mkdir(parents=True)
    (root / "lab" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "small.py").write_text(NETWORK)
    tiny_run_config(root, {"train": {"steps": 4, "checkpoint_every": 2}}, generate=True)
    return root


@pytest.mark.slow
def test_a_builder_file_trains_resumes_and_evaluates_from_its_run_directory(outside, tmp_path, monkeypatch):
    monkeypatch.chdir(outside)  # a relative path, as a user types it
    sets = ["--set", "model.name=mynet.py", "--set", "model.args.width=6", "--set", "train.steps=6",
            "--set", "train.log_every=1"]
    run = tmp_path / "run"
    with monkeypatch.context() as crashing:
        crash_after_first_checkpoint(crashing)
        with pytest.raises(Crash):
            invoke("train", "tiny.yaml", *sets, "--out", run, "--quiet")
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 2  # tiny.yaml: train.checkpoint_every=2
    assert ckpt["config"]["model"]["name"] == f"{outside / 'mynet.py'}:build"  # absolute: found from anywhere
    assert ckpt["config"]["model"]["args"] == {"width": 6}
    assert ckpt["model"]["stack.0.conv.conv.weight"].shape[0] == 6
    result = invoke("train", "tiny.yaml", *sets, "--out", run)
    assert "from step 2" in " ".join(result.output.split())
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 3, logged before the crash, logged once
    monkeypatch.chdir(tmp_path)  # the run directory names the builder's file from anywhere
    invoke("eval", run, "--quiet")


def test_a_module_path_builds_with_yaml_args_merged_with_set(outside, monkeypatch):
    monkeypatch.chdir(outside)  # the working directory is importable, as with python -m
    (outside / "args.yaml").write_text(textwrap.dedent("""\
        model: {name: "lab.nets.small:build", args: {width: 4, k: 1}}
    """))
    cfg = resolve_config(outside / "args.yaml", ["model.args.width=8"])
    assert cfg.model.args == {"width": 8, "k": 1}
    model = build_network(cfg, 5)
    assert model.windows == [1, 1, 1] and model[0].conv.conv.weight.shape[0] == 8


@pytest.mark.parametrize("name, says", [
    ("missing.py", "no file"),
    ("mynet.py:absent", "has no 'absent'"),
    ("mynet.py:NOT_CALLABLE", "is not callable (int)"),
    ("no_such_package.nets:build", "No module named 'no_such_package'"),
    ("mynet.py:not_a_stack", "returned a ConvUnit, not a sideways_cli.models.FrameStack"),
    ("mynet.py:mixed", "module 1 (conv2) is a Conv3d, not a sideways_cli.models.FrameModule"),
    ("mynet.py:wrong_classes", "it must give [2, 10, 2] ([batch, 10 classes, time])"),
])
def test_a_wrong_builder_is_one_line_naming_it(name, says, outside, monkeypatch, capsys):
    monkeypatch.chdir(outside)
    code, err = run_main(["train", outside / "tiny.yaml", "--set", f"model.name={name}",
                          "--out", outside / "never"], monkeypatch, capsys)
    assert code == 2
    assert says in err and "model.name" in err
    assert len(err.strip().splitlines()) == 1
    assert not (outside / "never" / "checkpoints").exists()


def test_model_args_are_for_builders_of_ones_own():
    with pytest.raises(UserError, match="model.args' is for a builder of your own"):
        resolve_config(None, ["model.args.width=8"])


EXAMPLE = Path(__file__).resolve().parents[1] / "experiments" / "own_network.py"


def test_the_readme_example_keeps_the_frame_step_contract():
    """The tick path equals the whole clip (docs/sideways.md, property 1), no output sees a later
    frame or another clip of the batch."""
    cfg = resolve_config(None, [f"model.name={EXAMPLE}", "model.args.width=4", "data.size=16"])
    model = build_network(cfg, 5)
    clip = torch.randn(3, 3, 7, 16, 16)
    whole = model(clip)
    torch.testing.assert_close(tick_forward(model, clip), whole, rtol=1e-5, atol=1e-5)
    later = clip.clone()
    later[:, :, 5:] += 1
    torch.testing.assert_close(model(later)[..., :5], whole[..., :5])
    torch.testing.assert_close(model(clip[:1]), whole[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_readme_example_trains_with_compare(outside, tmp_path, train_in_process):
    invoke("compare", outside / "tiny.yaml", "--set", f"model.name={EXAMPLE}", "--set", "train.steps=2",
           "--out", tmp_path / "cmp", "--quiet")
    runs = json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"]
    summaries = [run["summary"] for run in runs]
    assert [(s["mode"], s["steps"]) for s in summaries] == [("bp", 2), ("sideways", 2)]
