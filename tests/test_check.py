"""``sideways check``: every zoo network keeps the frame-step contract; a module that trains
BatchNorm, looks at future frames or mixes the clips of its batch fails the property it breaks,
naming the module and the fix; ``train`` refuses such a builder before its first step."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from cli_helpers import run_main
from sideways_cli.engine.contract import batchnorm_rows, contract_rows, failures, gradient_rows
from sideways_cli.engine.losses import OBJECTIVES
from sideways_cli.models import MODELS, ClassifierHead, ConvUnit, FrameModule, FrameStack
from sideways_cli.parallel.balance import stage_costs
from tiny import random_clips, tiny_network, tiny_run_config

SLOW_S = 0.02  # what each forward of a `lopsided` module sleeps: a cost known in advance
BROKEN = f'''
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sideways_cli.models import ClassifierHead, ConvUnit, FrameModule, FrameStack, PerFrame


class BatchNormed(FrameModule):
    def __init__(self):
        super().__init__()
        self.body = PerFrame(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

    def valid(self, x):
        return self.body(x)


class Symmetric(FrameModule):
    """A temporal conv padded on both sides: frame t sees frame t + 1."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(4, 4, (3, 3, 3), padding=(1, 1, 1))

    def valid(self, x):
        return self.conv(x)


class Centred(FrameModule):
    """Subtracts the batch mean: one clip's output depends on the others."""
    def valid(self, x):
        return x - x.mean(dim=0, keepdim=True)


def stack(middle, num_classes):
    return FrameStack([ConvUnit(3, 4, 2), middle, ClassifierHead(4, num_classes)],
                      ["conv", "middle", "head"])


def batchnorm(num_classes):
    return stack(BatchNormed(), num_classes)


def symmetric(num_classes):
    return stack(Symmetric(), num_classes)


def centred(num_classes):
    return stack(Centred(), num_classes)


def good(num_classes):
    return stack(ConvUnit(4, 4, 1), num_classes)


class Slow(FrameModule):
    """Scales its window's newest frame, after sleeping {SLOW_S}s in every float32 forward: the
    costs are measured on the float32 network, the contract is checked on a float64 copy."""
    def __init__(self, channels, window):
        super().__init__()
        self.window = window
        self.scale = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def valid(self, x):
        if x.dtype == torch.float32:
            time.sleep({SLOW_S})
        return self.scale * x[:, :, self.window - 1:]


def lopsided(num_classes):
    """Two slow modules and a fast head: costs [S, S, small], which only one split balances."""
    return FrameStack([Slow(3, 2), Slow(3, 1), ClassifierHead(3, num_classes)],
                      ["slow1", "slow2", "head"])
