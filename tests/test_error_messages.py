"""User mistakes, one table, chiefly those whose message no other test triggers: each is refused
with its own message, as one line and no traceback (exit 2 from the command line), before any
training or data generation.

CLI rows run ``sideways ARGS`` through the entry point in this process, from an empty working
directory (a refusal that failed to happen would write there, not into the checkout). Rows that
only a layer below the command line can reach (a dataset's files, a run directory's, the devices)
call that layer and expect its UserError.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import pytest
import torch

from cli_helpers import run_main
from sideways_cli.config import Config, DataConfig, load_config, save_config, to_dict
from sideways_cli.data import catalog, extract, hmdb51, lists, ucf101
from sideways_cli.data.catalog import DatasetIndex
from sideways_cli.data.datasets import VideoEntry
from sideways_cli.data.download import download_dataset
from sideways_cli.data.fetch import Record, ensure_file
from sideways_cli.data.index import require_layout
from sideways_cli.parallel.balance import resolve_balance
from sideways_cli.parallel.topology import job_backend, stage_device
from sideways_cli.run import build, loaders
from sideways_cli.run.resume import find_previous_run
from sideways_cli.run.rundir import LineLog, RunDir
from sideways_cli.support import paths, runtime
from sideways_cli.support.atomic import WriteError
from sideways_cli.support.errors import UserError

# tiny tensors: one thread (OpenMP's fork and join cost more than they save on a busy machine)
pytestmark = pytest.mark.usefixtures("one_thread")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def finished_run(tmp: Path, files: dict[str, str | None]) -> Path:
    """A run directory as `sideways train` leaves it (config.yaml, summary.json), then ``files``
    (name -> text written over it, or None: removed)."""
    run = tmp / "run"
    run.mkdir()
    save_config(Config(), run / "config.yaml")
    write(run / "summary.json", json.dumps({"mode": "bp", "steps": 1}))
    for name, text in files.items():
        if text is None:
            (run / name).unlink()
        else:
            write(run / name, text)
    return run


# -- the command line: (id, ARGS given a fresh folder, the message's distinctive part) -------------

Args = Callable[[Path], list]

CLI_CASES: list[tuple[str, Args, str]] = [
    # options of the commands themselves
    ("eval --clips 0", lambda t: ["eval", t / "run", "--clips", 0], "--clips must be >= 1, got 0"),
    ("fidelity --video", lambda t: ["fidelity", "--video", "blurry"],
     "--video must be one of natural, static, shuffled, got 'blurry'"),
    ("stream --frames 1", lambda t: ["stream", "--frames", 1], "--frames must be >= 2 and --update-every >= 1"),
    ("stream --update-every 0", lambda t: ["stream", "--update-every", 0],
     "--frames must be >= 2 and --update-every >= 1"),
    ("stream a classifier", lambda t: ["stream", "--set", "task=classify", "--set", "model.name=c3d"],
     "sideways stream trains frame reconstruction: give a config with task: reconstruct"),
    ("stream --video missing", lambda t: ["stream", "--video", t / "clip.mp4"],
     "clip.mp4 does not exist; give a video file"),
    ("stream --video folder", lambda t: ["stream", "--video", t], "is a directory; give a video file"),
    ("stream --video device", lambda t: ["stream", "--video", "/dev/null"],
     "--video /dev/null is not a regular file; give a video file"),
    ("download --mirror synthetic", lambda t: ["download", "synthetic", "--mirror", "http://example.org"],
     "--mirror does not apply to synthetic, which is generated here; drop it"),
    # the config file and --set
    ("--set without =", lambda t: ["train", "--set", "train.lr"], "--set expects KEY=VALUE, got 'train.lr'"),
    ("--set a section", lambda t: ["train", "--set", "train=5"],
     "config key 'train' in --set train=5 is a section; give it a mapping"),
    ("config not YAML", lambda t: ["train", write(t / "bad.yaml", "train: [1, 2\n")], "bad.yaml is not valid YAML"),
    ("config not a mapping", lambda t: ["check", write(t / "list.yaml", "- 1\n- 2\n")],
     "list.yaml must hold a mapping of config keys"),
    ("new_head without weights", lambda t: ["train", "--set", "model.new_head=true"],
     "config key 'model.new_head' keeps the head fresh when loading model.weights"),
    ("balance of the wrong length", lambda t: ["train", "--set", "parallel.stages=2", "--set",
                                               "parallel.balance=[1, 1, 1]"],
     "config key 'parallel.balance' must list parallel.stages=2 module counts, each >= 1, got [1, 1, 1]"),
    ("batch not a multiple of replicas", lambda t: ["train", "--set", "parallel.replicas=3"],
     "data.batch_size=16 must be a multiple of parallel.replicas=3"),
    ("shard not a multiple of microbatches", lambda t: ["train", "--set", "parallel.stages=2", "--set",
                                                        "parallel.microbatches=3"],
     "data.batch_size=16 / parallel.replicas=1 must be a multiple of parallel.microbatches=3 for "
     "pipelined BP"),
    ("fold of a single-split dataset", lambda t: ["train", "--set", "data.fold=2"],
     "config key 'data.fold' must be 1 for data.dataset=synthetic"),
    ("resize below size", lambda t: ["train", "--set", "data.resize=24"],
     "config key 'data.resize' (24) must be >= data.size (32)"),
    ("flip of synthetic", lambda t: ["train", "--set", "data.flip=true"],
     "config key 'data.flip' cannot be true for the synthetic dataset"),
    ("list without its files", lambda t: ["train", "--set", "data.dataset=list", "--set",
                                          "data.list.train=train.txt"],
     "data.dataset=list needs data.list.val, data.list.labels"),
    # the model and the engine
    ("weights file missing", lambda t: ["train", "--set", f"model.weights={t / 'w.pt'}"],
     "config key 'model.weights': no file"),
    ("between_clips", lambda t: ["train", "--mode", "sideways", "--set", "sideways.between_clips=sometimes"],
     "config key 'sideways.between_clips' must be one of reset, continuous, got 'sometimes'"),
    ("model not in the zoo", lambda t: ["train", "--set", "model.name=alexnet"],
     "config key 'model.name' must be one of"),
    ("model.args of a zoo model", lambda t: ["train", "--set", "model.args.width=3"],
     "config key 'model.args' is for a builder of your own; c3d takes model.width"),
    ("torchvision arch unknown", lambda t: ["train", "--set", "model.name=torchvision:alexnet"],
     "unknown torchvision architecture"),
    ("torchvision reconstructing", lambda t: ["train", "--set", "task=reconstruct", "--set",
                                              "model.name=torchvision:resnet18"],
     "task 'reconstruct' needs model.name autoencoder or a builder of your own; "
     "torchvision:resnet18 is a classifier"),
    ("torchvision num_classes", lambda t: ["train", "--set", "model.name=torchvision:resnet18", "--set",
                                           "model.args.num_classes=3"],
     "config key 'model.args.num_classes' is not for torchvision:resnet18"),
    ("builder not importable", lambda t: ["train", "--set", "model.name=no_such_package.nets:build"],
     "model.name 'no_such_package.nets:build': importing"),
    # compare's options, refused while planning
    ("--modes twice", lambda t: ["compare", "--modes", "bp,bp", "--out", t / "c"],
     "--modes takes each of bp, sideways at most once, got 'bp,bp'"),
    ("--sweep the mode", lambda t: ["compare", "--sweep", "mode=bp,sideways", "--out", t / "c"],
     "--sweep: the mode is chosen with --modes, not --sweep"),
    ("--sweep an unknown key", lambda t: ["compare", "--sweep", "train.lrr=1,2", "--out", t / "c"],
     "--sweep: unknown config key 'train.lrr'"),
    ("--keys an unknown key", lambda t: ["compare", "--keys", "seed,trian.lr", "--out", t / "c"],
     "--keys: unknown config key 'trian.lr'"),
    ("--sweep an empty value", lambda t: ["compare", "--sweep", "train.lr=0.1,", "--out", t / "c"],
     "--sweep expects KEY=V1,V2,... with no empty value, got 'train.lr=0.1,'"),
    ("--variant without a value", lambda t: ["compare", "--variant", "train.lr", "--out", t / "c"],
     "--variant expects KEY=V[,KEY2=V2], got 'train.lr'"),
    ("--variant a key twice", lambda t: ["compare", "--variant", "train.lr=1,train.lr=2", "--out", t / "c"],
     "--variant 'train.lr=1,train.lr=2' sets a key twice"),
    ("--sweep a key twice", lambda t: ["compare", "--sweep", "train.lr=1,2", "--sweep", "train.lr=3",
                                       "--out", t / "c"],
     "--sweep names train.lr twice; give all its values in one --sweep"),
    ("--sweep and --set", lambda t: ["compare", "--sweep", "train.lr=1,2", "--set", "train.lr=3",
                                     "--out", t / "c"],
     "train.lr is both swept and fixed by --set/--seed; drop one of them"),
    ("--sweep equal values", lambda t: ["compare", "--modes", "bp", "--sweep", "train.lr=0.1,0.10",
                                        "--out", t / "c"],
     "c/bp-lr=0.1 (train.lr=0.1 and train.lr=0.10); drop the repeated value or variant"),
    ("--runs and --modes", lambda t: ["compare", "--runs", t, "--modes", "bp", "--out", t / "c"],
     "--runs compares finished runs and trains nothing; drop --modes"),
    ("--runs a run twice", lambda t: ["compare", "--runs", t, "--runs", t / ".", "--out", t / "c"],
     "--runs names a run directory twice; give each once"),
    # run directories read back
    ("--runs a file", lambda t: ["compare", "--runs", write(t / "f.txt", "x"), "--out", t / "c"],
     "f.txt is not a directory; give a run directory written by 'sideways train' or 'sideways compare'"),
    ("--runs unfinished", lambda t: ["compare", "--runs", t, "--out", t / "c"],
     "has no summary.json, so its run did not finish"),
    ("--runs without config.yaml", lambda t: ["compare", "--runs", finished_run(t, {"config.yaml": None}),
                                              "--out", t / "c"],
     "run has no config.yaml; it was not written by 'sideways train'"),
    ("--runs bad metrics", lambda t: ["compare", "--runs", finished_run(t, {"metrics.jsonl": "{}\nnot json\n"}),
                                      "--out", t / "c"],
     "metrics.jsonl:2 is not a JSON record; it was not written by 'sideways train' alone"),
    ("--runs bad evaluations", lambda t: ["compare", "--runs", finished_run(t, {"evaluations.csv": "step,val\n1,high\n"}),
                                          "--out", t / "c"],
     "evaluations.csv has a malformed row; it was not written by 'sideways train' alone"),
    ("eval a damaged checkpoint", lambda t: ["eval", finished_run(t, {"checkpoints/last.pt": "not a zip"})],
     "): it is damaged or not a checkpoint"),
]


@pytest.mark.parametrize("make_args, message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_a_mistake_on_the_command_line_is_one_line(make_args, message, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = make_args(tmp_path)
    code, err = run_main(args, monkeypatch, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list(work.iterdir())  # refused before writing anything


# -- below the command line: (id, the call given a fresh folder, the message's distinctive part) ---

def list_config(tmp: Path, labels: str = "a\nb\n", train: str = "x.mp4 0\n") -> DataConfig:
    write(tmp / "labels.txt", labels)
    write(tmp / "train.txt", train)
    write(tmp / "val.txt", "")
    return load_config(None, ["data.dataset=list", f"data.root={tmp}", "data.list.train=train.txt",
                              "data.list.val=val.txt", "data.list.labels=labels.txt"]).data


def folder_dataset(tmp: Path, *names: str) -> Path:
    """data.root of a folder dataset holding ``names``: empty files, or folders (a final /)."""
    root = tmp / "videos"
    for name in names:
        if name.endswith("/"):
            (root / name).mkdir(parents=True)
        else:
            write(root / name, "")
    return root


def ucf_lists(tmp: Path, class_ind: str = "1 ApplyEyeMakeup\n2 Archery\n", **lists_: str) -> Path:
    """A UCF101 folder with its lists (name -> text) and no videos."""
    (tmp / "ucf101" / "UCF-101").mkdir(parents=True)
    write(tmp / "ucf101" / "ucfTrainTestlist" / "classInd.txt", class_ind)
    for name, text in lists_.items():
        write(tmp / "ucf101" / "ucfTrainTestlist" / f"{name}.txt", text)
    return tmp / "ucf101"


def ucf101_fold_2_of_1(tmp: Path) -> None:
    ucf_lists(tmp, trainlist01="Archery/v.avi 2\n", testlist01="Archery/w.avi\n")
    cfg = load_config(None, ["data.dataset=ucf101", f"data.root={tmp}", "data.fold=2"])
    catalog.resolve_dataset(cfg.data, progress=False)


def hmdb_splits(tmp: Path, **splits: str) -> Path:
    (tmp / "hmdb51" / "videos").mkdir(parents=True)
    (tmp / "hmdb51" / "testTrainMulti_7030_splits").mkdir()
    for name, text in splits.items():
        write(tmp / "hmdb51" / "testTrainMulti_7030_splits" / f"{name}.txt", text)
    return tmp / "hmdb51"


def unreadable_val(tmp: Path) -> None:
    """fidelity's batch from a split whose every video is garbage."""
    from sideways_cli.analyses.fidelity import fidelity_batch

    garbage = write(tmp / "bad.mp4", "not a video" * 100)
    entries = [VideoEntry(garbage, 0, 8, 25.0)]
    cfg = load_config(None, ["data.clip_len=4", "data.num_workers=0"])
    fidelity_batch(cfg, DatasetIndex(root=tmp, classes=["a"], train=entries, val=entries))


