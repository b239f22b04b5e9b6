"""HMDB51 in its official layout, read into an index `Plan`.

    <data.root>/hmdb51/
      videos/<class>/<video>.avi
      testTrainMulti_7030_splits/<class>_test_split{1,2,3}.txt    "<video file name> <code>"

Code 1 puts the video in the training split, 2 in the test split (our val), 0 in neither.
Label ids follow the sorted class names (all lower case, so sorted() is the usual order).
"""

from __future__ import annotations

import re
from pathlib import Path

from sideways_cli.support.errors import UserError

from .index import Plan, require_layout

NAME = "hmdb51"
VIDEOS = "videos"
SPLITS = "testTrainMulti_7030_splits"
FOLDS = (1, 2, 3)
_SPLIT_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<fold>[123])\.txt$")


def fold_files(fold: int) -> str:
    return f"{SPLITS}/<class>_test_split{fold}.txt"


def plan(dataset_dir: Path) -> Plan:
    require_layout(dataset_dir, NAME, {VIDEOS: "<class>/*.avi", SPLITS: "<class>_test_split<N>.txt"})
    split_dir = dataset_dir / SPLITS
    split_files = {}
    for path in split_dir.iterdir():
        match = _SPLIT_FILE.match(path.name)
        if match:
            split_files[match["cls"], int(match["fold"])] = path
    classes = sorted({cls for cls, _ in split_files})
    if not classes:
        raise UserError(f"{split_dir} has no <class>_test_split<N>.txt files; restore the official {SPLITS}/")
    splits, missing = {}, {}
    for fold in FOLDS:
        have = [cls for cls in classes if (cls, fold) in split_files]
        if not have:
            continue
        if len(have) < len(classes):
            absent = next(cls for cls in classes if (cls, fold) not in split_files)
            raise UserError(f"{split_dir / f'{absent}_test_split{fold}.txt'} not found, though other "
                            f"classes have fold {fold}; restore the official {SPLITS}/")
        train, val = [], []
        for label, cls in enumerate(classes):
            path = split_files[cls, fold]
            for n, line in enumerate(path.read_text().splitlines(), start=1):
                parts = line.strip().rsplit(maxsplit=1)  # a file name may hold spaces
                if not parts:
                    continue
                if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                    raise UserError(f"{path}:{n}: expected '<video file name> <0|1|2>', got "
                                    f"{line.strip()!r}; restore the official {SPLITS}/")
                if parts[1] == "0":  # in neither split of this fold
                    continue
                rel = f"{VIDEOS}/{cls}/{parts[0]}"
                if not (dataset_dir / rel).is_file():
                    missing[rel] = f"missing: listed in {SPLITS}/{path.name} but not found"
                (train if parts[1] == "1" else val).append((rel, label))
        splits[f"train_fold{fold}"], splits[f"val_fold{fold}"] = train, val
    return Plan(NAME, classes, splits, missing)
