"""Where commands write and where they find their presets: a path that cannot take a command's
output is one line naming the option and the cause, exit 2, before any work; every default config
resolves from any working directory, and the presets are packaged with the code."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cli_helpers import run_main
from sideways_cli.run.build import resolve_config
from sideways_cli.support import paths
from sideways_cli.support.errors import UserError
from sideways_cli.support.paths import output_dir, output_file, preset

REPO = Path(__file__).resolve().parents[1]


def chmod_stops_writes() -> bool:
    """Whether a folder's mode 0o555 stops this process writing in it: not for root (tests in a
    container often run as root), whom only a read-only file system stops."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        try:
            return not os.access(folder, os.W_OK)
        finally:
            folder.chmod(0o755)


needs_binding_permissions = pytest.mark.skipif(
    not chmod_stops_writes(),
    reason="chmod 0o555 does not stop this process writing (it runs as root), so no read-only "
           "folder can be made here; the *_simulated tests cover how the error is reported")


@pytest.fixture
def read_only(tmp_path):
    """A folder this process cannot write in (0o555), made writable again afterwards."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


# --- output_dir ----------------------------------------------------------------------------------

def test_output_dir_creates_the_folder_and_its_parents(tmp_path):
    target = tmp_path / "a" / "b" / "run"
    assert output_dir(target, "--out") == target
    assert target.is_dir()
    assert output_dir(target, "--out") == target  # there already: fine


def test_output_dir_refuses_a_file(tmp_path):
    target = tmp_path / "run"
    target.write_text("not a folder")
    with pytest.raises(UserError, match=r"^--out .*run is a file; give a directory$"):
        output_dir(target, "--out")


def test_output_dir_refuses_a_path_through_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"^--out .*file/run: .*file is a file, not a directory"):
        output_dir(tmp_path / "file" / "run", "--out")


def test_output_dir_refuses_a_broken_symbolic_link(tmp_path):
    (tmp_path / "run").symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match=r"run is a broken symbolic link; give a directory"):
        output_dir(tmp_path / "run", "--out")


@needs_binding_permissions
def test_output_dir_refuses_a_read_only_parent(read_only):
    with pytest.raises(UserError, match=r"^--out .*ro/x: permission denied creating it; "
                                        r"choose a writable place$"):
        output_dir(read_only / "x", "--out")


@needs_binding_permissions
def test_output_dir_refuses_a_read_only_folder(read_only):
    with pytest.raises(UserError, match=r"^--out .*ro: the directory is not writable; choose a "
                                        r"writable place$"):
        output_dir(read_only, "--out")


def test_output_dir_maps_a_permission_error_simulated(tmp_path, monkeypatch):
    """What a read-only folder gives a user who is not root, whoever runs the tests."""
    def denied(self, *args, **kwargs):  # as mkdir(parents=True) fails making x for x/y
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(UserError, match=r"^--out .*x/y: permission denied creating .*/x; choose a "
                                        r"writable place$"):
        output_dir(tmp_path / "x" / "y", "--out")
    with pytest.raises(UserError, match=r"^--out .*/x: permission denied creating it; choose a "
                                        r"writable place$"):
        output_dir(tmp_path / "x", "--out")


def test_output_dir_maps_any_os_error_with_its_cause(tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "mkdir", full)
    with pytest.raises(UserError, match=r"^--out .*x: cannot create it \(no space left on device\); "
                                        r"choose another place$"):
        output_dir(tmp_path / "x", "--out")


def test_output_dir_refuses_an_unwritable_folder_simulated(tmp_path, monkeypatch):
    monkeypatch.setattr(paths.os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match=r": the directory is not writable; choose a writable place$"):
        output_dir(tmp_path, "--out")


# --- output_file ---------------------------------------------------------------------------------

def test_output_file_creates_its_folder_and_leaves_the_file_alone(tmp_path):
    target = tmp_path / "new" / "result.json"
    assert output_file(target, "--json") == target
    assert target.parent.is_dir() and not target.exists()
    target.write_text("{}")
    assert output_file(target, "--json") == target  # an existing file is overwritten later


def test_output_file_refuses_a_directory(tmp_path):
    with pytest.raises(UserError, match=r"^--json .* is a directory; give a file name$"):
        output_file(tmp_path, "--json")


def test_output_file_refuses_a_folder_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"^--json .*file/r.json: .*file is a file, not a directory"):
        output_file(tmp_path / "file" / "r.json", "--json")


@needs_binding_permissions
def test_output_file_refuses_a_read_only_folder(read_only):
    with pytest.raises(UserError, match=r"^--json .*ro/r.json: its directory .*ro is not writable"):
        output_file(read_only / "r.json", "--json")


@needs_binding_permissions
def test_output_file_refuses_a_read_only_file(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("{}")
    target.chmod(0o444)
    with pytest.raises(UserError, match=r"^--json .*r.json: the file is read-only; choose a writable"):
        output_file(target, "--json")


def test_output_file_refuses_a_read_only_file_simulated(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    target.write_text("{}")
    monkeypatch.setattr(paths.os, "access", lambda path, mode: Path(path) != target)
    with pytest.raises(UserError, match=r"r.json: the file is read-only; choose a writable"):
        output_file(target, "--json")


# --- through the command line: one line, exit 2, before any work ---------------------------------

def one_error_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "taken"
    path.write_text("a file, not a folder")
    return path


@pytest.mark.parametrize("args", [
    ["train", "--set", "train.steps=1"],
    ["compare", "--set", "train.steps=1"],
    ["compare", "--runs", "no-such-run"],
], ids=["train", "compare", "compare-runs"])
def test_out_naming_a_file(args, a_file, monkeypatch, capsys):
    line = one_error_line(*run_main([*args, "--out", a_file], monkeypatch, capsys))
    assert line == f"error: --out {a_file} is a file; give a directory"


@pytest.mark.parametrize("args", [
    ["train", "--set", "train.steps=1"],
    ["eval", "no-such-run"],
    ["check"],
    ["fidelity"],
    ["stream", "--frames", "2"],
], ids=lambda args: args[0])
def test_json_naming_a_directory(args, tmp_path, monkeypatch, capsys):
    line = one_error_line(*run_main([*args, "--json", tmp_path], monkeypatch, capsys))
    assert line == f"error: --json {tmp_path} is a directory; give a file name"


def test_download_root_naming_a_file(a_file, monkeypatch, capsys):
    line = one_error_line(*run_main(["download", "synthetic", "--root", a_file], monkeypatch, capsys))
    assert line == f"error: --root {a_file} is a file; give a directory"


@needs_binding_permissions
def test_out_under_a_read_only_folder(read_only, monkeypatch, capsys):
    line = one_error_line(*run_main(["train", "--out", read_only / "run"], monkeypatch, capsys))
    assert line == f"error: --out {read_only / 'run'}: permission denied creating it; choose a writable place"


def test_nothing_is_trained_before_the_refusal(tmp_path, monkeypatch, capsys):
    """The run directory and the dataset are untouched: the refusal comes first."""
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    one_error_line(*run_main(["train", "--out", run_dir, "--json", tmp_path], monkeypatch, capsys))
    assert not run_dir.exists() and not (tmp_path / "data").exists()


@pytest.mark.multiprocess
def test_the_command_as_a_process_prints_one_line_and_exits_2(a_file, tmp_path):
    result = subprocess.run([sys.executable, "-m", "sideways_cli", "train", "--out", str(a_file)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: --out {a_file} is a file; give a directory"
    assert result.stdout == ""


# --- default configs from anywhere ---------------------------------------------------------------

@pytest.mark.parametrize("name,task", [("synthetic.yaml", "classify"), ("stream.yaml", "reconstruct")])
def test_default_configs_resolve_from_another_directory(name, task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = preset(name)
    assert found is not None and found.is_file()
    assert found.read_text() == (REPO / "experiments" / name).read_text()
    assert resolve_config(found, []).task == task


@pytest.mark.parametrize("command", ["train", "stream"])
def test_train_and_stream_find_their_config_from_another_directory(command, tmp_path, monkeypatch,
                                                                   capsys):
    """From an empty directory the config resolves (the --json refusal after it is the first
    error), where stream used to want ./experiments/stream.yaml."""
    monkeypatch.chdir(tmp_path)
    line = one_error_line(*run_main([command, "--json", tmp_path], monkeypatch, capsys))
    assert line == f"error: --json {tmp_path} is a directory; give a file name"


def test_a_working_directory_preset_comes_first(tmp_path, monkeypatch):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "stream.yaml").write_text("task: reconstruct\n")
    monkeypatch.chdir(tmp_path)
    assert preset("stream.yaml").resolve() == (tmp_path / "experiments" / "stream.yaml").resolve()


def test_an_installed_package_finds_its_own_presets(tmp_path, monkeypatch):
    """The layout a wheel installs: site-packages/sideways_cli/presets/, no experiments/ beside."""
    package = tmp_path / "site-packages" / "sideways_cli"
    (package / "presets").mkdir(parents=True)
    (package / "presets" / "stream.yaml").write_text("task: reconstruct\n")
    monkeypatch.setattr(paths, "__file__", str(package / "support" / "paths.py"))
    monkeypatch.chdir(tmp_path)
    assert preset("stream.yaml") == package / "presets" / "stream.yaml"
    assert preset("synthetic.yaml") is None


def test_the_presets_are_packaged_with_the_code():
    """pyproject.toml lists its packages (find cannot rename experiments/): every package on disk
    is listed, and every preset and base is package data of sideways_cli.presets (or .bases)."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = pytest.importorskip("setuptools")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = setuptools.find_namespace_packages(str(REPO), include=["sideways_cli*"])
    folders = [".".join(("sideways_cli", "presets", *d.relative_to(REPO / "experiments").parts))
               for d in (REPO / "experiments").rglob("*") if d.is_dir() and d.name != "__pycache__"]
    assert sorted(config["packages"]) == sorted([*on_disk, "sideways_cli.presets", *folders])
    assert config["package-dir"] == {"sideways_cli.presets": "experiments"}
    for package in ["sideways_cli.presets", *folders]:
        folder = REPO / "experiments" / Path(*package.split(".")[2:])
        patterns = config["package-data"][package]
        presets = sorted(p.name for p in folder.glob("*.yaml"))
        assert presets and all(any(Path(p).match(pattern) for pattern in patterns) for p in presets)
