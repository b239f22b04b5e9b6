"""Fixtures several test modules share."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: OpenMP's fork and join cost more than they save, far more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def train_in_process(monkeypatch):
    """``compare`` trains each run in this process instead of a spawned child: each spawn costs
    seconds of importing torch on a 2-core machine, and test_compare's ``pair`` covers the child.
    In one process the runs must still start from the same weights: compare seeds each run itself."""
    from sideways_cli.run.train import train

    def train_here(cfg, run_dir, quiet=False, restart=False):
        return train(cfg, run_dir, quiet=quiet, log=lambda msg: None, restart=restart)

    monkeypatch.setattr("sideways_cli.run.isolated.train_isolated", train_here)


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The class of every video decoder opened from now on."""
    from sideways_cli.data.decode import DecordDecoder, PyAVDecoder, TorchCodecDecoder

    seen: list[str] = []
    for cls in (DecordDecoder, PyAVDecoder, TorchCodecDecoder):
        init = cls.__init__

        def recording_init(self, *args, _init=init, _name=cls.__name__, **kwargs):
            seen.append(_name)
            _init(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", recording_init)
    return seen

