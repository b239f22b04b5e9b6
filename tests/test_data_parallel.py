"""R replicas x P stages give one process's numbers on the same global batch (docs/sideways.md,
"Depth and data parallelism"): losses, weights, the sharded evaluation, over several steps of SGD with Nesterov
momentum and of AdamW, float64; a run resumes with other R and P; a replica that dies ends the job.
The shards of a batch, the registers across replicas and the gradient buckets are tested in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import pytest
import torch

from cli_helpers import invoke
from crash_after_checkpoint import Crash, crash_after_first_checkpoint
from sideways_cli.data.sampler import SeededBatchSampler
from sideways_cli.engine.sideways_chunked import ChunkedSideways
from sideways_cli.parallel.replicas import BUCKET_BYTES, _buckets
from sideways_cli.parallel.resharding import merge_replica_states, replica_share
from sideways_cli.run.lock import RunLock
from sideways_cli.run.rundir import RunDir
from test_depth_parallel import descendants, kill_after_checkpoint, stage_pids, start
from tiny import random_clips, tiny_network, tiny_run_config

STEPS = 4


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return tiny_run_config(tmp_path_factory.mktemp("replicas"), {
        "model": {"name": "c3d", "temporal_kernel": 3, "depth": 2},
        "data": {"size": 16, "synthetic": {"train_per_class": 2}},
        "train": {"steps": STEPS, "warmup_steps": 2, "checkpoint_every": 2, "optimizer": "sgd",
                  "lr": 0.05},
        "eval": {"clips_per_video": 2}, "precision": "float64",
        "parallel": {"threads": 1, "timeout_s": 5, "microbatches": 1}},
        generate=True)  # once, before any run


def one_process(config: Path, out: Path, *sets: str) -> Path:
    args = [a for s in sets for a in ("--set", s)]
    invoke("train", config, *args, "--out", out, "--quiet")
    return out


def launched(config: Path, out: Path, *sets: str) -> Path:
    process = start(config, out, *sets)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return out


def torchrun(config: Path, out: Path, *extra: str, sets: list[str]) -> list[str]:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", *extra, "-m",
            "sideways_cli", "train", str(config), "--out", str(out), "--quiet"]
    return args + [a for s in sets for a in ("--set", s)]


def assert_same_run(a: Path, b: Path) -> None:
    """Losses, weights and the (sharded) final evaluation of two runs."""
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (a, b)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    ca, cb = (RunDir(run).load_checkpoint() for run in (a, b))
    for part in ("model", "ema") if "ema" in ca else ("model",):  # the weights and their average
        for key in ca[part]:
            torch.testing.assert_close(ca[part][key], cb[part][key], rtol=1e-11, atol=1e-13)
    sa, sb = (json.loads((run / "summary.json").read_text()) for run in (a, b))
    for key in ("val_clip_top1", "val_clip_top5", "val_video_top1", "val_mean_class_acc",
                "val_clips", "val_videos", "frames_seen", "updates"):
        assert sa[key] == sb[key], key


# name -> (settings, replicas and stages). Sideways: with AdamW at R=2 the torchrun restart
# test's job; with SGD at R=2 x P=2 the continuous-registers test's (its steps before the kill
# must be one process's for the resumed run to end as the uninterrupted one). BP with AdamW at
# R=2 x P=2: test_nccl_traffic's job, whose numbers are checked against one process's too.
# BP with SGD at R=2 here, with the recipe on: DDP holding back its averaging (no_sync) until a
# step's last batch, MixUp's pairs mixed within each replica's shard as in the whole batch, and
# the global norm of the averaged gradients clipped.
CASES = {
    "bp, sgd, R=2, accumulated, clipped, mixed": (
        ["mode=bp", "train.accumulate=2", "train.clip_grad_norm=0.01", "data.augment.mixup=0.4",
         "train.ema_decay=0.9"], ["parallel.replicas=2"]),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(CASES))
def test_replicas_give_one_process_numbers(case, config, tmp_path):
    settings, parallel = CASES[case]
    single = one_process(config, tmp_path / "one", *settings)
    assert_same_run(launched(config, tmp_path / "many", *settings, *parallel), single)


@pytest.mark.multiprocess
def test_continuous_registers_resume_from_2x2_into_one_process(config, tmp_path):
    """The chunked executor's registers survive batches: gathered from every replica's stage
    into the whole batch's, they resume in one process as if nothing had stopped."""
    settings = ["mode=sideways", "sideways.between_clips=continuous", "sideways.chunk=4"]
    run = tmp_path / "run"
    kill_after_checkpoint(start(config, run, *settings, "parallel.replicas=2", "parallel.stages=2",
                                "parallel.balance=[2,1]"), run, ranks=4)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["step"] == 2
    one_process(config, run, *settings)
    assert_same_run(run, one_process(config, tmp_path / "straight", *settings))


@pytest.mark.multiprocess
def test_updates_every_n_ticks_resume_from_one_process_into_2_replicas(config, tmp_path, monkeypatch):
    settings = ["mode=sideways", "sideways.chunk=1", "sideways.update=every 3 ticks",
                "train.optimizer=adamw", "train.lr=0.01"]
    run = tmp_path / "run"
    with monkeypatch.context() as patched:  # the one-process part dies here, after its checkpoint
        crash_after_first_checkpoint(patched)
        with pytest.raises(Crash):
            one_process(config, run, *settings)
    launched(config, run, *settings, "parallel.replicas=2")
    assert_same_run(run, one_process(config, tmp_path / "straight", *settings))


