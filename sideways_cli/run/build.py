"""From a config to the objects a run trains with: the network, its optimizer and schedule, the rule.

Also the checks that belong to those layers (a model that exists at that depth, the engine's
settings), which ``config.py`` cannot make without importing them: :func:`validate` runs them, and
:func:`resolve_config` loads a config and checks it whole.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from sideways_cli.config import Config, TrainConfig, load_config
from sideways_cli.data.decode import decord_module, torchcodec_decoders
from sideways_cli.engine import make_rule
from sideways_cli.engine.clock import BETWEEN_CLIPS, parse_update
from sideways_cli.engine.losses import Objective, objective
from sideways_cli.engine.rule import GradientRule
from sideways_cli.models import FULL_DEPTH, MODELS, RECONSTRUCTORS, FrameStack, build_model
from sideways_cli.models.torchvision_nets import (
    WITHOUT_BATCHNORM,
    TorchvisionError,
    arch_of,
    build_torchvision,
    is_torchvision,
    named_weights,
    refuse_reserved_args,
)
from sideways_cli.models.user import (
    BuilderError,
    absolute,
    build_user_model,
    is_user_builder,
    load_builder,
    validate_outputs,
)
from sideways_cli.models.weights import (
    WeightsError,
    WeightsSource,
    fetch_torchvision_weights,
    load_weights,
    read_state_dict,
)
from sideways_cli.run.evaluations import monitored
from sideways_cli.support.errors import UserError
from sideways_cli.support.runtime import Autocast

IMAGE_CHANNELS = 3
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def validate(cfg: Config) -> None:
    """What only the model zoo and the engine can tell: the model exists for the task and has the
    asked depth; the Sideways settings parse. UserError naming the key and the fix."""
    if is_torchvision(cfg.model.name):
        _validate_torchvision_model(cfg)
    elif is_user_builder(cfg.model.name):
        _validate_user_model(cfg)
    else:
        _validate_zoo_model(cfg)
    if cfg.data.decoder == "decord" and decord_module() is None:
        raise UserError("config key 'data.decoder' is decord, which is not installed here (it has "
                        "no wheels for this platform); set data.decoder=auto or pyav")
    if cfg.data.decoder == "torchcodec-cuda":
        _validate_cuda_decoding(cfg)
    if cfg.data.decoder.startswith("torchcodec") and torchcodec_decoders() is None:
        raise UserError("config key 'data.decoder' is torchcodec, which is not installed here or "
                        "cannot load FFmpeg's libraries (pip install 'sideways-cli[torchcodec]' and "
                        "FFmpeg 4 to 8); set data.decoder=auto or pyav")
    monitored(cfg)  # a metric the run reports
    if cfg.train.min_lr >= cfg.train.lr:
        raise UserError(f"config key 'train.min_lr' ({cfg.train.min_lr}) must be below train.lr "
                        f"({cfg.train.lr}): it is where the learning rate decays to")
    if cfg.train.fidelity_every and cfg.parallel.stages > 1:
        raise UserError("config key 'train.fidelity_every' measures the whole network in one "
                        "process; set parallel.stages=1 (replicas may stay) or train.fidelity_every=0")
    if cfg.model.weights:
        _validate_weights(cfg)
    if cfg.sideways.between_clips not in BETWEEN_CLIPS:
        raise UserError(f"config key 'sideways.between_clips' must be one of {', '.join(BETWEEN_CLIPS)}, "
                        f"got {cfg.sideways.between_clips!r}")
    try:
        parse_update(cfg.sideways.update)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _validate_weights(cfg: Config) -> None:
    """A file exists; torchvision's weights by name are the model's, and a model.norm keeps
    their BatchNorm statistics. Nothing is downloaded here: build_network fetches them."""
    if not is_torchvision(cfg.model.weights):
        if not Path(cfg.model.weights).is_file():
            raise UserError(f"config key 'model.weights': no file {cfg.model.weights}; give a state "
                            "dict saved with torch.save (a relative path is from the working "
                            "directory) or torchvision's weights by name (torchvision:DEFAULT)")
        return
    try:
        named_weights(cfg.model.weights, cfg.model.name)
    except TorchvisionError as exc:
        raise UserError(str(exc)) from None
    # refused now rather than after a download: model.norm: group has no place for the statistics
    if cfg.model.norm == "group" and arch_of(cfg.model.name) not in WITHOUT_BATCHNORM:
        raise UserError(f"config key 'model.norm' is group, which replaces BatchNorm and has no "
                        f"place for the BatchNorm statistics {cfg.model.weights} holds; set "
                        "model.norm=frozen to keep them")


def _validate_cuda_decoding(cfg: Config) -> None:
    """Decoding on the GPU: the run's device is one, and the decoding runs in the training
    process (a loader worker is a forked process, where CUDA cannot be used)."""
    if cfg.device == "cpu" or not torch.cuda.is_available():
        raise UserError("config key 'data.decoder' is torchcodec-cuda, which decodes on the GPU the "
                        "run trains on, and this run trains on the CPU; set data.decoder=torchcodec "
                        "(or auto), or train on a CUDA device")
    if cfg.data.num_workers:
        raise UserError("config key 'data.decoder' is torchcodec-cuda, which decodes in the training "
                        "process (CUDA cannot be used in loader workers); set data.num_workers=0")


def _validate_user_model(cfg: Config) -> None:
    """A user's builder is imported now, so a wrong path fails before any data is touched. The
    zoo's keys (model.width, depth, temporal_kernel, dropout) are not its: a preset's stay unused,
    and the builder's own options come from model.args."""
    try:
        cfg.model.name = absolute(cfg.model.name)
        load_builder(cfg.model.name)
    except BuilderError as exc:
        raise UserError(str(exc)) from None


