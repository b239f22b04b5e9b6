"""`sideways compare` on a tiny synthetic config: its files, sweeps, variants, finished runs read
back, the difference warning, fidelity, resuming, and user mistakes refused before any training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from cli_helpers import invoke, run_main
from sideways_cli.analyses.comparison import SUMMARY_COLUMNS
from tiny import tiny_run_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    return tiny_run_config(tmp_path_factory.mktemp("compare"),
                           {"model": {"depth": 2}, "train": {"steps": 2}})



@pytest.fixture(scope="module")
def pair(tiny_config, tmp_path_factory) -> tuple[Path, list]:
    """bp and sideways compared once; tests only read it (or re-run the same command)."""
    out = tmp_path_factory.mktemp("pair") / "cmp"
    args = ["compare", tiny_config, "--out", out, "--quiet"]
    invoke(*args)
    return out, args


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 10_000
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 200 and width > 200


@pytest.mark.multiprocess
def test_compare_writes_json_csv_and_png(pair):
    out, _ = pair
    report = json.loads((out / "compare.json").read_text())
    assert report["compared"] == ["mode"] and report["differences"] == {}
    assert [r["name"] for r in report["runs"]] == ["bp", "sideways"]
    for entry in report["runs"]:
        assert entry["run_dir"] == str(out / entry["name"])
        assert entry["settings"] == {"mode": entry["name"]}
        assert entry["summary"]["mode"] == entry["name"] and "fidelity" not in entry
    rows = read_csv(out / "compare.csv")
    assert [r["run"] for r in rows] == ["bp", "sideways"]
    assert list(rows[0]) == ["run", "mode", *SUMMARY_COLUMNS]
    assert float(rows[1]["val_video_top1"]) == report["runs"][1]["summary"]["val_video_top1"]
    assert_png(out / "compare.png")  # one evaluation per run: drawn as a marker
    assert not (out / "sweep.png").exists()
    assert not list(out.rglob("*.tmp*"))


@pytest.mark.slow
def test_sweep_variant_and_fidelity(tiny_config, tmp_path, train_in_process):
    out = tmp_path / "sweep"
    result = invoke("compare", tiny_config, "--modes", "sideways", "--sweep", "data.frame_stride=1,2",
                    "--variant", "data.shuffle_frames=true", "--fidelity", "--out", out, "--quiet")
    names = ["sideways-frame_stride=1", "sideways-frame_stride=2", "sideways-shuffle_frames=true"]
    rows = read_csv(out / "compare.csv")
    assert [r["run"] for r in rows] == names  # one row per swept value, then the variant
    assert [r["data.frame_stride"] for r in rows] == ["1", "2", "1"]
    assert [r["data.shuffle_frames"] for r in rows] == ["false", "false", "true"]
    for name, stride in zip(names, (1, 2, 1)):
        assert yaml.safe_load((out / name / "config.yaml").read_text())["data"]["frame_stride"] == stride
    report = json.loads((out / "compare.json").read_text())
    assert report["compared"] == ["mode", "data.frame_stride", "data.shuffle_frames"]
    assert report["swept"] == ["data.frame_stride"] and report["differences"] == {}
    for entry, row in zip(report["runs"], rows):
        assert -1.0 <= entry["fidelity_mean"] <= 1.0
        assert entry["fidelity"][-1]["cosine"] == pytest.approx(1.0)  # the head is exact
        assert float(row["fidelity_mean"]) == pytest.approx(entry["fidelity_mean"])
        assert -1.0 <= entry["tick_fidelity_mean"] <= 1.0
        assert float(row["tick_fidelity_mean"]) == pytest.approx(entry["tick_fidelity_mean"])
    assert "tick fidelity" in result.output
    assert_png(out / "compare.png")
    assert_png(out / "sweep.png")


@pytest.mark.multiprocess
def test_runs_are_compared_without_training_and_differences_warned(pair, tiny_config, tmp_path):
    out, _ = pair
    other = tmp_path / "bp-lr"
    invoke("train", tiny_config, "--mode", "bp", "--set", "train.lr=0.01", "--out", other, "--quiet")
    stamps = {d: (d / "summary.json").stat().st_mtime_ns for d in (out / "bp", other)}
    result = invoke("compare", "--runs", out / "bp", "--runs", other, "--out", tmp_path / "cmp")
    assert "warning" in result.stderr and "train.lr" in result.stderr
    assert "0.001 in bp," in result.stderr and "0.01 in bp-lr" in result.stderr
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert report["differences"] == {"train.lr": {"bp": 0.001, "bp-lr": 0.01}}
    assert [r["name"] for r in report["runs"]] == ["bp", "bp-lr"]
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == [".lock", "compare.csv",
                                                                    "compare.json", "compare.png"]
    assert stamps == {d: (d / "summary.json").stat().st_mtime_ns for d in stamps}
    # naming the key compares it: a column, no warning
    result = invoke("compare", "--runs", out / "bp", "--runs", other, "--keys", "train.lr",
                    "--out", tmp_path / "cmp")
    assert "warning" not in result.stderr
    assert [r["train.lr"] for r in read_csv(tmp_path / "cmp" / "compare.csv")] == ["0.001", "0.01"]


@pytest.mark.multiprocess
def test_rerun_reuses_finished_runs_and_refuses_another_config(pair, monkeypatch, capsys):
    out, args = pair
    stamps = {m: (out / m / "summary.json").stat().st_mtime_ns for m in ("bp", "sideways")}
    result = invoke(*args)
    assert f"reusing {out / 'bp'}" in result.output and f"reusing {out / 'sideways'}" in result.output
    assert stamps == {m: (out / m / "summary.json").stat().st_mtime_ns for m in stamps}
    code, err = run_main([*args, "--set", "train.lr=0.5"], monkeypatch, capsys)
    assert code == 2 and str(out / "bp") in err and "train.lr" in err and "--out" in err


@pytest.mark.parametrize("extra, message", [
    (["--sweep", "data.frame_stride"], "--sweep expects KEY=V1,V2"),
    (["--sweep", "data.frame_stride=1,,2"], "--sweep expects KEY=V1,V2"),
    (["--sweep", "data.strides=1,2"], "unknown config key 'data.strides'"),
    (["--sweep", "mode=bp,sideways"], "--modes"),
    (["--sweep", "data.frame_stride=1,0"], "'data.frame_stride' must be >= 1"),
    (["--sweep", "data.frame_stride=1,2", "--sweep", "data.frame_stride=4"], "twice"),
    (["--sweep", "data.frame_stride=2,2"], "share"),
    (["--variant", "shuffle"], "--variant expects KEY=V"),
    (["--variant", "data.shuffle=true"], "unknown config key 'data.shuffle'"),
    (["--keys", "train.nope"], "unknown config key 'train.nope'"),
    (["--runs", "runs/x", "--sweep", "seed=1,2"], "drop CONFIG, --sweep"),
])
def test_mistakes_are_refused_before_training(extra, message, tiny_config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "never"
    code, err = run_main(["compare", tiny_config, *extra, "--out", out, "--quiet"],
                                     monkeypatch, capsys)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    assert not out.exists()


def test_missing_or_unfinished_runs_are_one_line_errors(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "gone"
    code, err = run_main(["compare", "--runs", missing], monkeypatch, capsys)
    assert code == 2 and str(missing) in err and "Traceback" not in err
    unfinished = tmp_path / "half"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("mode: bp\n")
    code, err = run_main(["compare", "--runs", unfinished], monkeypatch, capsys)
    assert code == 2 and str(unfinished) in err and "summary.json" in err and "--out" in err


def test_a_grid_of_sweeps_and_a_variant_are_planned_by_name(tiny_config, tmp_path):
    from sideways_cli.analyses.comparison import plan_training

    plan = plan_training(tiny_config, [], ["bp", "sideways"], ["data.frame_stride=1,2", "train.lr=1e-3,0.01"],
                         ["data.shuffle_frames=true,data.clip_len=4"], ["seed"], tmp_path)
    assert plan.swept == ["data.frame_stride", "train.lr"]
    assert plan.compared == ["mode", "data.frame_stride", "train.lr", "data.shuffle_frames",
                             "data.clip_len", "seed"]
    names = [run.name for run in plan.runs]
    assert names[:5] == ["bp-frame_stride=1-lr=0.001", "bp-frame_stride=1-lr=0.01",
                         "bp-frame_stride=2-lr=0.001", "bp-frame_stride=2-lr=0.01",
                         "bp-shuffle_frames=true-clip_len=4"]
    assert len(names) == 10 and [run.variant for run in plan.runs].count(True) == 2
    assert plan.runs[1].cfg.train.lr == 0.01 and plan.runs[1].run_dir == tmp_path / names[1]
    assert not list(tmp_path.iterdir())  # planning writes nothing


def test_bp_trains_once_for_every_value_of_a_sideways_key(tiny_config, tmp_path):
    from sideways_cli.analyses.comparison import plan_training

    plan = plan_training(tiny_config, [], ["bp", "sideways"],
                         ["data.frame_stride=1,2", "sideways.stash=0,5,full"],
                         ["sideways.between_clips=continuous"], [], tmp_path)
    names = [run.name for run in plan.runs]
    assert names == ["bp-frame_stride=1", "bp-frame_stride=2",
                     "sideways-frame_stride=1-stash=0", "sideways-frame_stride=1-stash=5",
                     "sideways-frame_stride=1-stash=full", "sideways-frame_stride=2-stash=0",
                     "sideways-frame_stride=2-stash=5", "sideways-frame_stride=2-stash=full",
                     "sideways-between_clips=continuous"]
    assert [run.cfg.sideways.stash for run in plan.runs[2:5]] == [0, 5, "full"]
    assert [run.variant for run in plan.runs] == [False] * 8 + [True]


def test_runs_that_measured_fidelity_while_training_get_its_row_of_plots(tmp_path):
    from sideways_cli.analyses.comparison import RunResult
    from sideways_cli.reports.plots import compare_png

    def run(name: str, fidelity_curve: list) -> RunResult:
        metrics = [{"frames_seen": 16 * s, "wall_s": s, "loss": 2.3 - 0.1 * s} for s in (1, 2)]
        evaluations = [{"frames_seen": 32, "wall_s": 2, "val_video_top1": 0.1}]
        return RunResult(name, tmp_path, {}, {"mode": "sideways", "frames_per_s": 1.0,
                                              "peak_mem_mb": 1.0}, metrics, evaluations, fidelity_curve)

    def modules(cosine: float) -> list[dict]:
        return [{"index": d, "name": f"m{d}", "cosine": cosine if d < 2 else 1.0,
                 "tick_cosine": cosine} for d in range(3)]

    curves = [run("stash=0", [{"step": 1, "modules": modules(0.5)}, {"step": 2, "modules": modules(0.6)}]),
              run("stash=full", [{"step": 1, "modules": modules(1.0)}])]
    compare_png(curves, tmp_path / "with.png")
    compare_png([run("plain", [])], tmp_path / "without.png")
    assert_png(tmp_path / "with.png")
    with_height = matplotlib.image.imread(tmp_path / "with.png").shape[0]
    assert with_height > 1.4 * matplotlib.image.imread(tmp_path / "without.png").shape[0]  # 3 rows, not 2


def test_fold_sweeps_get_a_mean_per_mode():
    from sideways_cli.analyses.comparison import RunResult, fold_means

    def run(mode, fold, top1):
        summary = {"mode": mode, "train_loss": 1.0, "val_video_top1": top1, "frames_per_s": 10.0}
        return RunResult(f"{mode}-fold={fold}", Path("."), {"data.fold": fold}, summary, [], [])

    runs = [run("bp", 1, 0.5), run("bp", 2, 0.7), run("bp", 3, 0.6), run("sideways", 1, 0.4),
            run("sideways", 2, 0.5), run("sideways", 3, 0.6)]
    means = fold_means(runs, ["data.fold"])
    assert [(m["mode"], m["folds"]) for m in means] == [("bp", [1, 2, 3]), ("sideways", [1, 2, 3])]
    assert means[0]["val_video_top1"] == pytest.approx(0.6) and means[1]["val_video_top1"] == pytest.approx(0.5)
    assert "val_clip_top1" not in means[0]  # not in every run's summary: no mean
    assert fold_means(runs, ["data.frame_stride"]) == []