'''
# which property each broken module must fail (and the fix the message gives)
BREAKS = {"batchnorm": ("no batch statistics", "GroupNorm"),
          "symmetric": ("causal", "pad time on the past side only"),
          "centred": ("per sample", "normalise per sample")}


def rows_for(model: FrameStack, frames: int = 5, objective: str = "classify"):
    clip, labels = random_clips(1, frames, size=16, dtype=model.dtype)[0]
    return contract_rows(model, clip, labels, OBJECTIVES[objective], "fix it")


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("k", [1, 3])
def test_every_zoo_network_keeps_the_contract(name, k):
    objective = "reconstruct" if name == "autoencoder" else "classify"
    network = tiny_network(name, k)
    rows = rows_for(network, objective=objective)
    assert not failures(rows), failures(rows)
    modules = list(range(len(network)))
    # every forward property passes on every module, and tick == clip on the whole network too
    for prop in ("no batch statistics", "per sample", "causal"):
        assert [(r.module, r.ok) for r in rows if r.property == prop] == \
            [(d, True) for d in modules]
    assert [(r.module, r.ok) for r in rows if r.property == "tick == clip"] == \
        [(d, True) for d in modules] + [(None, True)]
    # property 4 on the head alone
    assert [(r.module, r.ok) for r in rows if r.property == "top exact"] == [(modules[-1], True)]
    static = [(r.module, r.ok) for r in rows if r.property == "static: sideways == bp"]
    # property 3 is checked module by module on window-1 networks, and said not to apply otherwise
    assert static == ([(d, True) for d in modules] if k == 1 else [(None, None)])
    # the equalities hold to float64 round-off (at most 2.2e-15 measured over the zoo), far
    # inside the 1e-9 that `check` allows a network of the user's own
    differences = [r.difference for r in rows if r.difference is not None]
    assert differences and max(differences) < 1e-14


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("broken")
    (root / "broken.py").write_text(BROKEN)
    tiny_run_config(root, {"train": {"steps": 2}}, generate=True)
    return root


@pytest.mark.parametrize("builder", sorted(BREAKS))
def test_a_broken_module_fails_its_row_naming_module_and_fix(builder, broken, monkeypatch, capsys):
    monkeypatch.chdir(broken)
    out = broken / f"{builder}.json"
    code, err = run_main(["check", "tiny.yaml", "--set", f"model.name=broken.py:{builder}",
                          "--json", out], monkeypatch, capsys)
    assert code == 1
    prop, fix = BREAKS[builder]
    report = json.loads(out.read_text())
    assert not report["passed"]
    failed = {(r["property"], r["name"]) for r in report["rows"] if r["ok"] is False}
    assert (prop, "middle") in failed
    assert all(name != "conv" for _, name in failed), failed  # what is below it keeps the contract
    # one line: the module's most specific failure, which the others follow from
    assert err.count("error:") == 1 and f"module 1 (middle), {prop}" in err and fix in err


@pytest.mark.usefixtures("one_thread")  # two threads on a busy machine: tens of ms of noise
def test_check_measures_the_costs_and_reports_the_split_that_balances_them(broken, monkeypatch,
                                                                            capsys):
    monkeypatch.chdir(broken)
    out = broken / "lopsided.json"
    code, _ = run_main(["check", "tiny.yaml", "--set", "model.name=broken.py:lopsided", "--json",
                        out], monkeypatch, capsys)
    assert code == 0
    report = json.loads(out.read_text())
    assert report["passed"]
    assert [(c["module"], c["name"], c["window"]) for c in report["costs"]] == \
        [(0, "slow1", 2), (1, "slow2", 1), (2, "head", 1)]
    assert all(c["forward_ms"] > 0 and c["vjp_ms"] > 0 for c in report["costs"])
    # the sleep of each slow module's forward is in its measured cost
    assert all(c["forward_ms"] >= 1e3 * SLOW_S for c in report["costs"][:2])
    # costs [S, S, small]: [1, 2] (the slowest stage costs S + small) is the one balanced split;
    # [2, 1] puts both slow modules in one stage (2S)
    total = [c["forward_ms"] + c["vjp_ms"] for c in report["costs"]]
    slowest = max(stage_costs(total, [1, 2]))
    assert slowest < max(stage_costs(total, [2, 1])), total  # as it is when the head costs less
    assert report["balance"]["2"]["modules_per_stage"] == [1, 2]
    assert report["balance"]["2"]["speedup_bound"] == pytest.approx(sum(total) / slowest, rel=1e-9)
    assert list(report["balance"]) == ["2"]  # three modules cannot fill four stages


def test_train_refuses_a_broken_builder_before_its_first_step(broken, monkeypatch, capsys):
    monkeypatch.chdir(broken)
    code, err = run_main(["train", "tiny.yaml", "--set", "model.name=broken.py:centred", "--out",
                          broken / "run", "--quiet"], monkeypatch, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "breaks the frame-step contract: module 1 (middle), per sample" in err
    assert not (broken / "run" / "checkpoints").exists()


def test_the_automatic_check_leaves_the_random_streams_alone(broken, monkeypatch):
    from sideways_cli.run.build import resolve_config
    from sideways_cli.run.contract_gate import refuse_broken_builder

    monkeypatch.chdir(broken)
    cfg = resolve_config(broken / "tiny.yaml", ["model.name=broken.py:good"])
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    refuse_broken_builder(cfg, 5)
    torch.testing.assert_close(torch.rand(3), expected)


def test_a_head_with_a_window_is_not_exact():
    class Wide(ClassifierHead):
        window = 2

    model = FrameStack([ConvUnit(3, 4, 1), Wide(4, 5)], ["conv", "head"]).double()
    clip, labels = random_clips(1, 5, size=16, dtype=model.dtype)[0]
    top = [r for r in gradient_rows(model, clip, labels, OBJECTIVES["classify"])
           if r.property == "top exact"]
    assert [r.ok for r in top] == [False] and "window 2" in top[0].detail


def test_a_module_that_drops_frames_fails_tick_equals_clip():
    class Drops(FrameModule):
        def valid(self, x):
            return x[:, :, 1:]

    model = FrameStack([ConvUnit(3, 4, 1), Drops(), ClassifierHead(4, 5)], ["a", "drops", "head"])
    failed = failures(rows_for(model.double()))
    assert failed and failed[0].name == "drops" and "gave 4 outputs" in failed[0].detail


def test_batchnorm_in_training_mode_is_named_even_where_the_numbers_pass():
    # one clip per batch: batch statistics over a single clip can still hide; the scan does not
    model = FrameStack([ConvUnit(3, 4, 1), ClassifierHead(4, 5)], ["conv", "head"])
    model.stack[0].post.body[0] = nn.BatchNorm2d(4)
    rows = batchnorm_rows(model, "set model.norm: group or frozen")
    assert [r.ok for r in rows] == [False, True]
    assert "post.body.0" in rows[0].detail and rows[0].fix == "set model.norm: group or frozen"


LOSS_S = 0.1  # what the reconstruction loss sleeps while the costs are measured


@pytest.mark.usefixtures("one_thread")
def test_the_costs_of_a_reconstruction_network_use_its_own_loss(monkeypatch):
    """The head's tick is timed with the frame loss of its task (a reconstruction's target is
    the frame itself, not a label); so is `parallel.balance: auto` for a staged autoencoder."""
    from sideways_cli.analyses.check import check_network
    from sideways_cli.run.build import resolve_config

    reconstruct, calls = OBJECTIVES["reconstruct"], []

    def slow_frame_loss(output, target, frame_loss=reconstruct.frame_loss):
        if output.dtype == torch.float32:  # the costs' float32 network, not the contract's copy
            calls.append((tuple(output.shape), tuple(target.shape)))
            time.sleep(LOSS_S)
        return frame_loss(output, target)

    monkeypatch.setattr(reconstruct, "frame_loss", slow_frame_loss)
    cfg = resolve_config(None, ["task=reconstruct", "model.name=autoencoder", "model.width=4",
                                "model.depth=2", "data.size=16", "data.batch_size=2"])
    report = check_network(cfg, 0)
    assert report.passed and len(report.costs) == 4
    frame = (2, 3, 16, 16)  # one frame of the batch: the target is the frame itself
    assert calls and set(calls) == {(frame, frame)}
    total = [c["forward_ms"] + c["vjp_ms"] for c in report.costs]
    assert total[-1] >= 1e3 * LOSS_S  # the loss is inside the head's measured tick
    # the head's loss outweighs the rest (a few ms each): the top stage holds the head alone
    assert report.balance[2]["modules_per_stage"] == [3, 1]