def _validate_torchvision_model(cfg: Config) -> None:
    """Only the name and the task: the network itself is built (seconds, for the largest) when
    the run needs it. model.width, depth and temporal_kernel are not its keys, as for a builder."""
    try:
        arch_of(cfg.model.name)
    except TorchvisionError as exc:
        raise UserError(str(exc)) from None
    if cfg.task == "reconstruct":
        raise UserError(f"task 'reconstruct' needs model.name {', '.join(RECONSTRUCTORS)} or a "
                        f"builder of your own; {cfg.model.name} is a classifier")
    try:
        refuse_reserved_args(cfg.model.name, cfg.model.args)
    except TorchvisionError as exc:
        raise UserError(str(exc)) from None


def _validate_zoo_model(cfg: Config) -> None:
    if cfg.model.name not in MODELS:
        raise UserError(f"config key 'model.name' must be one of {', '.join(MODELS)}, "
                        "'torchvision:<arch>' (e.g. torchvision:resnet18), or a builder of your "
                        f"own ('package.module:function', 'path/to/file.py'), got {cfg.model.name!r}")
    if cfg.model.args:
        raise UserError(f"config key 'model.args' is for a builder of your own; {cfg.model.name} "
                        "takes model.width, model.depth, model.temporal_kernel, model.dropout")
    if (cfg.task == "reconstruct") != (cfg.model.name in RECONSTRUCTORS):
        wanted = ", ".join(RECONSTRUCTORS) if cfg.task == "reconstruct" else \
            ", ".join(m for m in MODELS if m not in RECONSTRUCTORS)
        raise UserError(f"task {cfg.task!r} needs model.name {wanted}, got {cfg.model.name!r} "
                        "(experiments/reconstruct.yaml is the reconstruction preset)")
    full = FULL_DEPTH[cfg.model.name]
    if cfg.model.depth is not None and not 1 <= cfg.model.depth <= full:
        raise UserError(f"config key 'model.depth' must be between 1 and {full} for "
                        f"{cfg.model.name}, got {cfg.model.depth}")


def resolve_config(path: Path | None, overrides: list[str] | None = None) -> Config:
    """:func:`config.load_config`, then :func:`check`: a config every layer accepts."""
    cfg = load_config(path, overrides)
    validate(cfg)
    return cfg


def build_network(cfg: Config, num_classes: int, pretrained: bool = True) -> FrameStack:
    """The model, initialised from ``cfg.seed`` so every mode of a comparison starts equal, then
    from ``model.weights`` if set and ``pretrained`` (False: a checkpoint's weights replace them
    at once, so the file need not exist any more, nor torchvision's weights be fetched); a
    reconstructor's outputs are the frames' channels, a classifier's the classes."""
    torch.manual_seed(cfg.seed)
    outputs = IMAGE_CHANNELS if cfg.task == "reconstruct" else num_classes
    if is_torchvision(cfg.model.name):
        model = _build_torchvision_network(cfg, outputs)
    elif is_user_builder(cfg.model.name):
        model = _build_user_network(cfg, outputs)
    else:
        model = _build_zoo_network(cfg, outputs)
    if cfg.model.weights and pretrained:
        try:
            load_weights(model, _weights_source(cfg), cfg.model.new_head)
        except (WeightsError, TorchvisionError) as exc:
            raise UserError(str(exc)) from None
    # initialised in float32 whatever the precision, so a float64 run starts from the same weights
    return model.to(DTYPES[cfg.precision])


