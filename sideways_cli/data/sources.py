"""Where the real datasets come from: the official archives and what each extracts to.

Neither UCF101 nor HMDB51 publishes a checksum or an exact byte size, so ``sha256`` and ``size``
are None here. The first verified download records what it observed
(``<root>/<dataset>/downloads/<file>.sha256``) and every later run is checked against that record.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    file: str  # the archive's file name; with --mirror it is fetched from <mirror>/<file>
    url: str  # the official address
    target: str  # the folder it becomes under <root>/<dataset>/
    top: str | None = None  # the archive's single top-level folder, renamed to `target`
    nested: bool = False  # the archive holds one inner archive per class, each extracted too
    sha256: str | None = None  # published checksum, if any
    size: int | None = None  # published size in bytes, if any

    def resolve_url(self, mirror: str | None) -> str:
        return f"{mirror.rstrip('/')}/{self.file}" if mirror else self.url


_UCF = "https://www.crcv.ucf.edu/data/UCF101/"
_HMDB = "http://serre-lab.clps.brown.edu/wp-content/uploads/2013/10/"

SOURCES: dict[str, tuple[Source, ...]] = {
    "ucf101": (
        # UCF-101/<Class>/v_<Class>_gXX_cYY.avi
        Source("UCF101.rar", _UCF + "UCF101.rar", target="UCF-101", top="UCF-101"),
        # ucfTrainTestlist/{classInd,trainlist0[1-3],testlist0[1-3]}.txt
        Source("UCF101TrainTestSplits-RecognitionTask.zip",
               _UCF + "UCF101TrainTestSplits-RecognitionTask.zip",
               target="ucfTrainTestlist", top="ucfTrainTestlist"),
    ),
    "hmdb51": (
        # <class>.rar for each of the 51 classes, each holding <class>/*.avi
        Source("hmdb51_org.rar", _HMDB + "hmdb51_org.rar", target="videos", nested=True),
        # testTrainMulti_7030_splits/<class>_test_split[1-3].txt
        Source("test_train_splits.rar", _HMDB + "test_train_splits.rar",
               target="testTrainMulti_7030_splits", top="testTrainMulti_7030_splits"),
    ),
}
