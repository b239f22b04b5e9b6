"""From ``data.*`` config to the videos of each split and the label map.

`synthetic` is generated on first use (synthetic.py). The real datasets (`ucf101`, `hmdb51`,
`list`, `folder`) are indexed on first use (index.py): each video probed once, unreadable ones
reported in the index's bad_files.csv and left out of the splits. data/README.md has the layouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from sideways_cli.config import DATASETS, DataConfig, ListConfig
from sideways_cli.data import hmdb51, lists, ucf101
from sideways_cli.data.datasets import VideoEntry, clip_span, read_index, read_labels
from sideways_cli.data.index import Index, Plan, ensure_index
from sideways_cli.data.synthetic import ensure_synthetic
from sideways_cli.support.errors import UserError

_console = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class DatasetIndex:
    root: Path  # the dataset dir: index paths are relative to it
    classes: list[str]
    train: list[VideoEntry]
    val: list[VideoEntry]
    # per split ("train", "val"): videos the split lists, and how many of them are unreadable
    # (left out of train/val above); the run-time guard counts its failures on top of these
    listed: dict[str, int] = field(default_factory=dict)
    bad: dict[str, int] = field(default_factory=dict)
    bad_files: Path | None = None  # the indexing report, for error messages
    # per split: videos shorter than one clip of this run, padded by repeating their last frame
    # (counted here, not in the index: it depends on data.clip_len and data.frame_stride)
    short: dict[str, int] = field(default_factory=dict)

    def split(self, name: str) -> list[VideoEntry]:
        """The videos of split ``name`` ("train" or "val")."""
        return self.train if name == "train" else self.val


def _locate(name: str, root: Path, list_cfg: ListConfig | None) -> tuple[Path, Path, Plan]:
    """(dataset dir, index dir, plan) of a real dataset."""
    if name in ("ucf101", "hmdb51"):
        module = ucf101 if name == "ucf101" else hmdb51
        dataset_dir = root / name
        return dataset_dir, dataset_dir / "index", module.plan(dataset_dir)
    if name == "folder":
        return root, root / "index", lists.plan_folder(root)
    if name == "list":
        if list_cfg is None:
            raise UserError("the list dataset needs data.list.train, data.list.val and data.list.labels")
        return root, lists.list_index_dir(list_cfg, root), lists.plan_list(list_cfg, root)
    raise UserError(f"config key 'data.dataset' must be one of {', '.join(DATASETS)}, got {name!r}")


def index_dataset(name: str, root: Path, progress: bool = True, lists_cfg: ListConfig | None = None) -> Path:
    """Index a real dataset under `root` (data.root) now, if it is not already; return its
    dataset dir. `sideways download` calls this after extracting an archive."""
    dataset_dir, index_dir, plan = _locate(name, Path(root), lists_cfg)
    index = ensure_index(plan, dataset_dir, index_dir, progress)
    if progress:
        bad = index.bad_total
        note = f", {bad} missing or unreadable (listed in {index.bad_files})" if bad else ""
        _console.print(f"{name}: indexed {len(plan.videos())} videos into {index_dir}{note}")
    return dataset_dir


def resolve_dataset(cfg: DataConfig, progress: bool = True) -> DatasetIndex:
    if cfg.dataset not in DATASETS:
        raise UserError(f"config key 'data.dataset' must be one of {', '.join(DATASETS)}, "
                        f"got {cfg.dataset!r}")
    data = _synthetic(cfg, progress) if cfg.dataset == "synthetic" else _real(cfg, progress)
    data.short = {s: short_videos(data.split(s), cfg.clip_len, cfg.frame_stride) for s in ("train", "val")}
    if progress:
        _announce(cfg, data)
    return data


def _real(cfg: DataConfig, progress: bool) -> DatasetIndex:
    dataset_dir, index_dir, plan = _locate(cfg.dataset, Path(cfg.root), cfg.list)
    index = ensure_index(plan, dataset_dir, index_dir, progress)
    data = DatasetIndex(root=dataset_dir, classes=read_labels(index.labels), train=[], val=[],
                        bad_files=index.bad_files)
    for split in ("train", "val"):
        name = f"{split}_fold{cfg.fold}"
        if name not in index.splits:
            module = ucf101 if cfg.dataset == "ucf101" else hmdb51
            raise UserError(f"data.fold={cfg.fold}: {dataset_dir} has no split files for fold "
                            f"{cfg.fold} ({module.fold_files(cfg.fold)}); restore them or choose "
                            "another data.fold")
        counts = index.splits[name]
        _check_bad_fraction(cfg, name, counts.listed, counts.bad, index)
        setattr(data, split, read_index(counts.entries_csv, root=dataset_dir))
        data.listed[split], data.bad[split] = counts.listed, counts.bad
    return data


def _check_bad_fraction(cfg: DataConfig, split: str, listed: int, bad: int, index: Index) -> None:
    if listed == 0:
        raise UserError(f"{cfg.dataset} split {split} lists no videos; check the split files "
                        f"(its index is {index.dir})")
    if bad > cfg.max_bad_fraction * listed or bad == listed:
        raise UserError(f"{bad} of the {listed} videos of {cfg.dataset} {split} are missing or "
                        f"unreadable, more than data.max_bad_fraction={cfg.max_bad_fraction:g}; "
                        f"see {index.bad_files}; repair or re-download them, or raise "
                        "data.max_bad_fraction")


def _announce(cfg: DataConfig, data: DatasetIndex) -> None:
    bad = sum(data.bad.values())
    if bad:
        _console.print(f"{cfg.dataset} fold {cfg.fold}: skipped {bad} unreadable videos (train "
                       f"{data.bad['train']}, val {data.bad['val']}); they are listed in {data.bad_files}")
    if any(data.short.values()):
        _console.print(f"{cfg.dataset}: {data.short['train']} train and {data.short['val']} val videos "
                       f"are shorter than a clip ({clip_span(cfg.clip_len, cfg.frame_stride)} frames) and are padded with their last frame")


def _synthetic(cfg: DataConfig, progress: bool) -> DatasetIndex:
    syn = cfg.synthetic
    root = ensure_synthetic(Path(cfg.root), train_per_class=syn.train_per_class,
                            val_per_class=syn.val_per_class, num_frames=syn.num_frames,
                            size=cfg.size, seed=syn.seed, progress=progress)
    train, val = read_index(root / "train.csv"), read_index(root / "val.csv")
    return DatasetIndex(root=root, classes=read_labels(root / "labels.txt"), train=train, val=val,
                        listed={"train": len(train), "val": len(val)}, bad={"train": 0, "val": 0})


def short_videos(entries: list[VideoEntry], clip_len: int, frame_stride: int) -> int:
    """How many videos are shorter than one clip (and so padded with their last frame)."""
    span = clip_span(clip_len, frame_stride)
    return sum(e.num_frames < span for e in entries)
