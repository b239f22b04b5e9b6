"""Config files on bases (``_base_``), and the ``config`` command that shows a resolved config and
lists every key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cli_helpers import invoke, run_main
from sideways_cli.config import fields_of, load_config, to_dict
from sideways_cli.support.errors import UserError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_file_overrides_its_bases_in_order_and_set_overrides_the_file(tmp_path):
    write(tmp_path / "recipes" / "root.yaml", "train: {lr: 0.1, steps: 7}\nmodel: {width: 8}\n")
    # a base's own base is named relative to the base, not to the file that names it
    write(tmp_path / "recipes" / "long.yaml", "_base_: root.yaml\ntrain: {steps: 70}\n")
    write(tmp_path / "wide.yaml", "model: {width: 16, depth: 3}\n")
    child = write(tmp_path / "run.yaml",
                  "_base_: [recipes/long.yaml, wide.yaml]\ntrain: {lr: 0.2}\nseed: 4\n")
    cfg = load_config(child)
    assert (cfg.train.lr, cfg.train.steps, cfg.model.width, cfg.model.depth, cfg.seed) == \
        (0.2, 70, 16, 3, 4)
    assert load_config(child, ["train.lr=0.3", "model.width=4"]).train.lr == 0.3
    assert load_config(child, ["model.width=4"]).model.width == 4


def test_an_unknown_key_in_a_base_names_the_base(tmp_path):
    base = write(tmp_path / "base.yaml", "train: {stepz: 3}\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\n")
    with pytest.raises(UserError, match=f"unknown config key 'train.stepz' in {base}"):
        load_config(child)


@pytest.mark.parametrize("files, message", [
    ({"a.yaml": "_base_: b.yaml\n", "b.yaml": "_base_: a.yaml\n"}, "_base_ chain comes back to it"),
    ({"a.yaml": "_base_: a.yaml\n"}, "_base_ chain comes back to it"),
    ({"a.yaml": "_base_: missing.yaml\n"}, "_base_ missing.yaml not found"),
    ({"a.yaml": "_base_: {x: 1}\n"}, "_base_ must be a file name or a list of file names"),
])
def test_a_cycle_or_a_missing_base_is_one_line_and_exit_2(files, message, tmp_path, monkeypatch,
                                                          capsys):
    for name, text in files.items():
        write(tmp_path / name, text)
    code, err = run_main(["config", "show", tmp_path / "a.yaml"], monkeypatch, capsys)
    assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 or message in err.replace("\n", " ")


def test_the_paper_presets_share_one_base_and_differ_in_what_they_are():
    presets = {name: load_config(EXPERIMENTS / f"{name}.yaml")
               for name in ("ucf101_c3d", "ucf101_vgg", "hmdb51_c3d", "hmdb51_vgg")}
    for name, cfg in presets.items():
        assert "_base_: bases/paper.yaml" in (EXPERIMENTS / f"{name}.yaml").read_text()
        dataset, model = name.split("_")
        assert (cfg.data.dataset, cfg.model.name) == (dataset, model)
        assert (cfg.data.size, cfg.data.resize, cfg.data.clip_len, cfg.train.lr,
                cfg.eval.clips_per_video) == (112, 128, 16, 0.001, 5)  # the base's recipe
        assert cfg.model.temporal_kernel == (3 if model == "c3d" else 1)
        assert (cfg.train.steps, cfg.train.eval_every) == \
            ((18000, 2000) if dataset == "ucf101" else (7000, 1000))


def test_config_show_prints_the_resolved_config_that_loads_back_the_same(tmp_path):
    write(tmp_path / "base.yaml", "train: {lr: 0.1}\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\nmodel: {width: 8}\n")
    shown = invoke("config", "show", child, "--set", "seed=9").output
    assert "_base_" not in shown
    again = write(tmp_path / "shown.yaml", shown)
    assert to_dict(load_config(again)) == to_dict(load_config(child, ["seed=9"]))
    assert yaml.safe_load(shown)["train"]["lr"] == 0.1 and yaml.safe_load(shown)["seed"] == 9


def test_config_keys_lists_every_key_with_its_default_and_meaning():
    out = invoke("config", "keys").output
    for key, f, _ in fields_of():
        assert key in out, key
    assert "eval.crops" in out and "the 3-crop test" in " ".join(out.split())