def fetch_named_weights(cfg: Config) -> None:
    """torchvision's weights that ``model.weights`` names, into torch.hub's cache if not there
    yet (a job's first process, before the others read them from it)."""
    if cfg.model.weights and is_torchvision(cfg.model.weights):
        try:
            _weights_source(cfg)
        except (WeightsError, TorchvisionError) as exc:
            raise UserError(str(exc)) from None


def _weights_source(cfg: Config) -> WeightsSource:
    """``model.weights``' state dict: its file, or torchvision's weights by name from torch.hub's
    cache (downloaded into it if absent, with a progress bar where someone watches)."""
    if is_torchvision(cfg.model.weights):
        weights = named_weights(cfg.model.weights, cfg.model.name)
        return fetch_torchvision_weights(weights, cfg.model.weights, progress=sys.stderr.isatty())
    return read_state_dict(Path(cfg.model.weights))


def _build_zoo_network(cfg: Config, outputs: int) -> FrameStack:
    options: dict = {"temporal_kernel": cfg.model.temporal_kernel, "dropout": cfg.model.dropout}
    if cfg.model.width is not None:
        options["width"] = cfg.model.width
    if cfg.model.depth is not None:  # a classifier's layers below the head, an encoder's levels
        options["levels" if cfg.task == "reconstruct" else "depth"] = cfg.model.depth
    return build_model(cfg.model.name, outputs, **options)


def _build_torchvision_network(cfg: Config, outputs: int) -> FrameStack:
    try:
        return build_torchvision(cfg.model.name, outputs, cfg.model.norm, cfg.model.args)
    except TorchvisionError as exc:
        raise UserError(str(exc)) from None


def _build_user_network(cfg: Config, outputs: int) -> FrameStack:
    reconstruct = cfg.task == "reconstruct"
    try:
        model = build_user_model(cfg.model.name, outputs, cfg.model.args)
        validate_outputs(cfg.model.name, model, outputs, cfg.data.size, reconstruct)
    except BuilderError as exc:
        raise UserError(str(exc)) from None
    return model


def parameter_groups(cfg: TrainConfig, model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """``model``'s parameters as the optimizer groups them, each group in the model's order: one
    group, or with ``train.decay_norms_and_biases`` false the decayed (weights of two or more
    dimensions) then the undecayed ones (biases, normalisation scales and shifts)."""
    params = list(model.parameters())
    if cfg.decay_norms_and_biases:
        return [params]
    return [[p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]]


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    decays = [cfg.weight_decay, 0.0]
    groups = [{"params": params, "weight_decay": decay}
              for params, decay in zip(parameter_groups(cfg, model), decays)]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def make_lr_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to ``train.lr``, then constant, cosine decay to ``train.min_lr`` at
    ``train.steps``, or ``train.lr_gamma`` times lower every ``train.lr_step_size`` steps (step)
    or from each of ``train.lr_milestones`` on (multistep), never below ``train.min_lr``. Steps
    are the run's, the warm-up's included; step s + 1 of the run trains with factor(s)."""
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.lr_schedule == "step":  # after every lr_step_size steps
            decays = step // cfg.lr_step_size
        else:  # multistep: the run's step s + 1 is at or past these milestones
            decays = sum(step + 1 >= milestone for milestone in cfg.lr_milestones)
        return max(floor, cfg.lr_gamma ** decays)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def objective_of(cfg: Config) -> Objective:
    """What the run's every frame is trained to match, and how (``train.label_smoothing``)."""
    return objective(cfg.task, cfg.train.label_smoothing)


def rule_for(cfg: Config, model: FrameStack, autocast: Autocast) -> GradientRule:
    """The training rule ``cfg`` asks for over the whole ``model`` in this process."""
    return make_rule(cfg.mode, model, cfg.sideways.between_clips, cfg.sideways.update,
                     cfg.sideways.chunk, objective_of(cfg), autocast, cfg.sideways.stash)
