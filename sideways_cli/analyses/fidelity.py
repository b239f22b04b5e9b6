"""``sideways fidelity`` and ``compare --fidelity``: the batch the per-module fidelity is measured
on (``engine/fidelity.py`` measures it) and a run's trained weights to measure it at."""

from __future__ import annotations

from pathlib import Path

import torch

from sideways_cli.config import Config, from_dict
from sideways_cli.data.catalog import DatasetIndex, resolve_dataset
from sideways_cli.data.datasets import collate_clips
from sideways_cli.engine.fidelity import gradient_fidelity
from sideways_cli.engine.losses import OBJECTIVES
from sideways_cli.engine.probes import make_video
from sideways_cli.models import FrameStack
from sideways_cli.models.weights import WeightsError, load_own_state
from sideways_cli.run.build import build_network
from sideways_cli.run.loaders import eval_loader
from sideways_cli.run.rundir import RunDir
from sideways_cli.support.errors import UserError
from sideways_cli.support.runtime import configure_backends, resolve_device

FIDELITY_CLIPS = 64  # one cosine per module over this many clips: a single batch's is noisy


def fidelity_batch(cfg: Config, data: DatasetIndex, video: str = "natural",
                   clips: int = FIDELITY_CLIPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(clips, labels): up to ``clips`` validation clips (the centre clip of videos spread evenly
    over the split, so every class counts even where the split is ordered by class), built as
    ``cfg`` builds them (its clip length, frame stride and frame shuffling apply), made into
    ``video``. Videos that fail to decode are left out."""
    dataset = eval_loader(cfg, data, clips_per_video=1).loader.dataset
    picks = torch.linspace(0, len(dataset) - 1, min(clips, len(dataset))).round().long().unique()
    batch = collate_clips([dataset[i] for i in picks.tolist()])
    if "clip" not in batch:
        raise UserError(f"none of the {len(picks)} validation videos picked for fidelity could be "
                        "decoded; check the dataset's videos")
    return make_video(batch["clip"], video, seed=cfg.seed), batch["label"]


def run_fidelity(run_dir: Path, progress: bool = False) -> list[dict]:
    """Per-module fidelity at a trained run's final weights, on a batch built from its own config,
    on its device with its backend settings."""
    ckpt = RunDir(run_dir).load_checkpoint()
    cfg = from_dict(ckpt["config"], str(RunDir(run_dir).checkpoint()))
    configure_backends(cfg)
    data = resolve_dataset(cfg.data, progress=progress)
    model = build_network(cfg, len(ckpt["classes"]), pretrained=False)
    model.load_state_dict(ckpt["model"])
    model.to(resolve_device(cfg.device))
    clips, labels = fidelity_batch(cfg, data)
    return gradient_fidelity(model, clips, labels, OBJECTIVES[cfg.task], cfg.sideways.stash)


def load_run_weights(model: FrameStack, run: RunDir) -> None:
    """``model`` at ``run``'s trained weights (its last checkpoint); one UserError naming the
    first key that does not fit when the config built another network."""
    try:
        load_own_state(model, run.load_checkpoint()["model"], f"--run {run.checkpoint()}",
                       f"CONFIG must build the run's network: pass {run.config_yaml}")
    except WeightsError as exc:
        raise UserError(str(exc)) from None
