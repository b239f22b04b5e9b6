"""Every config key's values are checked in one place, against the range declared beside its
default and meaning: a bad value is one line naming the key and the value, never a traceback from
deep inside a run. And the loaders refuse clips the host's memory cannot hold, with the arithmetic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import run_main
from sideways_cli.config import (Allowed, Config, fields_of, key_allowed, key_doc, load_config,
                                 valid_keys, validate)
from sideways_cli.engine.clock import parse_stash, parse_update
from sideways_cli.run import loaders
from sideways_cli.support.errors import UserError

PRESETS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))

# (--set override, the key the error names, the value as it shows it)
OUT_OF_RANGE = [
    ("seed=-1", "seed", "-1"),
    ("seed=4294967296", "seed", "4294967296"),
    ("mode=sgd", "mode", "'sgd'"),
    ("task=segment", "task", "'segment'"),
    ("device=tpu", "device", "'tpu'"),
    ("precision=float16", "precision", "'float16'"),
    ("model.temporal_kernel=0", "model.temporal_kernel", "0"),
    ("model.width=0", "model.width", "0"),
    ("model.width=-8", "model.width", "-8"),
    ("model.depth=0", "model.depth", "0"),
    ("model.dropout=1.5", "model.dropout", "1.5"),
    ("model.dropout=1", "model.dropout", "1"),
    ("model.dropout=-0.1", "model.dropout", "-0.1"),
    ("model.dropout=.nan", "model.dropout", "nan"),
    ("model.norm=batch", "model.norm", "'batch'"),
    ("model.args.2x=1", "model.args", "{'2x': 1}"),
    ("data.dataset=kinetics", "data.dataset", "'kinetics'"),
    ("data.root=", "data.root", "''"),
    ("data.fold=0", "data.fold", "0"),
    ("data.fold=4", "data.fold", "4"),
    ("data.max_bad_fraction=-0.5", "data.max_bad_fraction", "-0.5"),
    ("data.max_bad_fraction=1.01", "data.max_bad_fraction", "1.01"),
    ("data.max_bad_fraction=.inf", "data.max_bad_fraction", "inf"),
    ("data.clip_len=0", "data.clip_len", "0"),
    ("data.frame_stride=0", "data.frame_stride", "0"),
    ("data.batch_size=0", "data.batch_size", "0"),
    ("data.num_workers=-1", "data.num_workers", "-1"),
    ("data.size=15", "data.size", "15"),
    ("data.size=33", "data.size", "33"),
    ("data.size=0", "data.size", "0"),
    ("data.resize=8", "data.resize", "8"),
    ("data.decoder=opencv", "data.decoder", "'opencv'"),
    ("data.synthetic.train_per_class=0", "data.synthetic.train_per_class", "0"),
    ("data.synthetic.val_per_class=0", "data.synthetic.val_per_class", "0"),
    ("data.synthetic.num_frames=1", "data.synthetic.num_frames", "1"),
    ("data.synthetic.seed=-3", "data.synthetic.seed", "-3"),
    ("train.steps=0", "train.steps", "0"),
    ("train.lr=-1", "train.lr", "-1"),
    ("train.lr=0", "train.lr", "0"),
    ("train.lr=.nan", "train.lr", "nan"),
    ("train.lr=.inf", "train.lr", "inf"),
    ("train.lr=-.inf", "train.lr", "-inf"),
    ("train.optimizer=adam", "train.optimizer", "'adam'"),
    ("train.momentum=-3", "train.momentum", "-3"),
    ("train.momentum=1", "train.momentum", "1"),
    ("train.weight_decay=-1", "train.weight_decay", "-1"),
    ("train.weight_decay=.nan", "train.weight_decay", "nan"),
    ("train.lr_schedule=linear", "train.lr_schedule", "'linear'"),
    ("train.min_lr=-1", "train.min_lr", "-1"),
    ("train.lr_gamma=1", "train.lr_gamma", "1"),
    ("train.lr_step_size=0", "train.lr_step_size", "0"),
    ("train.lr_milestones=[5, 3]", "train.lr_milestones", "[5, 3]"),
    ("train.lr_milestones=[0]", "train.lr_milestones", "[0]"),
    ("train.warmup_steps=-5", "train.warmup_steps", "-5"),
    ("train.log_every=0", "train.log_every", "0"),
    ("train.eval_every=-1", "train.eval_every", "-1"),
    ("train.checkpoint_every=-1", "train.checkpoint_every", "-1"),
    ("eval.clips_per_video=0", "eval.clips_per_video", "0"),
    ("eval.batch_size=0", "eval.batch_size", "0"),
    ("eval.chunk=0", "eval.chunk", "0"),
    ("sideways.update=often", "sideways.update", "'often'"),
    ("sideways.update=every 0 ticks", "sideways.update", "'every 0 ticks'"),
    ("sideways.chunk=0", "sideways.chunk", "0"),
    ("sideways.stash=-1", "sideways.stash", "-1"),
    ("sideways.stash=2.5", "sideways.stash", "2.5"),
    ("sideways.stash=all", "sideways.stash", "'all'"),
    ("sideways.stash=true", "sideways.stash", "True"),
    ("parallel.replicas=0", "parallel.replicas", "0"),
    ("parallel.stages=0", "parallel.stages", "0"),
    ("parallel.balance=even", "parallel.balance", "'even'"),
    ("parallel.balance=[]", "parallel.balance", "[]"),
    ("parallel.balance=[2, 0]", "parallel.balance", "[2, 0]"),
    ("parallel.bp_schedule=zb", "parallel.bp_schedule", "'zb'"),
    ("parallel.microbatches=0", "parallel.microbatches", "0"),
    ("parallel.threads=0", "parallel.threads", "0"),
    ("parallel.timeout_s=0", "parallel.timeout_s", "0"),
    ("parallel.timeout_s=-1", "parallel.timeout_s", "-1"),
    ("parallel.timeout_s=.inf", "parallel.timeout_s", "inf"),
    ("parallel.backend=mpi", "parallel.backend", "'mpi'"),
    ("data.augment.resized_crop=[0.5,0.2]", "data.augment.resized_crop", "[0.5, 0.2]"),
    ("data.augment.resized_crop=[0,1]", "data.augment.resized_crop", "[0.0, 1.0]"),
    ("data.augment.resized_crop=[0.5,1.5]", "data.augment.resized_crop", "[0.5, 1.5]"),
    ("data.augment.resized_crop=[0.5]", "data.augment.resized_crop", "[0.5]"),
    ("data.augment.resized_crop=[0.1,0.5,1]", "data.augment.resized_crop", "[0.1, 0.5, 1.0]"),
    ("data.augment.resized_crop=[.nan,1]", "data.augment.resized_crop", "[nan, 1.0]"),
    ("data.augment.randaugment=31", "data.augment.randaugment", "31"),
    ("data.augment.randaugment=-1", "data.augment.randaugment", "-1"),
    ("data.augment.erasing=1.5", "data.augment.erasing", "1.5"),
    ("data.augment.erasing=-0.1", "data.augment.erasing", "-0.1"),
    ("data.augment.erasing=.nan", "data.augment.erasing", "nan"),
    ("data.augment.mixup=-1", "data.augment.mixup", "-1"),
    ("data.augment.mixup=.inf", "data.augment.mixup", "inf"),
    ("data.augment.cutmix=-0.5", "data.augment.cutmix", "-0.5"),
    ("data.mean=[0.4,0.4]", "data.mean", "[0.4, 0.4]"),
    ("data.std=[0.2,0,0.2]", "data.std", "[0.2, 0.0, 0.2]"),
    ("train.clip_grad_norm=-1", "train.clip_grad_norm", "-1"),
    ("train.accumulate=0", "train.accumulate", "0"),
    ("train.ema_decay=1", "train.ema_decay", "1"),
    ("train.label_smoothing=1", "train.label_smoothing", "1"),
    ("train.keep_best=0", "train.keep_best", "0"),
    ("train.early_stop_patience=-1", "train.early_stop_patience", "-1"),
]


@pytest.mark.parametrize("override, key, shown", OUT_OF_RANGE, ids=[o for o, _, _ in OUT_OF_RANGE])
def test_an_out_of_range_value_is_refused_naming_the_key_and_the_value(override, key, shown):
    with pytest.raises(UserError) as refused:
        load_config(None, [override])
    message = str(refused.value)
    assert message.startswith(f"config key {key!r} must be "), message
    assert message.endswith(f", got {shown}") and "\n" not in message, message
    assert "\n" not in message
    if key != "model.name":  # the message says what the key is for: its meaning's first clause
        assert f"({key_doc(key)[:12]}" in message


@pytest.mark.parametrize("override", [
    "model.width=null", "model.depth=null", "model.dropout=0", "model.dropout=0.99",
    "data.dataset=ucf101;data.fold=3",
    "data.max_bad_fraction=0", "data.max_bad_fraction=1", "data.num_workers=0", "data.size=16",
    "data.synthetic.num_frames=2", "train.lr=1e-6", "train.momentum=0", "train.weight_decay=0",
    "train.warmup_steps=0", "train.eval_every=0", "train.checkpoint_every=0",
    "sideways.update=every 1 tick", "sideways.update=every 4 ticks", "parallel.threads=null",
    "sideways.stash=0", "sideways.stash=1", "sideways.stash=full",
    "parallel.timeout_s=0.5", "parallel.balance=[1]", "model.weights=null", "seed=4294967295",
])
def test_the_edges_of_every_range_are_accepted(override):
    load_config(None, override.split(";"))  # ';' separates the overrides of one case


def test_the_defaults_and_every_preset_validate():
    validate(Config())
    assert PRESETS
    for path in PRESETS:
        load_config(path)


def test_every_key_declares_its_meaning_and_its_values():
    declared = {key: f for key, f, _ in fields_of()}
    assert list(declared) == valid_keys()
    for key in valid_keys():
        doc, allowed = declared[key].metadata.get("doc"), declared[key].metadata.get("allowed")
        assert isinstance(doc, str) and len(doc) >= 10, f"{key} has no doc in its metadata"
        assert isinstance(allowed, Allowed) and allowed.text, f"{key} declares no allowed values"
        assert key_doc(key) == doc and key_allowed(key) is allowed


def test_every_default_is_one_its_key_accepts():
    cfg = Config()
    for key, f, _ in fields_of():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert value is None or f.metadata["allowed"].accepts(value), key


ENGINE_PARSED = (  # keys the engine parses again: (key, its parser, values to judge)
    [("sideways.update", parse_update, update) for update in
     ["clip", "every 1 tick", "every 2 ticks", " every 3 ticks ", "every  12 ticks", "every 0 ticks",
      "every -1 ticks", "every ticks", "often", "Clip", "every 2 frames", ""]]
    + [("sideways.stash", parse_stash, stash) for stash in
       [0, 1, 12, "full", -1, 2.5, "Full", "", True, None]])


@pytest.mark.parametrize("key, parse, value", ENGINE_PARSED, ids=[f"{k}={v!r}" for k, _, v in ENGINE_PARSED])
def test_engine_settings_are_judged_as_the_engine_parses_them(key, parse, value):
    try:
        parse(value)
        engine_accepts = True
    except ValueError:
        engine_accepts = False
    assert key_allowed(key).accepts(value) == engine_accepts


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "config key 'train.lr' must be > 0 ("),
    ("train.weight_decay=-1", "config key 'train.weight_decay' must be >= 0 ("),
    ("model.width=0", "config key 'model.width' must be >= 1 or null ("),
    ("model.dropout=1.5", "config key 'model.dropout' must be >= 0 and < 1 ("),
    ("data.synthetic.train_per_class=0", "config key 'data.synthetic.train_per_class' must be >= 1 ("),
    ("train.warmup_steps=-5", "config key 'train.warmup_steps' must be >= 0 ("),
    ("train.momentum=-3", "config key 'train.momentum' must be >= 0 and < 1 ("),
    ("data.num_workers=-1", "config key 'data.num_workers' must be >= 0 ("),
    ("train.lr=.nan", "config key 'train.lr' must be a finite number > 0 ("),
])
def test_the_cli_prints_one_line_and_exits_2(override, message, tmp_path, monkeypatch, capsys):
    code, err = run_main(["train", "--set", override, "--out", tmp_path / "run", "-q"],
                         monkeypatch, capsys)
    assert code == 2
    assert err.startswith("error: " + message), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.multiprocess
def test_a_bad_value_exits_2_in_one_line_from_the_real_command(tmp_path):
    command = Path(sys.executable).parent / "sideways"
    result = subprocess.run([str(command), "train", "--set", "train.lr=-1", "--out",
                             str(tmp_path / "run"), "-q"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: config key 'train.lr' must be > 0 (") and lines[0].endswith("got -1")
    assert "Traceback" not in result.stderr + result.stdout


# -- the clips the loaders hold ------------------------------------------------------------------

GIB = 2**30


def test_one_batch_is_clips_x_frames_x_channels_x_pixels_in_float32():
    cfg = load_config(None, ["data.batch_size=8", "data.clip_len=10", "data.size=32",
                             "data.num_workers=3", "eval.batch_size=4"])
    train = loaders.train_load(cfg)
    assert train.batch_bytes == 8 * 10 * 3 * 32 * 32 * 4
    assert train.in_flight == 3 * loaders.PREFETCH_FACTOR + 1  # the workers' prefetched + the one in use
    assert train.bytes == train.in_flight * train.batch_bytes
    pinned = loaders.train_load(cfg, loaders.torch.device("cuda"))
    assert pinned.in_flight == train.in_flight + 1  # a GPU's batches also have a pinned copy
    val = loaders.val_load(cfg, shard=(0, 2))  # every replica evaluates whole eval.batch_size batches
    assert val.batch_bytes == 4 * 10 * 3 * 32 * 32 * 4 and val.bytes == 2 * val.in_flight * val.batch_bytes
    single = loaders.train_load(load_config(None, ["data.num_workers=0"]))
    assert single.in_flight == 1


def test_the_estimate_scales_with_clip_length_and_counts_the_frames_before_the_crop():
    base = loaders.train_load(load_config(None, ["data.clip_len=16"]))
    double = loaders.train_load(load_config(None, ["data.clip_len=32"]))
    assert double.bytes == 2 * base.bytes
    real = loaders.train_load(load_config(None, ["data.dataset=ucf101", "data.size=112"]))
    assert real.side == 128  # real videos are resized to 128 before the 112 crop: the bigger buffer
    wider = loaders.train_load(load_config(None, ["data.size=32", "data.resize=64"]))
    assert wider.side == 64 and wider.batch_bytes == 4 * base.batch_bytes


def test_clips_that_do_not_fit_are_refused_before_any_loader_is_built(monkeypatch):
    monkeypatch.setattr(loaders, "available_memory", lambda: 4 * GIB)
    default = load_config(None)
    loaders.validate_training_memory(default)
    huge = load_config(None, ["data.clip_len=100000"])
    with pytest.raises(UserError) as refused:
        loaders.validate_training_memory(huge)
    message = str(refused.value)
    need = (loaders.train_load(huge).bytes + loaders.val_load(huge).bytes) / GIB
    assert f"about {need:.1f} GiB" in message and "than the 4.0 GiB of memory available" in message
    for key in ("data.clip_len=100000", "data.batch_size=16", "data.num_workers=2", "eval.batch_size=32"):
        assert key in message
    assert message.endswith("lower data.clip_len, data.batch_size, eval.batch_size or data.num_workers")
    with pytest.raises(UserError, match="eval.batch_size=32 clips x data.clip_len=100000"):
        loaders.eval_loader(huge, data=None)


def test_the_limit_is_the_available_memory(monkeypatch):
    cfg = load_config(None, ["data.clip_len=64"])
    need = loaders.train_load(cfg).bytes + loaders.val_load(cfg).bytes
    monkeypatch.setattr(loaders, "available_memory", lambda: need)
    loaders.validate_loader_memory(cfg, [loaders.train_load(cfg), loaders.val_load(cfg)])
    monkeypatch.setattr(loaders, "available_memory", lambda: need - 1)
    with pytest.raises(UserError, match="data.clip_len"):
        loaders.validate_loader_memory(cfg, [loaders.train_load(cfg), loaders.val_load(cfg)])
    monkeypatch.setattr(loaders, "available_memory", lambda: None)  # unknown: no check
    loaders.validate_loader_memory(cfg, [loaders.train_load(cfg), loaders.val_load(cfg)])


def test_available_memory_is_memavailable_of_proc_meminfo(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384000 kB\nMemFree:         1000000 kB\n"
                       "MemAvailable:    8192000 kB\n")
    monkeypatch.setattr(loaders, "MEMINFO", meminfo)
    assert loaders.available_memory() == 8192000 * 1024
    meminfo.write_text("MemTotal:       16384000 kB\n")
    assert loaders.available_memory() is None
    monkeypatch.setattr(loaders, "MEMINFO", tmp_path / "absent")
    assert loaders.available_memory() is None


def test_a_training_refuses_clips_that_do_not_fit_before_it_reads_any_data(monkeypatch, capsys,
                                                                           tmp_path):
    monkeypatch.setattr(loaders, "available_memory", lambda: 4 * GIB)
    data = tmp_path / "data"
    code, err = run_main(["train", "--set", "data.clip_len=100000", "--set", f"data.root={data}",
                          "--out", tmp_path / "run", "-q"], monkeypatch, capsys)
    assert code == 2 and "than the 4.0 GiB of memory available" in err
    assert not data.exists()  # the embedded dataset was not generated first
