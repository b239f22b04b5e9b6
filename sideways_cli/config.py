"""Typed configuration: defaults here, then a YAML file, then ``--set key=value`` overrides.

Unknown keys and values of the wrong type are refused with the list of valid keys, so a typo can
never silently fall back to a default. Every key is declared once, with :func:`setting`: its
default, the values it accepts (an :class:`Allowed`) and what it means; :func:`validate` checks every
key against its own, then the rules that tie several keys together.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from sideways_cli.support.atomic import write_text_atomic
from sideways_cli.support.errors import UserError

MODES = ("bp", "sideways")
PRECISIONS = ("float32", "float64")
TASKS = ("classify", "reconstruct")
DATASETS = ("synthetic", "ucf101", "hmdb51", "list", "folder")
MULTI_FOLD = ("ucf101", "hmdb51")  # the others have a single train/val split
NORMS = ("group", "frozen")  # model.norm; models/norms.py implements them
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("cosine", "constant", "step", "multistep")
DECODERS = ("auto", "torchcodec", "torchcodec-cuda", "decord", "pyav")
BP_SCHEDULES = ("gpipe", "1f1b")
BACKENDS = ("auto", "nccl", "gloo")
MAX_SEED = 2**32 - 1


# -- what a key accepts ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Allowed:
    """The values one key accepts: ``text`` says which, as an error message puts it after "must
    be"; ``accepts(value)`` tells, for a value already of the key's type (None, where the type
    allows it, is accepted before it is asked). ``elsewhere``: the values are judged by the
    layer that owns the key (``build.validate``), not by :func:`validate`."""

    text: str
    accepts: Callable[[Any], bool]
    elsewhere: bool = False


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bound(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def one_of(*choices: Any, text: str | None = None) -> Allowed:
    return Allowed(text or "one of " + ", ".join(map(str, choices)), lambda v: v in choices)


def at_least(low: float) -> Allowed:
    return Allowed(f">= {_bound(low)}", lambda v: _number(v) and v >= low)


def above(low: float) -> Allowed:
    return Allowed(f"> {_bound(low)}", lambda v: _number(v) and v > low)


def between(low: float, high: float) -> Allowed:
    """The closed interval [low, high]."""
    return Allowed(f"between {_bound(low)} and {_bound(high)}", lambda v: _number(v) and low <= v <= high)


def fraction_below_one() -> Allowed:
    """[0, 1): a probability that must leave something (dropout), a decay that must decay (momentum)."""
    return Allowed(">= 0 and < 1", lambda v: _number(v) and 0 <= v < 1)


def even_at_least(low: int, why: str) -> Allowed:
    return Allowed(f"an even number >= {low} {why}", lambda v: _number(v) and v >= low and v % 2 == 0)


FLAG = Allowed("true or false", lambda v: isinstance(v, bool))
PATH = Allowed("a path", lambda v: isinstance(v, str))
# model.weights' other form: torchvision's weights by name, which build.validate resolves
NAMED_WEIGHTS = "torchvision:"
WEIGHTS = Allowed(f"a path or torchvision's weights by name ('{NAMED_WEIGHTS}<Enum>.<MEMBER>', "
                  f"'{NAMED_WEIGHTS}DEFAULT')", lambda v: isinstance(v, str))
FOLDER = Allowed("a folder's path", lambda v: isinstance(v, str) and bool(v.strip()))
NAME = Allowed("a name that is not empty", lambda v: isinstance(v, str) and bool(v.strip()))
KEYWORDS = Allowed("a mapping of keyword-argument names to values",
                 lambda v: isinstance(v, dict) and all(isinstance(k, str) and k.isidentifier() for k in v))
# the engine parses it (engine/clock.py, parse_update): the same grammar, the same words
_EVERY_N_TICKS = re.compile(r"every\s+(\d+)\s+ticks?")
UPDATE = Allowed("'clip' or 'every N ticks' with N >= 1",
               lambda v: isinstance(v, str) and (v == "clip" or bool(
                   (m := _EVERY_N_TICKS.fullmatch(v.strip())) and int(m.group(1)) >= 1)))
STASH = Allowed("0, a number of ticks N >= 1 or 'full'",
                lambda v: v == "full" or (_number(v) and isinstance(v, int) and v >= 0))
MILESTONES = Allowed("a list of steps, each >= 1, increasing, such as [200, 250]",
                     lambda v: isinstance(v, list) and all(_number(n) and isinstance(n, int) and n >= 1
                                                          for n in v) and v == sorted(set(v)))
BALANCE = Allowed("auto or a list of modules per stage, each >= 1, such as [2, 3]",
                lambda v: v == "auto" or (isinstance(v, list) and len(v) > 0
                                          and all(_number(n) and n >= 1 for n in v)))


def elsewhere(text: str) -> Allowed:
    """A key whose values only the layer that uses it can judge (the model zoo, the engine)."""
    return Allowed(text, lambda v: True, elsewhere=True)


def setting(default: Any, allowed: Allowed, doc: str) -> Any:
    """One config key: its default, the values it accepts and what it means (the documentation
    of the key; an out-of-range value's error quotes its first clause)."""
    metadata = {"doc": doc, "allowed": allowed}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# -- the keys -------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    name: str = setting("c3d", elsewhere("a model of the zoo, 'torchvision:<arch>' or a builder"),
                        "the network: vgg | c3d | resnet18 (task: classify) | autoencoder "
                        "(task: reconstruct)")
    temporal_kernel: int = setting(3, at_least(1),
                                   "k of every module but the head; 1 = per-frame 2D network")
    width: int | None = setting(None, at_least(1),
                                "channels of the first layer; None = the model's own default")
    depth: int | None = setting(None, at_least(1),  # its upper bound is the model's: build.validate
                                "how much of the network to keep: a classifier's first N layers below "
                                "the head, or the autoencoder's N encoder levels (each mirrored by the "
                                "decoder); None = the whole network")
    dropout: float = setting(0.0, fraction_below_one(), "dropout probability before the classifier")
    args: dict[str, Any] = setting({}, KEYWORDS,
                                   "keyword arguments of a builder of your own (model.name "
                                   "'package.module:function' or 'file.py') or of torchvision's "
                                   "('torchvision:resnet18'); e.g. --set model.args.width=16")
    norm: str = setting("group", one_of(*NORMS),
                        "torchvision networks' BatchNorms become: group (per-frame GroupNorm after "
                        "weight-standardised convs) | frozen (BatchNorm fixed at its running "
                        "statistics: keeps pretrained numbers)")
    weights: str | None = setting(None, WEIGHTS,  # build.validate: the file exists, the name fits
                                  "what the built network starts from: a state-dict file (made "
                                  "absolute when the config is read) or torchvision's weights of "
                                  "model.name's architecture, e.g. "
                                  "torchvision:R2Plus1D_18_Weights.KINETICS400_V1, or "
                                  "torchvision:DEFAULT (its DEFAULT), fetched into "
                                  "$TORCH_HOME/hub/checkpoints unless there already; BatchNorm "
                                  "statistics need model.norm: frozen")
    new_head: bool = setting(False, FLAG,
                             "the head keeps its fresh init (another class count), with model.weights")


