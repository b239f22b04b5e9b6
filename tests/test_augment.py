"""data.augment's per-clip knobs (resized_crop, randaugment, erasing): one random draw per clip,
the same on every frame; a function of the item's seed alone (any number of loader workers, any
resume, the process's own random stream untouched); nothing drawn, and so the same clips as
without them, when off; refused in one line when out of range; and a run with all three on."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch
import yaml

from cli_helpers import invoke, run_main
from sideways_cli.config import load_config
from sideways_cli.data import transforms
from sideways_cli.data.datasets import ClipDataset, VideoEntry, build_loader
from sideways_cli.data.transforms import ClipTransform
from sideways_cli.run.loaders import eval_transform, train_transform
from sideways_cli.support.errors import UserError
from test_datasets import write_video
from tiny import tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")

# each knob on its own, then all three together; flip on as well, so its draw sits among theirs
KNOBS = {
    "resized_crop": dict(resized_crop=(0.2, 1.0)),
    "randaugment": dict(randaugment=15),
    "erasing": dict(erasing=1.0),
    "all": dict(resized_crop=(0.2, 1.0), randaugment=15, erasing=1.0),
}


def augmented(knobs: dict, **shape) -> ClipTransform:
    return ClipTransform(**{"size": 24, "resize": 28, "flip": True, **shape, **knobs})


def train_clip(tf: ClipTransform, frames: torch.Tensor, seed: int) -> torch.Tensor:
    """What ClipDataset makes of ``frames`` in training, from item seed ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return tf.erase(tf.normalise(tf.spatial(frames, generator)), generator)


def frames_of(*images: torch.Tensor) -> torch.Tensor:
    """uint8 [T, H, W, 3] of [H, W, 3] images."""
    return torch.stack(images).to(torch.uint8)


def textured(seed: int = 0, h: int = 36, w: int = 44) -> torch.Tensor:
    """An image whose every op shows: a random texture, values 0..150 (room for an offset)."""
    return torch.randint(0, 151, (h, w, 3), generator=torch.Generator().manual_seed(seed))


# -- one draw per clip, on every frame --------------------------------------------------------------


@pytest.mark.parametrize("knob", KNOBS)
def test_a_clip_of_identical_frames_stays_identical(knob):
    frames = frames_of(*[textured()] * 5)
    for seed in range(6):
        clip = train_clip(augmented(KNOBS[knob]), frames, seed)  # [3, T, 24, 24]
        assert clip.shape == (3, 5, 24, 24)
        assert all(torch.equal(clip[:, 0], clip[:, t]) for t in range(1, 5)), (knob, seed)


def test_resized_crop_keeps_a_constant_offset_between_frames():
    # frames that differ by a constant: a crop of the same place, resized alike (bilinear: weights
    # that sum to 1), keeps the difference; a crop of another place per frame would not
    frames = frames_of(*[textured() + 20 * t for t in range(5)])
    tf = ClipTransform(size=24, resized_crop=(0.1, 1.0))
    for seed in range(6):
        x = tf.spatial(frames, torch.Generator().manual_seed(seed))  # [T, 3, 24, 24] in [0, 1]
        for t in range(1, 5):
            assert torch.allclose(x[t] - x[0], torch.full_like(x[0], 20 * t / 255), atol=1e-5), seed


def test_erasing_erases_the_same_rectangle_of_every_frame():
    frames = frames_of(*[textured(seed) for seed in range(5)])  # every frame different
    tf = ClipTransform(size=24, erasing=1.0)
    for seed in range(6):
        clip = train_clip(tf, frames, seed)
        # 0 is the mean, which no uint8 value normalises to exactly: only the erased pixels are 0
        erased = (clip == 0).all(dim=0)  # [T, 24, 24]
        assert erased[0].any() and not erased[0].all()
        assert all(torch.equal(erased[0], erased[t]) for t in range(1, 5)), seed


# -- a function of the item's seed alone ------------------------------------------------------------


@pytest.mark.parametrize("knob", KNOBS)
def test_the_same_seed_gives_the_same_clip_and_other_seeds_others(knob):
    frames = frames_of(*[textured(seed) for seed in range(4)])
    tf = augmented(KNOBS[knob])
    clips = [train_clip(tf, frames, seed) for seed in range(6)]
    torch.manual_seed(123)  # whatever the global stream's state: the item's seed decides
    assert all(torch.equal(clip, train_clip(tf, frames, seed)) for seed, clip in enumerate(clips))
    assert len({clip.numpy().tobytes() for clip in clips}) > 3, knob


@pytest.mark.parametrize("knob", KNOBS)
def test_the_global_random_stream_is_untouched(knob):
    frames = frames_of(*[textured(seed) for seed in range(4)])
    torch.manual_seed(7)
    state = torch.get_rng_state()
    train_clip(augmented(KNOBS[knob]), frames, 0)
    assert torch.equal(torch.get_rng_state(), state)


