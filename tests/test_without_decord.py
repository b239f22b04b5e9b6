"""Where decord is not installed (it has no wheels for Apple Silicon or aarch64 Linux), nor the
torchcodec extra, PyAV decodes everything: a run trains and evaluates, its log names the decoder,
and asking for decord is one line naming the fix. Both are made unimportable here, as decord is on
those machines."""

from __future__ import annotations

import sys

import pytest

from cli_helpers import invoke, run_main
from sideways_cli.data.decode import decord_module, torchcodec_decoders
from tiny import tiny_run_config


@pytest.fixture
def without_decord(monkeypatch, opened):
    """decord and TorchCodec unimportable, and the decoders opened from now on (their class names)."""
    for module in ("decord", "torchcodec", "torchcodec.decoders", "torchcodec._core.ops"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it raises ImportError
    decord_module.cache_clear()
    torchcodec_decoders.cache_clear()
    yield opened
    decord_module.cache_clear()
    torchcodec_decoders.cache_clear()


@pytest.mark.slow  # a run and its evaluation
def test_a_run_decodes_with_pyav_and_says_so(without_decord, tmp_path):
    assert decord_module() is None and torchcodec_decoders() is None
    config = tiny_run_config(tmp_path, {"train": {"steps": 1}})
    out = invoke("train", config, "--out", tmp_path / "run").output
    assert "decoding with PyAV (neither TorchCodec nor decord is installed)" in " ".join(out.split())
    invoke("eval", tmp_path / "run", "--quiet")
    assert without_decord and set(without_decord) == {"PyAVDecoder"}


def test_asking_for_decord_is_refused_with_the_fix(without_decord, tmp_path, monkeypatch, capsys):
    config = tiny_run_config(tmp_path)
    code, err = run_main(["train", config, "--set", "data.decoder=decord"], monkeypatch, capsys)
    assert code == 2
    assert "'data.decoder' is decord, which is not installed here" in " ".join(err.split())
    assert "set data.decoder=auto or pyav" in " ".join(err.split())
    assert not without_decord  # refused before any video was opened