@dataclass
class SyntheticConfig:
    train_per_class: int = setting(40, at_least(1), "training videos generated per class")
    val_per_class: int = setting(30, at_least(1), "validation videos generated per class; "
                                 "300 videos: one video is a third of a point of accuracy")
    num_frames: int = setting(32, at_least(2), "frames of each generated video; the classes are "
                              "motions, which take at least two frames to see")
    seed: int = setting(0, between(0, MAX_SEED), "the dataset's own seed, independent of the run's")


@dataclass
class ListConfig:
    """``data.dataset: list``: text files of ``relative/path label`` lines (paths relative to
    ``data.root``) and a labels file with one class name per line."""

    train: str | None = setting(None, PATH, "the training list: 'relative/path label' lines")
    val: str | None = setting(None, PATH, "the validation list: 'relative/path label' lines")
    labels: str | None = setting(None, PATH, "the class names, one per line")


def _area_range(v: Any) -> bool:
    return (isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v)
            and 0 < v[0] <= v[1] <= 1)


AREA_RANGE = Allowed("a list [min, max] with 0 < min <= max <= 1, such as [0.25, 1.0]", _area_range)



def _per_channel(positive: bool) -> Allowed:
    """Three numbers, one per colour channel (R, G, B); ``positive``: each > 0."""
    def accepts(v: Any) -> bool:
        three = isinstance(v, list) and len(v) == 3 and all(_number(x) for x in v)
        return three and (not positive or all(x > 0 for x in v))

    return Allowed("a list of 3 numbers, one per channel (R, G, B)" + (", each > 0" if positive else ""),
                   accepts)