def test_no_accelerator_generator_is_reseeded_or_asked(monkeypatch):
    # in the training process (data.num_workers 0) a reseeded CUDA generator would change the
    # dropout masks; and a forked loader worker has no need of the accelerator
    def refused(*args, **kwargs):
        raise AssertionError("the augmentation touched an accelerator")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", refused)
    monkeypatch.setattr(torch.cuda, "manual_seed", refused)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", refused)
    train_clip(augmented(KNOBS["all"]), frames_of(*[textured()] * 3), 0)


# -- off: the clips as without data.augment ---------------------------------------------------------


def test_every_knob_off_is_the_transform_without_augmentation():
    cfg = load_config(None, ["data.augment.resized_crop=null", "data.augment.randaugment=null",
                             "data.augment.erasing=0", "data.augment.mixup=0", "data.augment.cutmix=0"])
    tf = train_transform(cfg)
    assert tf == ClipTransform(size=cfg.data.size, resize=None, flip=False)
    real = load_config(None, ["data.dataset=ucf101"])
    assert train_transform(real) == ClipTransform(size=32, resize=128, flip=True)


def test_knobs_off_draw_nothing_and_give_the_clips_of_crop_and_flip_alone():
    # the reference is the training transform as it was before data.augment, written out: from the
    # item's generator the crop's top and left, then the flip's coin, nothing else
    frames = frames_of(*[textured(seed, 32, 36) for seed in range(4)])
    tf = ClipTransform(size=24, resize=28, flip=True, resized_crop=None, randaugment=None, erasing=0.0)
    for seed in range(8):
        generator = torch.Generator().manual_seed(seed)
        clip = tf.erase(tf.normalise(tf.spatial(frames, generator)), generator)
        reference = torch.Generator().manual_seed(seed)
        x = tf.resized(frames)  # [T, 3, 28, 32]: the short side at resize
        assert x.shape[-2:] == (28, 32)
        top = int(torch.randint(28 - 24 + 1, (), generator=reference))
        left = int(torch.randint(32 - 24 + 1, (), generator=reference))
        x = x[..., top:top + 24, left:left + 24]
        if bool(torch.rand((), generator=reference) < 0.5):
            x = x.flip(-1)
        assert torch.equal(clip, tf.normalise(x))
        # and the stream goes on alike: what follows (a frame shuffle) is the same too
        assert torch.equal(torch.randint(2**31, (4,), generator=generator),
                           torch.randint(2**31, (4,), generator=reference))


def test_knobs_off_leave_frames_of_the_size_as_they_are():
    # the synthetic frames come at data.size: no crop, no flip, no draw at all
    frames = frames_of(*[textured(seed, 32, 32) for seed in range(4)])
    tf = ClipTransform(size=32, resized_crop=None, randaugment=None, erasing=0.0)
    generator = torch.Generator().manual_seed(5)
    clip = tf.erase(tf.normalise(tf.spatial(frames, generator)), generator)
    assert torch.equal(clip, tf.normalise(frames.permute(0, 3, 1, 2).float().div(255)))
    assert torch.equal(torch.randint(2**31, (4,), generator=generator),
                       torch.randint(2**31, (4,), generator=torch.Generator().manual_seed(5)))


def test_evaluation_never_augments():
    frames = frames_of(*[textured(seed) for seed in range(3)])
    tf, plain = augmented(KNOBS["all"]), ClipTransform(size=24, resize=28)
    assert torch.equal(tf.spatial(frames, None), plain.spatial(frames, None))
    clip = plain.normalise(plain.spatial(frames, None))
    assert tf.erase(clip, None) is clip
    cfg = load_config(None, ["data.augment.resized_crop=[0.3, 1]", "data.augment.randaugment=9",
                             "data.augment.erasing=0.25"])
    assert eval_transform(cfg) == ClipTransform(size=32)
    assert train_transform(cfg) == ClipTransform(size=32, resized_crop=(0.3, 1.0), randaugment=9,
                                                 erasing=0.25)


# -- through the loader: any number of workers, any resume -------------------------------------------


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[VideoEntry]:
    root = tmp_path_factory.mktemp("augment_videos")
    return [VideoEntry(write_video(root / f"{i}.mp4", num_frames=8, size=40, shade=15 * i), i % 2, 8, 25.0)
            for i in range(6)]