def more_clips_than_videos(tmp: Path) -> None:
    entries = [VideoEntry(tmp / f"{i}.mp4", 0, 8, 25.0) for i in range(3)]
    cfg = load_config(None, ["data.batch_size=4", "data.num_workers=0"])
    loaders.data_loaders(cfg, DatasetIndex(root=tmp, classes=["a"], train=entries, val=entries))


def cuda_without_cuda(tmp: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runtime.resolve_device("cuda")


def amp_without_native_bf16(tmp: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    runtime.forward_autocast(torch.device("cuda", 0), amp=True)


def zip_of(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def encrypted_zip(tmp: Path) -> Path:
    """A zip whose member claims to be encrypted (bit 0 of its general-purpose flags)."""
    data = bytearray(zip_of({"a.txt": b"secret"}))
    central = data.index(b"PK\x01\x02")
    data[central + 8] |= 0x1
    return write_bytes(tmp / "enc.zip", bytes(data))


def zip_with_a_bad_crc(tmp: Path) -> Path:
    data = bytearray(zip_of({"a.txt": b"hello " * 20}))  # stored: the bytes are in the file as is
    data[data.index(b"hello") + 3] ^= 0xFF
    return write_bytes(tmp / "crc.zip", bytes(data))


def unparsed_update(tmp: Path) -> None:
    """The engine's own check of sideways.update, on a config config.py has not validated (the
    config's range is the same parser: test_config_values keeps them equal)."""
    cfg = Config()
    cfg.sideways.update = "every second tick"
    build.validate(cfg)


def _rar_block(kind: int, flags: int, body: bytes) -> bytes:
    head = struct.pack("<BHH", kind, flags, 7 + len(body)) + body
    return struct.pack("<H", zlib.crc32(head) & 0xFFFF) + head


def rar4(entries: dict[str, bytes], file_flags: int = 0, damage_header: bool = False) -> bytes:
    """A RAR 4 archive of stored files (the format of the RAR technote); ``file_flags`` is or-ed
    into every file header's flags (0x04: encrypted); ``damage_header`` breaks the last header's
    CRC."""
    out = b"Rar!\x1a\x07\x00" + _rar_block(0x73, 0, bytes(6))
    for name, data in entries.items():
        raw = name.encode()
        body = struct.pack("<IIBIIBBHI", len(data), len(data), 3, zlib.crc32(data), 0x21 << 16, 20,
                           0x30, len(raw), 0o100644) + raw
        block = _rar_block(0x74, 0x8000 | file_flags, body)
        if damage_header:
            block = bytes([block[0] ^ 0xFF]) + block[1:]
        out += block + data
    return out + _rar_block(0x7B, 0x4000, b"")


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def extracted(archive: Path, tmp: Path, **options) -> None:
    extract.extract_once(archive, tmp / "dest", "target", progress=False, **options)


def into_a_linked_folder(tmp: Path) -> None:
    """A member whose folder in the target is a link to outside it (made before extracting)."""
    (tmp / "outside").mkdir()
    (tmp / "target").mkdir()
    (tmp / "target" / "sub").symlink_to(tmp / "outside")
    extract.safe_extract(write_bytes(tmp / "a.zip", zip_of({"sub/x.txt": b"x"})), tmp / "target",
                         progress=False)


def nested_with_the_same_file_twice(tmp: Path) -> None:
    inner = zip_of({"x.txt": b"x"})
    extracted(write_bytes(tmp / "outer.zip", zip_of({"a.zip": inner, "b.zip": inner})), tmp,
              nested=True)


def rar_that_changes_while_extracting(tmp: Path, monkeypatch) -> None:
    listed = extract._Rar.members
    monkeypatch.setattr(extract._Rar, "members", lambda self: [
        extract.Member("other.txt", ("other.txt",), "file") for _ in listed(self)])
    extract.safe_extract(write_bytes(tmp / "a.rar", rar4({"a.txt": b"a"})), tmp, progress=False)


def checkpoint_without_resume_state(tmp: Path) -> None:
    cfg = load_config(None, ["device=cpu"])
    run = RunDir(tmp / "run")
    run.write_config(cfg)
    (tmp / "run" / "checkpoints").mkdir()
    torch.save({"step": 1, "config": to_dict(cfg), "model": {}}, run.checkpoint())
    find_previous_run(run, cfg, torch.device("cpu"))


def log_closed_on_a_full_disk(tmp: Path) -> None:
    log = LineLog(Path("/dev/full"))
    with pytest.raises(WriteError):  # the line stays in the buffer
        log.append("x" * 100)
    log.close()  # which a normal close then fails to write


def stage_beyond_the_gpus(tmp: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    stage_device("cuda", 3)


def json_into_an_unwritable_folder(tmp: Path, monkeypatch) -> None:
    monkeypatch.setattr(paths.os, "access", lambda path, mode: False)  # root writes everywhere
    paths.output_file(tmp / "result.json", "--json")


CALL_CASES: list[tuple[str, Callable, str]] = [
    # archives and downloads (sideways download ucf101 | hmdb51)
    ("download an unknown dataset", lambda t: download_dataset("kinetics", t, progress=False),
     "unknown dataset 'kinetics'; choose from ucf101, hmdb51, synthetic"),
    ("archive of another kind", lambda t: extract.safe_extract(write(t / "a.zip", "plain text"), t,
                                                               progress=False),
     "a.zip is neither a zip nor a rar archive; delete it and re-run"),
    ("zip damaged", lambda t: extract.safe_extract(write_bytes(t / "a.zip", b"PK\x03\x04" + bytes(40)),
                                                   t, progress=False),
     "a.zip is not a valid zip ("),
    ("zip encrypted", lambda t: extract.safe_extract(encrypted_zip(t), t, progress=False),
     "enc.zip: member 'a.txt' is encrypted; delete the archive and download it again"),
    ("zip member damaged", lambda t: extract.safe_extract(zip_with_a_bad_crc(t), t / "out", progress=False),
     "crc.zip: member 'a.txt' is damaged (Bad CRC-32"),
    ("zip without inner archives", lambda t: extracted(write_bytes(t / "a.zip", zip_of({"x.txt": b"x"})),
                                                       t, nested=True),
     "a.zip holds no inner archives; is it the right file? delete it and re-run"),
    ("zip without its top folder", lambda t: extracted(write_bytes(t / "a.zip", zip_of({"x.txt": b"x"})),
                                                       t, top="UCF-101"),
     "a.zip has no top-level folder UCF-101/; is it the right file?"),
    ("inner archives overlapping", nested_with_the_same_file_twice,
     "member 'x.txt' would overwrite"),
    ("member through a link in the target", into_a_linked_folder,
     "member 'sub/x.txt' resolves outside"),
    ("rar unreadable", lambda t: extract._Rar(t / "gone.rar").members(),  # removed after its kind was read
     "gone.rar is not a readable rar archive (unrar error"),
    ("rar header damaged", lambda t: extract.safe_extract(
        write_bytes(t / "a.rar", rar4({"a.txt": b"a"}, damage_header=True)), t, progress=False),
     "a.rar is damaged (unrar error"),
    ("rar encrypted", lambda t: extract.safe_extract(
        write_bytes(t / "a.rar", rar4({"a.txt": b"a"}, file_flags=0x04)), t, progress=False),
     "a.rar: member 'a.txt' is encrypted; delete the archive and download it again"),
    ("rar changed while extracting", rar_that_changes_while_extracting,
     "a.rar changed while extracting; re-run"),
    ("download record damaged", lambda t: Record.read(write(t / "a.zip.sha256", "sha256 abc\nsize many\n")
                                                      .with_name("a.zip")),
     "a.zip.sha256 is not a valid download record; delete it and re-run"),
    ("download of the wrong size", lambda t: ensure_file("http://127.0.0.1:9/a.zip", write(t / "a.zip", "abc"),
                                                         size=10, progress=False),
     "a.zip: size mismatch: expected 10 bytes, got 3; delete"),
    ("mirror URL malformed", lambda t: ensure_file("http://[::1/a.zip", t / "a.zip", progress=False,
                                                   retries=0),
     "cannot download http://[::1/a.zip: "),
    ("--json into an unwritable folder", json_into_an_unwritable_folder,
     "result.json: its directory "),
    # run directories
    ("checkpoint without resume state", checkpoint_without_resume_state,
     "last.pt holds no resume state (written by an older version); pass --restart"),
    ("log on a full disk", log_closed_on_a_full_disk, "cannot write /dev/full: No space left on device"),
    # your own videos: data.dataset list and folder
    ("list file missing", lambda t: catalog.resolve_dataset(load_config(None, [
        "data.dataset=list", f"data.root={t}", "data.list.train=nope.txt", "data.list.val=nope.txt",
        "data.list.labels=nope.txt"]).data, progress=False),
     "config key 'data.list.train': nope.txt not found (looked in the current directory and under"),
    ("labels repeated", lambda t: catalog.resolve_dataset(list_config(t, labels="a\nb\na\n"), progress=False),
     "labels.txt repeats a; it must hold one distinct class name per line"),
    ("labels empty", lambda t: catalog.resolve_dataset(list_config(t, labels="\n"), progress=False),
     "labels.txt is empty; it must hold one distinct class name per line"),
    ("list label unknown", lambda t: catalog.resolve_dataset(list_config(t, train="x.mp4 zebra\n"),
                                                            progress=False),
     "train.txt:1: expected 'relative/path label' with a label in 0..1 or a class name"),
    ("list of no videos", lambda t: catalog.resolve_dataset(list_config(t, train="\n"), progress=False),
     "list split train_fold1 lists no videos; check the split files"),
    ("list of unreadable videos", lambda t: catalog.resolve_dataset(list_config(t), progress=False),
     "1 of the 1 videos of list train_fold1 are missing or unreadable"),
    ("folder without train/", lambda t: lists.plan_folder(folder_dataset(t, "val/a/1.mp4")),
     "train not found: data.dataset=folder needs"),
    ("folder without classes", lambda t: lists.plan_folder(folder_dataset(t, "train/", "val/")),
     "train has no class folders; put each class's videos in"),
    ("folder val class unknown", lambda t: lists.plan_folder(folder_dataset(t, "train/a/1.mp4", "val/b/2.mp4")),
     "val/b is not a class of"),
    ("folder class without videos", lambda t: lists.plan_folder(folder_dataset(t, "train/a/1.mp4",
                                                                               "train/b/notes.txt", "val/")),
     "train/b holds no videos"),
    ("list dataset indexed without lists", lambda t: catalog.index_dataset("list", t, progress=False),
     "the list dataset needs data.list.train, data.list.val and data.list.labels"),
    ("index an unknown dataset", lambda t: catalog.index_dataset("kinetics", t, progress=False),
     "config key 'data.dataset' must be one of"),
    ("resolve an unknown dataset", lambda t: catalog.resolve_dataset(DataConfig(dataset="kinetics"),
                                                                    progress=False),
     "config key 'data.dataset' must be one of"),
    # UCF101's and HMDB51's official files, damaged
    ("ucf101 layout", lambda t: require_layout(t / "ucf101", "ucf101", {"UCF-101": "<Class>/*.avi"}),
     "UCF-101 not found: UCF101 needs UCF-101/<Class>/*.avi under"),
    ("ucf101 classInd missing", lambda t: ucf101.read_class_ind(t / "classInd.txt"),
     "classInd.txt not found; UCF101 needs the official ucfTrainTestlist/classInd.txt"),
    ("ucf101 classInd line", lambda t: ucf101.read_class_ind(write(t / "classInd.txt", "1 A\n1 B\n")),
     "classInd.txt:2: expected '<id> <ClassName>' with a new id, got '1 B'"),
    ("ucf101 classInd gap", lambda t: ucf101.read_class_ind(write(t / "classInd.txt", "1 A\n3 B\n")),
     "classInd.txt: class ids must run 1..N without gaps, got [1, 3]"),
    ("ucf101 no fold", lambda t: ucf101.plan(ucf_lists(t)),
     "ucfTrainTestlist has no trainlist0N.txt / testlist0N.txt pair"),
    ("ucf101 list line", lambda t: ucf101.plan(ucf_lists(t, trainlist01="Archery.avi 2\n", testlist01="")),
     "trainlist01.txt:1: expected '<Class>/<video>.avi <id>', got 'Archery.avi 2'"),
    ("ucf101 list class", lambda t: ucf101.plan(ucf_lists(t, trainlist01="Bowling/v.avi 2\n", testlist01="")),
     "trainlist01.txt:1: class 'Bowling' is not in classInd.txt"),
    ("ucf101 list id", lambda t: ucf101.plan(ucf_lists(t, trainlist01="Archery/v.avi 1\n", testlist01="")),
     "trainlist01.txt:1: id 1 contradicts classInd.txt, where Archery is 2"),
    ("ucf101 fold missing", ucf101_fold_2_of_1,
     "has no split files for fold 2 (ucfTrainTestlist/trainlist02.txt and "
     "ucfTrainTestlist/testlist02.txt); restore them or choose another data.fold"),
    ("hmdb51 no split files", lambda t: hmdb51.plan(hmdb_splits(t)),
     "has no <class>_test_split<N>.txt files; restore the official testTrainMulti_7030_splits/"),
    ("hmdb51 fold file missing", lambda t: hmdb51.plan(hmdb_splits(t, run_test_split1="a.avi 1\n",
                                                                   jump_test_split1="b.avi 1\n",
                                                                   jump_test_split2="b.avi 1\n")),
     "run_test_split2.txt not found, though other classes have fold 2"),
    ("hmdb51 split line", lambda t: hmdb51.plan(hmdb_splits(t, run_test_split1="a.avi 7\n")),
     "run_test_split1.txt:1: expected '<video file name> <0|1|2>', got 'a.avi 7'"),
    # data that cannot be loaded
    ("batch larger than the videos", more_clips_than_videos,
     "data.batch_size=4 is larger than the 3 training videos; lower data.batch_size"),
    ("fidelity of unreadable videos", unreadable_val,
     "none of the 1 validation videos picked for fidelity could be decoded"),
    # stages and devices
    ("more stages than modules", lambda t: resolve_balance("auto", 5, 3, [1.0, 1.0, 1.0], ["a", "b", "c"]),
     "parallel.stages=5 but the model has only 3 modules (a, b, c); set parallel.stages to at most 3"),
    ("balance not summing to the modules", lambda t: resolve_balance([1, 1], 2, 3),
     "parallel.balance=[1, 1] must list parallel.stages=2 module counts summing to the model's 3 modules"),
    ("parallel job on another device", lambda t: job_backend("auto", torch.device("meta")),
     "parallel jobs run on cuda or cpu, not 'meta'; set device"),
    ("nccl on the cpu", lambda t: job_backend("nccl", torch.device("cpu")),
     "config key 'parallel.backend' is nccl but the stages run on cpu, whose tensors only gloo moves"),
    ("amp on another device", lambda t: runtime.forward_autocast(torch.device("meta"), amp=True),
     "amp (bf16 autocast) is not available on device 'meta'; drop --amp"),
    ("sideways.update unparsed", unparsed_update, "every second tick"),
    ("stage without a GPU of its own", stage_beyond_the_gpus,
     "stage with local rank 3 has no GPU of its own (1 visible); launch at most that many stages"),
    ("cuda without a GPU", cuda_without_cuda,
     "device 'cuda' was asked for but no CUDA device is available; use --device cpu (or auto)"),
    ("amp without native bf16", amp_without_native_bf16,
     "amp (bf16 autocast) needs native bf16, which Tesla T4 lacks"),
]


@pytest.mark.parametrize("call, message", [c[1:] for c in CALL_CASES], ids=[c[0] for c in CALL_CASES])
def test_a_mistake_below_the_command_line_is_a_user_error(call, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    needs_monkeypatch = call.__code__.co_argcount == 2
    with pytest.raises(UserError) as refused:
        call(tmp_path, monkeypatch) if needs_monkeypatch else call(tmp_path)
    text = str(refused.value)
    assert message in text, text
    assert "\n" not in text