@dataclass
class AugmentConfig:
    """``data.augment``: training-only augmentation, each knob off by default. The per-clip ones
    (resized_crop, randaugment, erasing) draw once per clip and apply that draw to every frame
    (data/transforms.py); mixup and cutmix mix the clips of a batch."""

    resized_crop: list[float] | None = setting(
        None, AREA_RANGE, "RandomResizedCrop's range of the crop's area, a fraction of the resized "
        "frame: a crop of random area in it and aspect ratio in 3/4..4/3, resized to data.size, in "
        "place of the plain random data.size crop; null: off")
    randaugment: int | None = setting(
        None, between(0, 30), "RandAugment's magnitude, of its 31 bins: two random ops per clip "
        "(rotate, shear, translate, colour, contrast, posterize, solarize, ...); null: off")
    erasing: float = setting(0.0, between(0, 1), "probability of random erasing: a random "
                             "rectangle of the normalised clip set to 0, the mean; 0: off")
    mixup: float = setting(0.0, at_least(0), "MixUp's alpha: each batch mixes pairs of clips and "
                           "their labels with a Beta(alpha, alpha) weight; 0: off")
    cutmix: float = setting(0.0, at_least(0), "CutMix's alpha: each batch pastes a box of one "
                            "clip into another, the labels mixed by its area, Beta(alpha, alpha); "
                            "0: off")


