"""``sideways download``: fetch, verify and extract a dataset into its folder under the data root.

    <root>/ucf101/  downloads/  UCF-101/<Class>/v_*.avi  ucfTrainTestlist/
    <root>/hmdb51/  downloads/  videos/<class>/*.avi     testTrainMulti_7030_splits/

Every step is idempotent: a verified archive is not fetched again and an extracted one (marker
``.<folder>.extracted``) is not extracted again, so re-running after an interruption only does
what is left.
"""

from __future__ import annotations

from pathlib import Path

from sideways_cli.config import DataConfig, SyntheticConfig
from sideways_cli.data import synthetic
from sideways_cli.data.extract import extract_once
from sideways_cli.data.fetch import ensure_file
from sideways_cli.data.sources import SOURCES, Source
from sideways_cli.support.errors import UserError

DOWNLOADABLE = ("ucf101", "hmdb51", "synthetic")


def download_dataset(name: str, root: Path, mirror: str | None = None, progress: bool = True) -> Path:
    """Make dataset ``name`` complete under ``root`` and return its folder."""
    if name == "synthetic":
        return _synthetic(root, progress)
    if name not in SOURCES:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DOWNLOADABLE)}")
    folder = Path(root) / name
    for source in SOURCES[name]:
        fetch_source(source, folder / "downloads", mirror, progress)
    for source in SOURCES[name]:
        extract_once(folder / "downloads" / source.file, folder, source.target, top=source.top,
                     nested=source.nested, progress=progress)
    return folder


def fetch_source(source: Source, downloads: Path, mirror: str | None, progress: bool) -> Path:
    return ensure_file(source.resolve_url(mirror), downloads / source.file, sha256=source.sha256,
                       size=source.size, progress=progress)


def _synthetic(root: Path, progress: bool) -> Path:
    # the same defaults a config without data.* keys uses, so training finds this copy
    syn = SyntheticConfig()
    return synthetic.ensure_synthetic(Path(root), train_per_class=syn.train_per_class,
                            val_per_class=syn.val_per_class, num_frames=syn.num_frames,
                            size=DataConfig().size, seed=syn.seed, progress=progress)
