"""What a job's topology decides without starting one: the backend for the device, the hang
timeout, and the checkpoint shards' bookkeeping in the run directory."""

from __future__ import annotations

import signal

import pytest
import torch

import spawned

from sideways_cli.config import load_config
from sideways_cli.engine.rule import LossSum
from sideways_cli.parallel.contribution import Contribution
from sideways_cli.parallel import topology
from sideways_cli.parallel.topology import (end_process, hang_timeout_s, job_backend, make_topology,
                                            process_name)
from sideways_cli.run.rundir import RunDir, save_checkpoint
from sideways_cli.support.errors import UserError

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_the_backend_is_the_one_that_moves_the_devices_tensors():
    assert job_backend("auto", CPU) == "gloo" and job_backend("gloo", CPU) == "gloo"
    assert job_backend("auto", CUDA) == "nccl" and job_backend("nccl", CUDA) == "nccl"
    with pytest.raises(UserError, match="parallel.backend' is nccl but the stages run on cpu.*"
                                        "set parallel.backend=gloo or auto"):
        job_backend("nccl", CPU)
    with pytest.raises(UserError, match="set parallel.backend=nccl or auto"):
        job_backend("gloo", CUDA)


def test_the_hang_timeout_is_minutes_on_cuda_unless_set():
    unset = load_config(None, [])
    assert unset.parallel.timeout_s is None
    assert hang_timeout_s(unset, CPU) == 20 and hang_timeout_s(unset, CUDA) == 300
    set_ = load_config(None, ["parallel.timeout_s=7.5"])
    assert hang_timeout_s(set_, CPU) == hang_timeout_s(set_, CUDA) == 7.5
    with pytest.raises(UserError, match="parallel.timeout_s' must be > 0"):
        load_config(None, ["parallel.timeout_s=0"])


def test_processes_are_named_by_replica_and_stage():
    assert process_name(1, 1, 2) == "stage 1"
    assert process_name(3, 2, 2) == "replica 1 stage 1"


class Exited(BaseException):
    """os._exit, which would end this test's process, as an exception."""


@pytest.mark.parametrize("code, status", [(0, 0), (None, 0), (2, 2), (138, 138), ("a message", 1)])
def test_a_job_process_ends_without_finalization_once_out_of_its_group(code, status, monkeypatch,
                                                                       capsys):
    def exit_now(status: int) -> None:
        raise Exited(status)

    monkeypatch.setattr(topology.os, "_exit", exit_now)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exited:  # not a job's process: an ordinary exit
        end_process(code)
    assert exited.value.code == code
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exited) as ended:
        end_process(code)
    assert ended.value.args == (status,)
    if isinstance(code, str):
        assert capsys.readouterr().err == f"{code}\n"
    monkeypatch.setattr(topology.dist, "is_initialized", lambda: True)
    with pytest.raises(SystemExit):  # still in its group: finalization tears the group down
        end_process(code)


def test_older_shards_go_once_the_checkpoint_names_newer_ones(tmp_path):
    run = RunDir(tmp_path)
    for which, step, rank in [("last", 2, 0), ("last", 2, 1), ("last", 4, 0), ("best", 2, 0)]:
        save_checkpoint({"step": step}, run.shard(which, step, rank))
    being_written = run.shard("last", 6, 1).with_name(run.shard("last", 6, 1).name + ".tmp")
    being_written.write_bytes(b"")  # a process already writing the next checkpoint
    run.drop_shards_before("last", 4)
    left = sorted(path.name for path in run.shards.iterdir())
    assert left == ["best-step00000002-rank0.pt", "last-step00000004-rank0.pt",
                    "last-step00000006-rank1.pt.tmp"]


def test_a_checkpoint_whose_shard_is_gone_is_refused_with_the_fix(tmp_path):
    run = RunDir(tmp_path)
    save_checkpoint({"step": 2, "shards": [run.shard("last", 2, 0).name],
                     "topology": {"replicas": 1, "stages": 2}}, run.checkpoint())
    with pytest.raises(UserError, match=r"last-step00000002-rank0.pt not found.*--restart"):
        run.load_checkpoint()


def agree_on_stops(rank: int, rendezvous: str, out: str) -> None:
    import spawned

    spawned.join(rank, 4, rendezvous)
    topology = make_topology(2, 2, CPU, hang_s=30)
    seen = []
    # batch 1: nobody signalled; 2: one stage of one replica got SIGUSR1; 3: two processes got
    # different signals, and SIGTERM (first in STOP_SIGNALS) wins everywhere
    for received in ([0, 0, 0, 0], [0, 0, 0, signal.SIGUSR1], [signal.SIGINT, 0, signal.SIGTERM, 0]):
        losses = LossSum()
        losses.add(torch.tensor(float(rank)), 1)
        stats, stop = topology.batch_stats(Contribution(losses, frames=rank, flushes=[True],
                                                        stop=received[rank]))
        seen.append((stop, stats.frames, stats.updates))
    torch.save(seen, f"{out}/rank{rank}.pt")
    spawned.leave()


@pytest.mark.multiprocess
def test_every_process_of_a_job_agrees_on_the_stop_signal_any_one_received(tmp_path):
    """The stop signal travels with the batch's statistics: every process sees the same one, so
    every process stops after the same batch."""
    torch.multiprocessing.start_processes(agree_on_stops, args=(str(tmp_path / "rdzv"), str(tmp_path)),
                                          nprocs=4, start_method=spawned.START_METHOD)
    expected = [(0, 6, 1), (signal.SIGUSR1, 6, 1), (signal.SIGTERM, 6, 1)]
    for rank in range(4):
        assert torch.load(tmp_path / f"rank{rank}.pt") == expected
