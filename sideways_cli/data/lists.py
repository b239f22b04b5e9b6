"""Your own videos, as `list` files or as one `folder` per class, read into an index `Plan`.

`list`: data.list.train / val are text files of `relative/path label` lines (paths relative to
data.root; label = the class's 0-based line number in data.list.labels, or its name), and
data.list.labels has one class name per line: the label-id order is that file's.

`folder`: <data.root>/{train,val}/<class>/<video>; label ids follow the sorted names of the
class folders under train/ (Python's sorted(): capitals before small letters). A class folder
under train/ without videos is refused (it would be a class nothing teaches); one under val/ may
be empty or absent (that class is then not evaluated).

Neither has folds: their splits are train_fold1 and val_fold1.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from sideways_cli.config import ListConfig
from sideways_cli.support.errors import UserError

from .index import VIDEO_SUFFIXES, Plan


def _find_list_file(key: str, value: str, root: Path) -> Path:
    # A relative list path is looked up where the command runs, then under data.root.
    for candidate in (Path(value), root / value):
        if candidate.is_file():
            return candidate.resolve()
    raise UserError(f"config key 'data.list.{key}': {value} not found (looked in the current "
                    f"directory and under {root}); point it at an existing text file")


def list_files(cfg: ListConfig, root: Path) -> dict[str, Path]:
    return {key: _find_list_file(key, getattr(cfg, key), root) for key in ("train", "val", "labels")}


def list_index_dir(cfg: ListConfig, root: Path) -> Path:
    """One index per set of list files, so several list datasets can share one data.root."""
    files = list_files(cfg, root)
    key = "\n".join(str(files[k]) for k in ("train", "val", "labels"))
    return root / f"index-list-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _read_labels(path: Path) -> list[str]:
    classes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if not classes or duplicates:
        what = f"repeats {', '.join(duplicates)}" if duplicates else "is empty"
        raise UserError(f"{path} {what}; it must hold one distinct class name per line")
    return classes


def _read_list(path: Path, root: Path, classes: list[str], missing: dict[str, str]) -> list[tuple[str, int]]:
    ids = {name: i for i, name in enumerate(classes)}
    items = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)  # the path may hold spaces, the label cannot
        label = None
        if len(parts) == 2:
            label = int(parts[1]) if parts[1].isdigit() else ids.get(parts[1])
        if label is None or not 0 <= label < len(classes):
            raise UserError(f"{path}:{n}: expected 'relative/path label' with a label in "
                            f"0..{len(classes) - 1} or a class name from the labels file, got "
                            f"{line.strip()!r}")
        if not (root / parts[0]).is_file():
            missing[parts[0]] = f"missing: listed in {path.name} but not found under {root}"
        items.append((parts[0], label))
    return items


def plan_list(cfg: ListConfig, root: Path) -> Plan:
    files = list_files(cfg, root)
    classes = _read_labels(files["labels"])
    missing: dict[str, str] = {}
    splits = {f"{split}_fold1": _read_list(files[split], root, classes, missing)
              for split in ("train", "val")}
    return Plan("list", classes, splits, missing)


def _videos(class_dir: Path) -> list[Path]:
    return sorted(f for f in class_dir.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def plan_folder(root: Path) -> Plan:
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"{root / split} not found: data.dataset=folder needs "
                            f"{root}/train/<class>/<video> and {root}/val/<class>/<video>")
    classes = _class_dirs(root / "train")
    if not classes:
        raise UserError(f"{root / 'train'} has no class folders; put each class's videos in "
                        f"{root}/train/<class>/")
    unknown = [c for c in _class_dirs(root / "val") if c not in classes]
    if unknown:
        raise UserError(f"{root / 'val' / unknown[0]} is not a class of {root / 'train'}; every "
                        "val class folder needs a train class folder of the same name")
    empty = [c for c in classes if not _videos(root / "train" / c)]
    if empty:  # it would be a class no training video teaches
        raise UserError(f"{root / 'train' / empty[0]} holds no videos "
                        f"({', '.join(sorted(VIDEO_SUFFIXES))}); put the class's training videos "
                        "there, or remove the folder")
    splits = {}
    for split in ("train", "val"):
        splits[f"{split}_fold1"] = [
            (f.relative_to(root).as_posix(), label)
            for label, cls in enumerate(classes)
            if (root / split / cls).is_dir()
            for f in _videos(root / split / cls)
        ]
    return Plan("folder", classes, splits)
