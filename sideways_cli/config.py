"""Typed configuration: defaults here, then a YAML file, then ``--set key=value`` overrides.

Unknown keys and values of the wrong type are refused with the list of valid keys, so a typo can
never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sideways_cli.atomic import write_text_atomic
from sideways_cli.errors import UserError

MODES = ("bp", "sideways")
PRECISIONS = ("float32", "float64")
TASKS = ("classify", "reconstruct")
DATASETS = ("synthetic", "ucf101", "hmdb51", "list", "folder")
MULTI_FOLD = ("ucf101", "hmdb51")  # the others have a single train/val split
NORMS = ("group", "frozen")  # model.norm; models/norms.py implements them


@dataclass
class ModelConfig:
    name: str = "c3d"  # vgg | c3d | resnet18 (task: classify) | autoencoder (task: reconstruct)
    temporal_kernel: int = 3  # k of every module but the head; 1 = per-frame 2D network
    width: int | None = None  # channels of the first layer; None = the model's own default
    # how much of the network to keep: a classifier's first N layers below the head, or the
    # autoencoder's N encoder levels (each mirrored by the decoder); None = the whole network
    depth: int | None = None
    dropout: float = 0.0  # before the classifier
    # a builder of your own (model.name 'package.module:function' or 'file.py') or torchvision's
    # ('torchvision:resnet18'): its keyword arguments, e.g. --set model.args.width=16
    args: dict[str, Any] = field(default_factory=dict)
    # torchvision networks' BatchNorms become: group (per-frame GroupNorm after weight-standardised
    # convs) | frozen (BatchNorm fixed at its running statistics: keeps pretrained numbers)
    norm: str = "group"
    # a state-dict file the built network starts from (made absolute when the config is read)
    weights: str | None = None
    new_head: bool = False  # with model.weights: the head keeps its fresh init (another class count)


@dataclass
class SyntheticConfig:
    train_per_class: int = 40
    val_per_class: int = 30  # 300 videos: one video is a third of a point of accuracy
    num_frames: int = 32
    seed: int = 0  # the dataset's own seed, independent of the run's


@dataclass
class ListConfig:
    """``data.dataset: list``: text files of ``relative/path label`` lines (paths relative to
    ``data.root``) and a labels file with one class name per line."""

    train: str | None = None
    val: str | None = None
    labels: str | None = None


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # synthetic | ucf101 | hmdb51 | list | folder (data/README.md)
    root: str = "data"  # datasets live (and the synthetic one is generated) under this folder
    fold: int = 1  # official split of ucf101 / hmdb51 (1-3); the other datasets have one split
    max_bad_fraction: float = 0.01  # stop if more of a split's videos are unreadable
    clip_len: int = 16
    frame_stride: int = 1  # smoothness knob: frames skipped between consecutive clip frames
    shuffle_frames: bool = False  # smoothness knob: destroy temporal order inside each clip
    batch_size: int = 16
    num_workers: int = 2
    size: int = 32  # frame side in pixels: the square crop the network sees
    resize: int | None = None  # short side before cropping; None: 128 for real data, synthetic as is
    flip: bool | None = None  # random horizontal flip; None: on for real data; never for synthetic
    decoder: str = "auto"  # auto | decord | pyav
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    list: ListConfig = field(default_factory=ListConfig)


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps for BP and update: clip (one per batch)
    lr: float = 0.001
    optimizer: str = "adamw"  # adamw | sgd (SGD wants a larger lr, e.g. 0.05)
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 10
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate once, at the end
    checkpoint_every: int = 100  # steps between resumable checkpoints/last.pt; 0: only at the end


@dataclass
class EvalConfig:
    clips_per_video: int = 2  # uniformly spaced clips; video prediction = mean over them
    batch_size: int = 32
    chunk: int = 16  # frames per forward call: memory bounded by it whatever the clip length; same numbers


@dataclass
class SidewaysEngineConfig:
    pipeline: str = "reset"  # reset: fill and drain every clip | continuous: a live stream
    update: str = "clip"  # clip: step once per batch | "every N ticks": step every N ticks
    chunk: int = 8  # ticks per module per call: same numbers; 1 = the tick rule, least memory


@dataclass
class ParallelConfig:
    """Data and depth parallelism: replicas of the network, each fed a shard of every batch, each
    split into contiguous stages, one process (one device) per stage of every replica: replicas x
    stages processes (README, "Depth-parallel training", "Data-parallel training"). None of these
    keys changes the numbers."""

    replicas: int = 1  # copies of the whole pipeline, data-parallel; each gets batch_size / replicas
    stages: int = 1  # processes per replica (one device each on GPUs); 1 = the single-process engine
    balance: str | list[int] = "auto"  # auto: by measured per-module cost | modules per stage
    schedule: str = "gpipe"  # mode bp across stages: torch.distributed.pipelining's gpipe | 1f1b
    microbatches: int = 4  # mode bp across stages: clips of a batch split into this many
    threads: int | None = None  # CPU threads per stage process; None: the cores shared out
    # a neighbour silent this long in the middle of a step is taken as hung and the job stops;
    # None: 20 s on the CPU, 300 s on CUDA (where cuDNN's first autotuning takes a while). Start-up,
    # evaluations and checkpoint writes wait longer (distributed/topology.py, PATIENT)
    timeout_s: float | None = None
    backend: str = "auto"  # auto | nccl (CUDA) | gloo (CPU): the one that moves the device's tensors


@dataclass
class Config:
    seed: int = 0
    mode: str = "bp"  # bp | sideways
    task: str = "classify"  # classify: every frame's logits vs the label | reconstruct: the frame
    device: str = "auto"  # auto | cpu | cuda
    deterministic: bool = False  # deterministic algorithms only: the same numbers every run
    amp: bool = False  # bf16 autocast for the forward passes; weights and optimizer stay fp32
    # float32 matrix products and convolutions in TF32 on Ampere and later GPUs: several times
    # faster, ~1e-3 relative; false: exact float32. float64 and the CPU are not affected
    tf32: bool = True
    # float32 | float64: weights, activations, gradients (float64: to check that numbers agree)
    precision: str = "float32"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sideways: SidewaysEngineConfig = field(default_factory=SidewaysEngineConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in _hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += valid_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type; ints are accepted where floats are expected."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if typing.get_origin(t) is dict and isinstance(value, dict):
            return dict(value)
        if typing.get_origin(t) is list and isinstance(value, list):
            return [_coerce(f"{key}[{i}]", item, typing.get_args(t)[0]) for i, item in enumerate(value)]
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool) and type(value) is t:
            return value
    names = " or ".join(str(t) if typing.get_origin(t) else getattr(t, "__name__", str(t))
                        for t in allowed)
    raise UserError(f"config key {key!r} expects {names}, got {value!r}")


def _apply(obj: Any, values: dict[str, Any], prefix: str, source: str) -> None:
    hints = _hints(type(obj))
    for name, value in values.items():
        key = prefix + name
        if name not in hints:
            raise UserError(f"unknown config key {key!r} in {source}; valid keys: "
                            + ", ".join(valid_keys()))
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise UserError(f"config key {key!r} in {source} is a section; give it a mapping")
            _apply(getattr(obj, name), value, key + ".", source)
        elif typing.get_origin(hints[name]) is dict and isinstance(value, dict):
            # a mapping merges: --set model.args.width=16 keeps the YAML's other arguments
            setattr(obj, name, _merged(getattr(obj, name), value))
        else:
            setattr(obj, name, _coerce(key, value, hints[name]))


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


# YAML 1.1 reads 1e-3 as text (it wants 1.0e-3); on a command line it can only mean a number.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_scalar(raw: str) -> Any:
    """A value typed on the command line, read as a YAML scalar: 2 -> int, true -> bool, 1e-3 ->
    float; text that is not valid YAML stays text."""
    if _EXPONENT_FLOAT.fullmatch(raw.strip()):
        return float(raw)
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=value`` -> {"a": {"b": value}}, the value parsed as a YAML scalar."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects KEY=VALUE, got {text!r}")
    value = parse_scalar(raw)
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path is not None:
        if not path.is_file():
            raise UserError(f"config file {path} does not exist; pass an existing YAML file "
                            "(the presets are in experiments/)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path} is not valid YAML: {exc}".splitlines()[0]) from None
        if not isinstance(data, dict):
            raise UserError(f"{path} must hold a mapping of config keys")
        _apply(cfg, data, "", str(path))
    for text in overrides or []:
        _apply(cfg, parse_override(text), "", f"--set {text}")
    if cfg.model.weights:
        # the run directory's config then names the same file from anywhere
        cfg.model.weights = str(Path(cfg.model.weights).expanduser().resolve())
    validate(cfg)
    return cfg


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"config key {key!r} must be one of {', '.join(choices)}, got {value!r}")


def validate(cfg: Config) -> None:
    """What the config alone can tell; the model and the engine check their own keys
    (``build.check``)."""
    _choice("mode", cfg.mode, MODES)
    _choice("task", cfg.task, TASKS)
    _choice("device", cfg.device, ("auto", "cpu", "cuda"))
    _choice("precision", cfg.precision, PRECISIONS)
    if cfg.amp and cfg.precision != "float32":
        raise UserError(f"amp (bf16 autocast) runs float32 weights; drop --amp or set precision=float32, "
                        f"got precision={cfg.precision}")
    _choice("train.optimizer", cfg.train.optimizer, ("sgd", "adamw"))
    _choice("train.schedule", cfg.train.schedule, ("cosine", "constant"))
    _choice("data.decoder", cfg.data.decoder, ("auto", "decord", "pyav"))
    _choice("data.dataset", cfg.data.dataset, DATASETS)
    _choice("model.norm", cfg.model.norm, NORMS)
    if cfg.model.new_head and not cfg.model.weights:
        raise UserError("config key 'model.new_head' keeps the head fresh when loading "
                        "model.weights; set model.weights=PATH too, or drop model.new_head")
    positive = {"model.temporal_kernel": cfg.model.temporal_kernel, "data.clip_len": cfg.data.clip_len,
                "data.frame_stride": cfg.data.frame_stride, "data.batch_size": cfg.data.batch_size,
                "data.size": cfg.data.size, "train.steps": cfg.train.steps,
                "eval.clips_per_video": cfg.eval.clips_per_video, "eval.chunk": cfg.eval.chunk,
                "sideways.chunk": cfg.sideways.chunk}
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"config key {key!r} must be >= 1, got {value}")
    for key in ("eval_every", "checkpoint_every"):
        if getattr(cfg.train, key) < 0:
            raise UserError(f"config key 'train.{key}' must be >= 0 (0: only at the end), "
                            f"got {getattr(cfg.train, key)}")
    if cfg.data.size < 16 or cfg.data.size % 2:
        raise UserError(f"config key 'data.size' must be an even number >= 16 (H.264 frames), "
                        f"got {cfg.data.size}")
    _validate_data(cfg.data)
    _validate_parallel(cfg)


def _validate_parallel(cfg: Config) -> None:
    p = cfg.parallel
    _choice("parallel.schedule", p.schedule, ("gpipe", "1f1b"))
    _choice("parallel.backend", p.backend, ("auto", "gloo", "nccl"))
    for key in ("replicas", "stages", "microbatches"):
        if getattr(p, key) < 1:
            raise UserError(f"config key 'parallel.{key}' must be >= 1, got {getattr(p, key)}")
    if p.threads is not None and p.threads < 1:
        raise UserError(f"config key 'parallel.threads' must be >= 1, got {p.threads}")
    if p.timeout_s is not None and p.timeout_s <= 0:
        raise UserError(f"config key 'parallel.timeout_s' must be > 0, got {p.timeout_s}")
    if isinstance(p.balance, str) and p.balance != "auto":
        raise UserError(f"config key 'parallel.balance' must be auto or a list of modules per "
                        f"stage such as [2, 3], got {p.balance!r}")
    if isinstance(p.balance, list) and p.stages > 1 and (len(p.balance) != p.stages
                                                         or min(p.balance) < 1):
        raise UserError(f"config key 'parallel.balance' must list parallel.stages={p.stages} "
                        f"module counts, each >= 1, got {p.balance}")
    if cfg.data.batch_size % p.replicas:
        raise UserError(f"data.batch_size={cfg.data.batch_size} must be a multiple of "
                        f"parallel.replicas={p.replicas}: every replica trains an equal shard")
    shard = cfg.data.batch_size // p.replicas
    if cfg.mode == "bp" and p.stages > 1 and shard % p.microbatches:
        raise UserError(f"data.batch_size={cfg.data.batch_size} / parallel.replicas={p.replicas} "
                        f"must be a multiple of parallel.microbatches={p.microbatches} for pipelined BP")


def _validate_data(d: DataConfig) -> None:
    if not 1 <= d.fold <= 3:
        raise UserError(f"config key 'data.fold' must be 1, 2 or 3, got {d.fold}")
    if d.fold != 1 and d.dataset not in MULTI_FOLD:
        raise UserError(f"config key 'data.fold' must be 1 for data.dataset={d.dataset} (it has a "
                        f"single split; only {' and '.join(MULTI_FOLD)} have folds), got {d.fold}")
    if not 0.0 <= d.max_bad_fraction <= 1.0:
        raise UserError(f"config key 'data.max_bad_fraction' must be between 0 and 1, "
                        f"got {d.max_bad_fraction}")
    if d.resize is not None and d.resize < d.size:
        raise UserError(f"config key 'data.resize' ({d.resize}) must be >= data.size ({d.size}): "
                        "frames are resized to it, then cropped to data.size")
    if d.dataset == "synthetic" and d.flip:
        # The synthetic classes come in mirror pairs: a flip turns move_left into move_right.
        raise UserError("config key 'data.flip' cannot be true for the synthetic dataset: a flip "
                        "turns move_left into move_right; remove it")
    if d.dataset == "list":
        unset = [f"data.list.{k}" for k in ("train", "val", "labels") if not getattr(d.list, k)]
        if unset:
            raise UserError(f"data.dataset=list needs {', '.join(unset)}: text files of "
                            "'relative/path label' lines and a file of class names (data/README.md)")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flat_dict(cfg: Config) -> dict[str, Any]:
    """Every setting under its dotted key ('data.frame_stride': 1), as --set and --sweep name it."""
    def walk(node: dict[str, Any], prefix: str) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for name, value in node.items():
            if isinstance(value, dict):
                flat.update(walk(value, f"{prefix}{name}."))
            else:
                flat[prefix + name] = value
        return flat

    return walk(to_dict(cfg), "")


def from_dict(data: dict[str, Any], source: str) -> Config:
    cfg = Config()
    _apply(cfg, data, "", source)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
