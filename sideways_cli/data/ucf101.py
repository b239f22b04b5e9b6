"""UCF101 in its official layout, read into an index `Plan`.

    <data.root>/ucf101/
      UCF-101/<Class>/v_<Class>_gNN_cNN.avi
      ucfTrainTestlist/classInd.txt              "1 ApplyEyeMakeup" ... "101 YoYo"
      ucfTrainTestlist/trainlist0{1,2,3}.txt     "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
      ucfTrainTestlist/testlist0{1,2,3}.txt      "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"

classInd.txt is the only source of label ids (id = its number - 1). Its order is the official
one, case-insensitive (ApplyEyeMakeup ... BlowDryHair, BlowingCandles ... YoYo), which Python's
sorted() of the folder names would change (it puts every capital before every small letter).
"""

from __future__ import annotations

from pathlib import Path

from sideways_cli.support.errors import UserError

from .index import Plan, require_layout

NAME = "ucf101"
VIDEOS = "UCF-101"
LISTS = "ucfTrainTestlist"
FOLDS = (1, 2, 3)


def fold_files(fold: int) -> str:
    return f"{LISTS}/trainlist0{fold}.txt and {LISTS}/testlist0{fold}.txt"


def read_class_ind(path: Path) -> list[str]:
    """Class names in label-id order, taken verbatim from classInd.txt."""
    if not path.is_file():
        raise UserError(f"{path} not found; UCF101 needs the official {LISTS}/classInd.txt")
    by_id: dict[int, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) in by_id:
            raise UserError(f"{path}:{n}: expected '<id> <ClassName>' with a new id, got {line.strip()!r}; "
                            "restore the official classInd.txt")
        by_id[int(parts[0])] = parts[1]
    if sorted(by_id) != list(range(1, len(by_id) + 1)):
        raise UserError(f"{path}: class ids must run 1..N without gaps, got {sorted(by_id)[:5]}...; "
                        "restore the official classInd.txt")
    return [by_id[i] for i in range(1, len(by_id) + 1)]


class _Files:
    """Looks list entries up among the real files: exactly first, then ignoring case.

    The official archive names the HandstandPushups class folder (and classInd) with a small
    's' but its videos v_HandStandPushups_*.avi with a capital one, and re-packaged copies
    differ in which spelling the lists use; the case-insensitive fallback finds the file
    whichever way round it is.
    """

    def __init__(self, videos: Path) -> None:
        self.videos = videos
        self.dirs = {d.name.lower(): d.name for d in videos.iterdir() if d.is_dir()}
        self._files: dict[str, dict[str, str]] = {}

    def find(self, class_dir: str, file_name: str) -> str | None:
        """The entry's path relative to the dataset dir, or None if there is no such file."""
        actual_dir = class_dir if (self.videos / class_dir).is_dir() else self.dirs.get(class_dir.lower())
        if actual_dir is None:
            return None
        if actual_dir not in self._files:
            self._files[actual_dir] = {f.name.lower(): f.name for f in (self.videos / actual_dir).iterdir()}
        if (self.videos / actual_dir / file_name).is_file():
            actual = file_name
        else:
            actual = self._files[actual_dir].get(file_name.lower())
        return None if actual is None else f"{VIDEOS}/{actual_dir}/{actual}"


def _read_list(path: Path, labelled: bool, class_ids: dict[str, int], files: _Files,
               missing: dict[str, str]) -> list[tuple[str, int]]:
    items = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        class_dir, slash, file_name = parts[0].partition("/")
        if not slash or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise UserError(f"{path}:{n}: expected '<Class>/<video>.avi{' <id>' if labelled else ''}', "
                            f"got {line.strip()!r}; restore the official {LISTS}/{path.name}")
        label = class_ids.get(class_dir.lower())
        if label is None:
            raise UserError(f"{path}:{n}: class {class_dir!r} is not in classInd.txt; restore the "
                            f"official {LISTS}/")
        # Test lists carry no id; train lists do, and must agree with classInd.
        if len(parts) == 2 and int(parts[1]) - 1 != label:
            raise UserError(f"{path}:{n}: id {parts[1]} contradicts classInd.txt, where "
                            f"{class_dir} is {label + 1}; restore the official {LISTS}/")
        found = files.find(class_dir, file_name)
        if found is None:
            found = f"{VIDEOS}/{parts[0]}"
            missing[found] = f"missing: listed in {LISTS}/{path.name} but not found"
        items.append((found, label))
    return items


def plan(dataset_dir: Path) -> Plan:
    require_layout(dataset_dir, NAME, {VIDEOS: "<Class>/*.avi", LISTS: "classInd.txt and the lists"})
    videos, lists = dataset_dir / VIDEOS, dataset_dir / LISTS
    classes = read_class_ind(lists / "classInd.txt")
    class_ids = {name.lower(): i for i, name in enumerate(classes)}
    files, missing = _Files(videos), {}
    splits = {}
    for fold in FOLDS:
        train, test = lists / f"trainlist0{fold}.txt", lists / f"testlist0{fold}.txt"
        if train.is_file() and test.is_file():  # a fold is usable when both of its lists are there
            splits[f"train_fold{fold}"] = _read_list(train, True, class_ids, files, missing)
            splits[f"val_fold{fold}"] = _read_list(test, False, class_ids, files, missing)
    if not splits:
        raise UserError(f"{lists} has no trainlist0N.txt / testlist0N.txt pair; restore the official "
                        f"{LISTS}/")
    return Plan(NAME, classes, splits, missing)