@dataclass
class DataConfig:
    dataset: str = setting("synthetic", one_of(*DATASETS),
                           "which videos: synthetic | ucf101 | hmdb51 | list | folder (data/README.md)")
    root: str = setting("data", FOLDER,
                        "datasets live (and the synthetic one is generated) under this folder")
    fold: int = setting(1, one_of(1, 2, 3, text="1, 2 or 3"), "official split of ucf101 / hmdb51 "
                        "(1-3); the other datasets have one split")
    max_bad_fraction: float = setting(0.01, between(0, 1),
                                      "stop if more of a split's videos are unreadable")
    clip_len: int = setting(16, at_least(1), "frames per clip")  # loaders.py: that the clips fit in memory
    frame_stride: int = setting(1, at_least(1), "frames skipped between consecutive clip "
                                "frames (a smoothness knob)")
    shuffle_frames: bool = setting(False, FLAG,
                                   "destroy temporal order inside each clip (a smoothness knob)")
    batch_size: int = setting(16, at_least(1), "training clips per optimizer step")
    num_workers: int = setting(2, at_least(0), "loader processes decoding clips; 0: in the "
                               "training process itself")
    size: int = setting(32, even_at_least(16, "for H.264 frames"),
                        "frame side in pixels: the square crop the network sees")
    resize: int | None = setting(None, at_least(16), "short side before cropping; None: 128 for "
                                 "real data, synthetic as is")
    flip: bool | None = setting(None, FLAG, "random horizontal flip; None: on for real data; "
                                "never for synthetic")
    mean: list[float] = setting([0.45, 0.45, 0.45], _per_channel(False), "what is subtracted from "
                                "each channel of frames in [0, 1] before dividing by data.std; "
                                "torchvision's video weights were trained with [0.43216, 0.394666, "
                                "0.37645]")
    std: list[float] = setting([0.225, 0.225, 0.225], _per_channel(True), "what each channel is "
                               "divided by after data.mean; torchvision's video weights: "
                               "[0.22803, 0.22145, 0.216989]")
    decoder: str = setting("auto", one_of(*DECODERS), "the video decoder; auto: the best installed, "
                           "TorchCodec, else decord (PyAV for a file either fails on), else PyAV | "
                           "torchcodec | torchcodec-cuda (on the run's GPU, in the training process: "
                           "data.num_workers 0) | decord | pyav")
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    list: ListConfig = field(default_factory=ListConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainConfig:
    steps: int = setting(300, at_least(1), "training steps; optimizer steps for BP and update: "
                         "clip (one per batch)")
    lr: float = setting(0.001, above(0), "peak learning rate, after the warm-up")
    optimizer: str = setting("adamw", one_of(*OPTIMIZERS),
                             "the optimizer: adamw | sgd (SGD wants a larger lr, e.g. 0.05)")
    momentum: float = setting(0.9, fraction_below_one(),
                              "SGD's momentum (Nesterov when > 0); adamw has none")
    weight_decay: float = setting(1e-4, at_least(0), "decoupled (adamw) or L2 (sgd) weight decay")
    decay_norms_and_biases: bool = setting(True, FLAG, "train.weight_decay also on biases and "
                                           "normalisation weights (every tensor of one dimension); "
                                           "false: only on the weights of convolutions and "
                                           "linear layers, as fine-tuning recipes do")
    clip_grad_norm: float = setting(0.0, at_least(0), "clip the gradient (BP) or pseudo-gradient "
                                    "(Sideways) of every update to this global norm, over every "
                                    "stage; the norm before clipping is logged (grad_norm); 0: no "
                                    "clipping")
    accumulate: int = setting(1, at_least(1), "batches per optimizer step: their gradients are "
                              "averaged, as one batch of accumulate x data.batch_size clips would "
                              "give; a training step is then that many batches. Sideways needs "
                              "sideways.update: clip")
    ema_decay: float = setting(0.0, fraction_below_one(), "keep an exponential moving average of "
                               "the weights, updated after every optimizer step with this decay "
                               "(e.g. 0.999), evaluated (val_ema_*) and checkpointed beside the "
                               "raw weights; 0: none")
    label_smoothing: float = setting(0.0, fraction_below_one(), "the share of every target spread "
                                     "evenly over the classes (classify); 0: none")
    lr_schedule: str = setting("cosine", one_of(*LR_SCHEDULES), "the learning rate after the "
                            "warm-up: cosine (to train.min_lr at train.steps) | constant | step "
                            "(times train.lr_gamma after every train.lr_step_size steps) | "
                            "multistep (times train.lr_gamma from each of train.lr_milestones on)")
    min_lr: float = setting(0.0, at_least(0), "the learning rate cosine decays to, and the floor "
                            "of step and multistep; below train.lr")
    lr_gamma: float = setting(0.1, Allowed("> 0 and < 1", lambda v: _number(v) and 0 < v < 1),
                              "the factor step and multistep multiply the learning rate by")
    lr_step_size: int = setting(100, at_least(1), "steps between the step schedule's decays, "
                                "counted from the first step (100: steps 101-200 at train.lr x "
                                "train.lr_gamma)")
    lr_milestones: list[int] = setting([200, 250], MILESTONES, "the steps from which the "
                                       "multistep schedule's learning rate is train.lr_gamma times "
                                       "lower, once more at each")
    warmup_steps: int = setting(10, at_least(0), "steps of linear warm-up to train.lr; 0: none")
    log_every: int = setting(10, at_least(1), "steps between progress lines")
    eval_every: int = setting(0, at_least(0), "steps between evaluations; 0: evaluate once, at the end")
    checkpoint_every: int = setting(100, at_least(0), "steps between resumable "
                                    "checkpoints/last.pt; 0: only at the end")
    fidelity_every: int = setting(0, at_least(0), "steps between measurements of each module's "
                                  "gradient fidelity (cosine of Sideways' pseudo-gradient to BP's "
                                  "gradient) on the step's batch, from its weights, into "
                                  "fidelity.jsonl; 0: none. Needs parallel.stages 1")
    monitor: str = setting("auto", elsewhere("auto or an evaluation metric"),  # build.validate
                           "the evaluation metric that picks checkpoints/best.pt and early "
                           "stopping: auto (val_video_top1; val_psnr for reconstruct) or any "
                           "val_* column of evaluations.csv, val_ema_* with train.ema_decay; "
                           "val_mse is better lower, the others higher")
    keep_best: int = setting(1, at_least(1), "how many of the best evaluated checkpoints to keep: "
                             "checkpoints/best.pt, and with K > 1 also best-<step>.pt for each of "
                             "the K best")
    early_stop_patience: int = setting(0, at_least(0), "stop training after this many evaluations "
                                       "in a row without a better train.monitor (then the final "
                                       "evaluation and summary, as at train.steps); 0: never")


@dataclass
class EvalConfig:
    clips_per_video: int = setting(2, at_least(1), "evaluation clips per video, uniformly spaced; "
                                   "video prediction = mean over them")
    crops: int = setting(1, one_of(1, 3), "crops per clip: 1 = the centre | 3 = the long side's "
                         "start, centre and end (the 3-crop test); video prediction = mean over "
                         "every clip's crops")
    batch_size: int = setting(32, at_least(1), "clips per evaluation batch")
    chunk: int = setting(16, at_least(1), "frames per forward call: memory bounded by it whatever "
                         "the clip length; same numbers")


@dataclass
class SidewaysEngineConfig:
    between_clips: str = setting("reset", elsewhere("reset or continuous"),  # build.validate
                                 "what the registers keep from one batch to the next; reset: "
                                 "nothing, every clip fills and drains | continuous: everything, "
                                 "a live stream")
    update: str = setting("clip", UPDATE, "when Sideways steps the optimizer; clip: once per "
                          "batch | \"every N ticks\": every N ticks")
    chunk: int = setting(8, at_least(1), "ticks per module per call: same numbers; 1 = the tick "
                         "rule, least memory")
    stash: int | str = setting(0, STASH, "the staleness dial: how old an activation a gradient "
                               "may meet; 0: the newest (Sideways) | N: its own frame's if at "
                               "most N ticks old | full: always its own frame's, and each window "
                               "slot's gradient to its own frame: BP's gradients, depth-parallel, "
                               "memory flat in clip length")


@dataclass
class ParallelConfig:
    """Data and depth parallelism: replicas of the network, each fed a shard of every batch, each
    split into contiguous stages, one process (one device) per stage of every replica: replicas x
    stages processes (docs/parallel.md). None of these
    keys changes the numbers."""

    replicas: int = setting(1, at_least(1), "copies of the whole pipeline, data-parallel; each "
                            "gets batch_size / replicas")
    stages: int = setting(1, at_least(1), "processes per replica (one device each on GPUs); 1 = "
                          "the single-process engine")
    balance: str | list[int] = setting("auto", BALANCE, "how the modules are split into stages; "
                                       "auto: by measured per-module cost | modules per stage")
    bp_schedule: str = setting("gpipe", one_of(*BP_SCHEDULES), "the order of mode bp's "
                               "microbatches across stages: torch.distributed.pipelining's gpipe "
                               "| 1f1b")
    microbatches: int = setting(4, at_least(1), "clips of a batch split into this many (mode "
                                "bp across stages)")
    threads: int | None = setting(None, at_least(1), "CPU threads per stage process; None: the "
                                  "cores shared out")
    timeout_s: float | None = setting(None, above(0), "a neighbour silent this long in the middle "
                                      "of a step is taken as hung and the job stops; None: 20 s on "
                                      "the CPU, 300 s on CUDA (where cuDNN's first autotuning takes "
                                      "a while). Start-up, evaluations and checkpoint writes wait "
                                      "longer (parallel/topology.py, PATIENT)")
    backend: str = setting("auto", one_of(*BACKENDS), "the process-group library; auto: the one that "
                           "moves the device's tensors | nccl (CUDA) | gloo (CPU)")


@dataclass
class LogConfig:
    """Live tracking while a run trains (run/tracking.py); only global rank 0 logs, and a tracker
    that fails is one warning line, never a stopped run."""

    tensorboard: bool = setting(False, FLAG, "write TensorBoard event files to RUN_DIR/tensorboard "
                                "as the run trains: tensorboard --logdir RUN_DIR")
    wandb: bool = setting(False, FLAG, "log to Weights & Biases, offline with WANDB_MODE=offline "
                          "(pip install 'sideways-cli[wandb]')")
    wandb_project: str = setting("sideways", NAME, "the W&B project the run is logged to")
    mlflow: bool = setting(False, FLAG, "log to MLflow: the server MLFLOW_TRACKING_URI names, else "
                           "a store in RUN_DIR/mlflow.db (pip install 'sideways-cli[mlflow]')")
    mlflow_experiment: str = setting("sideways", NAME, "the MLflow experiment the run is logged to")


@dataclass
class Config:
    seed: int = setting(0, between(0, MAX_SEED), "the run's seed: initial weights, clip order, "
                        "crops, dropout")
    mode: str = setting("bp", one_of(*MODES), "the training rule: bp (exact backprop) | sideways "
                        "(pseudo-gradients: docs/engine.md)")
    task: str = setting("classify", one_of(*TASKS), "what the network learns; classify: every frame's "
                        "logits vs the label | reconstruct: the frame")
    device: str = setting("auto", one_of(*DEVICES), "where the run computes: auto | cpu | cuda")
    deterministic: bool = setting(False, FLAG, "deterministic algorithms only: the same numbers "
                                  "every run")
    amp: bool = setting(False, FLAG, "bf16 autocast for the forward passes; weights and optimizer "
                        "stay fp32")
    tf32: bool = setting(True, FLAG, "float32 matrix products and convolutions in TF32 on Ampere "
                         "and later GPUs: several times faster, ~1e-3 relative; false: exact "
                         "float32. float64 and the CPU are not affected")
    precision: str = setting("float32", one_of(*PRECISIONS), "the dtype of weights, activations, "
                             "gradients: float32 | float64 (float64: to check that numbers agree)")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sideways: SidewaysEngineConfig = field(default_factory=SidewaysEngineConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    log: LogConfig = field(default_factory=LogConfig)


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


# Keys renamed so that each word has one meaning: an old config, run directory or checkpoint that
# names the old key is read as the new one.
RENAMED_KEYS = {"train.schedule": "train.lr_schedule", "parallel.schedule": "parallel.bp_schedule",
                "sideways.pipeline": "sideways.between_clips"}


def current_key(key: str) -> str:
    """``key`` under its present name (a renamed key's new one)."""
    return RENAMED_KEYS.get(key, key)


def _apply(obj: Any, values: dict[str, Any], prefix: str, source: str) -> None:
    hints = _hints(type(obj))
    for name, value in values.items():
        key = current_key(prefix + name)
        name = key.rsplit(".", 1)[-1]
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
            try:
                setattr(obj, name, _coerce(key, value, hints[name]))
            except UserError:
                _refuse_as_declared(obj, name, key, value, hints[name])
                raise


def _refuse_as_declared(obj: Any, name: str, key: str, value: Any, hint: Any) -> None:
    """A key of several types (``sideways.stash``: a number or 'full') refuses a value of none of
    them with the values it accepts, which say more than the type names."""
    union = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
    types_ = [t for t in union if t is not type(None)]
    declared = next(f for f in dataclasses.fields(obj) if f.name == name).metadata
    if len(types_) > 1 and "allowed" in declared and not declared["allowed"].elsewhere:
        validate_value(key, value, declared["allowed"], hint, declared["doc"])


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


BASE_KEY = "_base_"  # a config file's bases: a file name or a list, relative to the file


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> Config:
    """The defaults, then ``path``'s bases (``_base_``, in order, each with its own bases first),
    then ``path`` itself, then ``overrides``: a later value wins, key by key."""
    cfg = Config()
    if path is not None:
        if not path.is_file():
            raise UserError(f"config file {path} does not exist; pass an existing YAML file "
                            "(the presets are in experiments/)")
        for data, source in config_layers(path):
            _apply(cfg, data, "", source)
    for text in overrides or []:
        _apply(cfg, parse_override(text), "", f"--set {text}")
    if cfg.model.weights and not cfg.model.weights.startswith(NAMED_WEIGHTS):
        # the run directory's config then names the same file from anywhere
        cfg.model.weights = str(Path(cfg.model.weights).expanduser().resolve())
    validate(cfg)
    return cfg


def config_layers(path: Path, within: tuple[Path, ...] = ()) -> list[tuple[dict[str, Any], str]]:
    """(mapping, file name) of ``path``'s bases, recursively, then of ``path``; ``within``: the
    files whose bases are being read, to refuse a cycle."""
    if path.resolve() in within:
        chain = " -> ".join(str(p) for p in (*within, path.resolve()))
        raise UserError(f"{path}: its {BASE_KEY} chain comes back to it ({chain}); remove one "
                        f"of those {BASE_KEY} entries")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys")
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UserError(f"{path}: {BASE_KEY} must be a file name or a list of file names, "
                        f"got {bases!r}")
    layers = []
    for base in bases:
        base_path = path.parent / Path(base).expanduser()  # an absolute name stays as it is
        if not base_path.is_file():
            raise UserError(f"{path}: {BASE_KEY} {base} not found ({base_path} does not exist); "
                            "names are relative to the file that gives them")
        layers += config_layers(base_path, (*within, path.resolve()))
    return [*layers, (data, str(path))]


def fields_of(cls: type = Config, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, dataclass field, type hint) of every key, in declaration order."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += fields_of(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f, hints[f.name]))
    return out


def key_doc(key: str) -> str:
    """What ``key`` means, as declared beside its default."""
    return _field(key).metadata["doc"]


def key_allowed(key: str) -> Allowed:
    """The values ``key`` accepts."""
    return _field(key).metadata["allowed"]


def _field(key: str) -> dataclasses.Field:
    for name, f, _ in fields_of():
        if name == key:
            return f
    raise KeyError(key)


def accepts_null(hint: Any) -> bool:
    """Whether a key of type ``hint`` may be null (None)."""
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


def _show(value: Any) -> str:
    """A value as the user typed it: -1 rather than -1.0, strings quoted."""
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return repr(value)


def _summary(doc: str) -> str:
    """A key's meaning, its first clause (up to the first '; ', ': ' or '. ' outside brackets):
    what an error message has room for."""
    depth = 0
    for i, char in enumerate(doc):
        depth += (char in "([") - (char in ")]")
        if depth == 0 and doc[i:i + 2] in ("; ", ": ", ". "):
            return doc[:i]
    return doc


def validate_value(key: str, value: Any, allowed: Allowed, hint: Any, doc: str) -> None:
    """UserError unless ``value`` is one that ``key`` accepts: NaN and infinities never are."""
    if allowed.elsewhere or (value is None and accepts_null(hint)):
        return
    finite = not isinstance(value, float) or math.isfinite(value)
    if finite and allowed.accepts(value):
        return
    wanted = ("a finite number " if not finite else "") + allowed.text
    if accepts_null(hint):
        wanted += " or null"
    raise UserError(f"config key {key!r} must be {wanted} ({_summary(doc)}), got {_show(value)}")


def validate(cfg: Config) -> None:
    """What the config alone can tell: every key against the values its declaration accepts,
    then the rules between keys. The model and the engine check their own keys (``build.validate``);
    the loaders, that the clips fit in memory (``loaders.validate_training_memory``)."""
    for key, f, hint in fields_of():
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        validate_value(key, node, f.metadata["allowed"], hint, f.metadata["doc"])
    if cfg.amp and cfg.precision != "float32":
        raise UserError(f"amp (bf16 autocast) runs float32 weights; drop --amp or set precision=float32, "
                        f"got precision={cfg.precision}")
    if cfg.model.new_head and not cfg.model.weights:
        raise UserError("config key 'model.new_head' keeps the head fresh when loading "
                        "model.weights; set model.weights=PATH (or torchvision:DEFAULT) too, or "
                        "drop model.new_head")
    _validate_data(cfg.data)
    _validate_parallel(cfg)
    _validate_steps(cfg)
    _validate_mixing(cfg)


def _validate_mixing(cfg: Config) -> None:
    """MixUp and CutMix blend labels (classify only), in pairs of clips that no replica's shard
    may split."""
    a = cfg.data.augment
    on = [key for key, alpha in (("data.augment.mixup", a.mixup), ("data.augment.cutmix", a.cutmix))
          if alpha]
    if not on:
        return
    if cfg.task != "classify":
        raise UserError(f"config key {on[0]!r} blends class labels; task {cfg.task!r} has none, "
                        f"set {on[0]}=0")
    shard = cfg.data.batch_size // cfg.parallel.replicas
    if cfg.parallel.replicas > 1 and shard % 2:
        raise UserError(f"config key {on[0]!r} mixes clips in pairs, and each of "
                        f"parallel.replicas={cfg.parallel.replicas} gets {shard} (odd) of "
                        f"data.batch_size={cfg.data.batch_size}; make that share even")


def _validate_steps(cfg: Config) -> None:
    """The optimizer loop's knobs that a Sideways schedule of updates every N ticks rules out."""
    t, every_n_ticks = cfg.train, cfg.mode == "sideways" and cfg.sideways.update != "clip"
    if t.accumulate > 1 and every_n_ticks:
        raise UserError(f"config key 'train.accumulate' ({t.accumulate}) averages whole batches' "
                        f"gradients, and sideways.update={cfg.sideways.update!r} steps within a "
                        "batch; set sideways.update=clip or train.accumulate=1")
    if t.clip_grad_norm and every_n_ticks and cfg.parallel.stages > 1:
        # the global norm is summed over the stages after the batch's traffic between them
        raise UserError("config key 'train.clip_grad_norm' across parallel.stages needs "
                        f"sideways.update=clip (got {cfg.sideways.update!r}): the global norm is "
                        "summed over the stages once their batch is done; set sideways.update=clip "
                        "or parallel.stages=1")


def _validate_parallel(cfg: Config) -> None:
    p = cfg.parallel
    if isinstance(p.balance, list) and p.stages > 1 and len(p.balance) != p.stages:
        raise UserError(f"config key 'parallel.balance' must list parallel.stages={p.stages} "
                        f"module counts, each >= 1, got {p.balance}")
    if cfg.data.batch_size % p.replicas:
        raise UserError(f"data.batch_size={cfg.data.batch_size} must be a multiple of "
                        f"parallel.replicas={p.replicas}: every replica trains an equal shard")
    shard = cfg.data.batch_size // p.replicas
    if cfg.mode == "bp" and p.stages > 1 and p.bp_schedule == "1f1b" and p.microbatches < p.stages:
        raise UserError(f"parallel.bp_schedule=1f1b needs parallel.microbatches >= parallel.stages "
                        f"(every stage busy in the steady state), got {p.microbatches} < "
                        f"{p.stages}; raise parallel.microbatches or use gpipe")
    if cfg.mode == "bp" and p.stages > 1 and shard % p.microbatches:
        raise UserError(f"data.batch_size={cfg.data.batch_size} / parallel.replicas={p.replicas} "
                        f"must be a multiple of parallel.microbatches={p.microbatches} for pipelined BP")


def _validate_data(d: DataConfig) -> None:
    if d.fold != 1 and d.dataset not in MULTI_FOLD:
        raise UserError(f"config key 'data.fold' must be 1 for data.dataset={d.dataset} (it has a "
                        f"single split; only {' and '.join(MULTI_FOLD)} have folds), got {d.fold}")
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