@pytest.mark.multiprocess
def test_a_killed_replica_ends_the_job_naming_it_and_leaves_no_process(config, tmp_path):
    run = tmp_path / "run"
    process = start(config, run, "mode=sideways", "parallel.replicas=2", "train.steps=100000",
                    "data.num_workers=1")
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    everything = descendants(process.pid)  # the agent, the replicas, their loader workers
    ranks = stage_pids(process)
    assert len(everything) > len(ranks) + 1
    killed = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    _, err = process.communicate(timeout=60)
    assert time.monotonic() - killed < 60 and process.returncode != 0
    assert "replica 1 stage 0 was killed by SIGKILL" in err
    while any(Path(f"/proc/{pid}").exists() for pid in everything):
        assert time.monotonic() - killed < 60, "a process outlived the job"
        time.sleep(0.1)


def finished(process: subprocess.Popen) -> tuple[int, str]:
    """A process's exit status and standard error."""
    _, err = process.communicate(timeout=300)
    return process.returncode, err


@pytest.mark.multiprocess
def test_torchrun_is_refused_with_the_wrong_number_of_processes_or_on_a_directory_being_written(
        config, tmp_path):
    """Side by side (each mostly waits). The wrong number is told what to pass. On a locked
    directory global rank 0 takes the run directory's lock for the job and tells the others: each
    process exits 2 with the one line naming the holder, before any step."""
    run, locked = tmp_path / "run", tmp_path / "locked"
    with RunLock(locked):
        wrong = subprocess.Popen(torchrun(config, run, "--nproc-per-node", "1",
                                          sets=["parallel.replicas=2"]),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        refused = subprocess.Popen(torchrun(config, locked, "--nproc-per-node", "2",
                                            sets=["parallel.replicas=2"]),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        (wrong_code, wrong_err), (refused_code, refused_err) = finished(wrong), finished(refused)
    assert wrong_code != 0
    assert "started 1 process but parallel.replicas x parallel.stages is 2 x 1 = 2; launch 2" in wrong_err
    assert "--nproc-per-node 2" in wrong_err
    assert refused_code != 0
    refusals = [line for line in refused_err.splitlines()
                if f"{locked} is being written by another sideways process (PID {os.getpid()} on " in line]
    assert len(refusals) == 2, refused_err  # one per process
    assert not (locked / "metrics.jsonl").exists()


@pytest.mark.multiprocess
def test_torchrun_restarts_a_killed_replica_and_the_job_resumes_from_its_checkpoint(config, tmp_path):
    """torchrun's elastic agent (--max-restarts) starts every process again after one dies; they
    resume from the last checkpoint and end where an uninterrupted run ends."""
    settings = ["mode=sideways", "train.optimizer=adamw", "train.lr=0.01", "train.steps=8"]
    run = tmp_path / "run"
    process = subprocess.Popen(
        torchrun(config, run, "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.5",
                 sets=[*settings, "parallel.replicas=2"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.pt").is_file():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    os.kill(stage_pids(process)[1], signal.SIGKILL)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "replica 1 stage 0 closed its connection" in err  # the first attempt's end
    assert_same_run(run, one_process(config, tmp_path / "straight", *settings))


# -- in-process: the pieces ---------------------------------------------------------------------

def test_the_shards_of_a_batch_are_the_batch_in_order():
    whole = SeededBatchSampler(20, 8, seed=3)
    shards = [SeededBatchSampler(20, 8, seed=3, shard=(r, 4)) for r in range(4)]
    for batch, *parts in islice(zip(whole, *shards), 6):  # endless; 6 batches cross 2 epochs
        assert [draw for part in parts for draw in part] == batch
    with pytest.raises(ValueError, match="shard 0 of 3"):
        SeededBatchSampler(20, 8, seed=3, shard=(0, 3))


def assert_same_state(got, want) -> None:
    """Two rules' states alike, entry by entry (tensors to float64 round-off)."""
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_same_state(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert_same_state(a, b)
    else:
        assert got == want


def test_registers_split_and_merge_back_and_messages_keep_the_batch_scale():
    """A replica's registers for its half of a batch are the whole batch's half (messages twice
    as large: its losses are means over half as many clips)."""
    model = tiny_network("c3d", depth=3)
    (clips, labels), = random_clips(1, 7, dtype=torch.float64, batch=4)
    whole = ChunkedSideways(model, between_clips="continuous", chunk=3)
    whole.train_batch(clips, labels, lambda: None)
    halves = []
    for r in range(2):
        half = ChunkedSideways(model, between_clips="continuous", chunk=3)
        half.train_batch(clips[2 * r:2 * r + 2], labels[2 * r:2 * r + 2], lambda: None)
        halves.append(half.state_dict())
    merged = merge_replica_states(halves)
    assert_same_state(merged, whole.state_dict())
    share = replica_share(merged, 1, 2)
    assert_same_state(share, halves[1])


def test_gradient_buckets_keep_order_dtype_and_size():
    small = [torch.zeros(10), torch.zeros(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)]
    assert [[t.dtype for t in b] for b in _buckets(small)] == [[torch.float32], [torch.float64] * 2]
    big = [torch.zeros(BUCKET_BYTES // 4), torch.zeros(1), torch.zeros(1)]
    assert [len(b) for b in _buckets(big)] == [1, 2]
