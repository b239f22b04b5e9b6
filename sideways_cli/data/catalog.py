"""From ``data.*`` config to the videos of each split and the label map."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sideways_cli.config import DataConfig
from sideways_cli.data.datasets import VideoEntry, read_index, read_labels
from sideways_cli.data.synthetic import ensure_synthetic
from sideways_cli.errors import UserError

DATASETS = ("synthetic",)


@dataclass
class DatasetIndex:
    root: Path
    classes: list[str]
    train: list[VideoEntry]
    val: list[VideoEntry]


def resolve_dataset(cfg: DataConfig, progress: bool = True) -> DatasetIndex:
    if cfg.dataset != "synthetic":
        raise UserError(f"config key 'data.dataset' must be one of {', '.join(DATASETS)}, "
                        f"got {cfg.dataset!r}")
    syn = cfg.synthetic
    root = ensure_synthetic(Path(cfg.root), train_per_class=syn.train_per_class,
                            val_per_class=syn.val_per_class, num_frames=syn.num_frames,
                            size=cfg.size, seed=syn.seed, progress=progress)
    return DatasetIndex(root=root, classes=read_labels(root / "labels.txt"),
                        train=read_index(root / "train.csv"), val=read_index(root / "val.csv"))