def test_the_same_clips_with_0_and_2_workers_and_after_a_resume(videos):
    transform = augmented(KNOBS["all"])
    drawn = {}
    for workers in (0, 2):
        ds = ClipDataset(videos, 4, 1, train=True, shuffle_frames=True, transform=transform)
        batches = list(itertools.islice(build_loader(ds, 3, shuffle=True, num_workers=workers, seed=0), 4))
        drawn[workers] = torch.cat([batch["clip"] for batch in batches])
    assert drawn[0].shape == (12, 3, 4, 24, 24)
    assert torch.equal(drawn[0], drawn[2])
    # a resumed run starts its sampler at (epoch, position): the batches it would have had
    ds = ClipDataset(videos, 4, 1, train=True, shuffle_frames=True, transform=transform)
    resumed = next(iter(build_loader(ds, 3, shuffle=True, num_workers=0, seed=0, start=(1, 0))))
    assert torch.equal(resumed["clip"], drawn[0][6:9])
    # and the knobs did something: not the clips without them
    plain = ClipDataset(videos, 4, 1, train=True, shuffle_frames=True,
                        transform=ClipTransform(size=24, resize=28, flip=True))
    unaugmented = next(iter(build_loader(plain, 3, shuffle=True, num_workers=0, seed=0)))
    assert not torch.equal(unaugmented["clip"], drawn[0][:3])


# -- config ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, wants", [
    ("data.augment.resized_crop=0.5", "list[float]"),
    ("data.augment.randaugment=2.5", "int"),
    ("data.augment.erasing=yes", "float"),
])
def test_a_value_of_the_wrong_type_is_refused_in_one_line(override, wants):
    with pytest.raises(UserError, match=rf"^config key 'data.augment.\w+' expects {re.escape(wants)}"):
        load_config(None, [override])


@pytest.mark.parametrize("override", [
    "data.augment.resized_crop=[1,1]", "data.augment.resized_crop=[0.08, 1.0]",
    "data.augment.resized_crop=null", "data.augment.randaugment=0", "data.augment.randaugment=30",
    "data.augment.erasing=1", "data.augment.erasing=0", "data.augment.mixup=0.8",
    "data.augment.cutmix=1",
])
def test_the_edges_are_accepted(override):
    load_config(None, [override])


def test_the_synthetic_dataset_takes_every_spatial_knob():
    # crops, RandAugment and erasing keep a motion's direction (unlike a flip, still refused)
    cfg = load_config(None, ["data.augment.resized_crop=[0.25,1]", "data.augment.randaugment=9",
                             "data.augment.erasing=0.25"])
    assert cfg.data.dataset == "synthetic" and cfg.data.augment.resized_crop == [0.25, 1.0]
    with pytest.raises(UserError, match="data.flip' cannot be true for the synthetic"):
        load_config(None, ["data.augment.randaugment=9", "data.flip=true"])


def test_the_cli_refuses_a_bad_range_in_one_line_and_exits_2(tmp_path, monkeypatch, capsys):
    code, err = run_main(["train", "--set", "data.augment.resized_crop=[0.5,0.2]", "--out",
                          tmp_path / "run", "-q"], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: config key 'data.augment.resized_crop' must be a list [min, max] "
                          "with 0 < min <= max <= 1"), err


# -- a run ----------------------------------------------------------------------------------------


def test_a_training_run_with_every_per_clip_knob_on(tmp_path, monkeypatch):
    augment = {"resized_crop": [0.25, 1.0], "randaugment": 9, "erasing": 0.5}
    config = tiny_run_config(tmp_path, {"data": {"augment": augment}, "train": {"steps": 2},
                                        "eval": {"clips_per_video": 1}})
    applied = []  # which v2 transforms the run's clips went through (data.num_workers 0: here)

    def spy(transform, x, generator, seeded=transforms.seeded):
        applied.append(getattr(transform, "__name__", type(transform).__name__))
        return seeded(transform, x, generator)

    monkeypatch.setattr(transforms, "seeded", spy)
    run = tmp_path / "run"
    invoke("train", config, "--out", run, "--quiet")
    # (at least) two steps of 4 clips, each cropped, RandAugmented and (maybe) erased: 3 draws a clip
    assert sorted(set(applied)) == ["RandAugment", "RandomErasing", "_random_resized_crop"]
    assert len(applied) >= 2 * 4 * 3 and len(applied) % 3 == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_loss"] == summary["train_loss"]  # not NaN
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["augment"] == {
        **augment, "mixup": 0.0, "cutmix": 0.0}



def test_the_runs_normalisation_is_the_configs_in_training_and_evaluation():
    """data.mean and data.std: what a pretrained network's frames were normalised with, for the
    training clips, the evaluation views (and so predict's) alike."""
    cfg = load_config(None, ["data.mean=[0.4,0.5,0.6]", "data.std=[0.1,0.2,0.25]"])
    frames = torch.full((2, 8, 8, 3), 153, dtype=torch.uint8)  # 0.6 in every channel
    for transform in (train_transform(cfg), eval_transform(cfg)):
        clip = transform.normalise(transform.spatial(frames, None))
        expected = torch.tensor([(0.6 - 0.4) / 0.1, (0.6 - 0.5) / 0.2, (0.6 - 0.6) / 0.25])
        torch.testing.assert_close(clip.mean(dim=(1, 2, 3)), expected, atol=1e-5, rtol=0)
