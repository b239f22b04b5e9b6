"""A parallel job's torch.distributed traffic, recorded on the CPU (gloo) and replayed under NCCL's
in-order rule (``nccl_replay.py``): gloo lets operations overtake one another, NCCL does not, so
traffic that runs here may hang on GPUs; the replay finds it without one.

First the replay itself on hand-written traces, so that it cannot pass vacuously; then real
``sideways train`` jobs, every process recorded by ``tests/traffic`` (its sitecustomize).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import invoke
from crash_after_checkpoint import Crash, crash_after_first_checkpoint
from nccl_replay import Event, load_traces, recording, replay
from sideways_cli.run.rundir import RunDir
from tiny import tiny_run_config

# -- the replay, on hand-written traces ------------------------------------------------------------


def p2p(op: int, kind: str, peer: int, group: str = "world", numel: int = 4) -> Event:
    return {"ev": "issue", "op": op, "group": group, "kind": kind, "peer": peer, "numel": numel,
            "dtype": "float32"}


def batch(op: int, *parts: tuple[str, int], group: str = "world") -> Event:
    return {"ev": "issue", "op": op, "group": group, "kind": "batch",
            "parts": [{"kind": kind, "peer": peer, "numel": 4, "dtype": "float32"}
                      for kind, peer in parts]}


def all_reduce(op: int, group: str) -> Event:
    return {"ev": "issue", "op": op, "group": group, "kind": "collective", "name": "all_reduce",
            "numel": 2, "dtype": "float32"}


def wait(op: int) -> Event:
    return {"ev": "wait", "op": op}


def members(group: str, *ranks: int) -> Event:
    return {"ev": "group", "group": group, "ranks": list(ranks)}


def test_receives_posted_before_sends_on_one_group_deadlock():
    # each rank posts its receive from the other, then its send to it, then waits
    programs = {rank: [p2p(1, "recv", 1 - rank), p2p(2, "send", 1 - rank), wait(1), wait(2)]
                for rank in (0, 1)}
    verdict = replay(programs)
    assert not verdict.mismatches
    assert [line.split(" waits for ")[0] for line in verdict.stuck] == ["rank 0", "rank 1"]
    assert "rank 0 waits for recv from rank 1 (4 x float32) on group world (op 1)" in str(verdict)


def test_one_group_per_direction_passes():
    # rank 0 sends on "up", rank 1 on "down": each group carries one direction
    groups = {0: "up", 1: "down"}
    programs = {rank: [p2p(1, "recv", 1 - rank, groups[1 - rank]),
                       p2p(2, "send", 1 - rank, groups[rank]), wait(1), wait(2)]
                for rank in (0, 1)}
    assert replay(programs).ok


def test_one_batch_per_rank_passes():
    programs = {rank: [batch(1, ("recv", 1 - rank), ("send", 1 - rank)), wait(1)]
                for rank in (0, 1)}
    assert replay(programs).ok


def test_a_size_mismatch_is_reported():
    verdict = replay({0: [p2p(1, "send", 1, numel=4), wait(1)],
                      1: [p2p(1, "recv", 0, numel=8), wait(1)]})
    assert not verdict.stuck
    assert len(verdict.mismatches) == 1 and "size mismatch on group world" in verdict.mismatches[0]


def test_collectives_in_different_orders_on_two_groups_deadlock():
    # each rank waits for its first (a blocking call) before it issues its second
    declared = [members("a", 0, 1), members("b", 0, 1)]
    verdict = replay({0: declared + [all_reduce(1, "a"), wait(1), all_reduce(2, "b"), wait(2)],
                      1: declared + [all_reduce(1, "b"), wait(1), all_reduce(2, "a"), wait(2)]})
    assert [line.split(" waits for ")[0] for line in verdict.stuck] == ["rank 0", "rank 1"]


def test_a_host_wait_that_holds_back_the_peers_message_deadlocks():
    # a group per direction, but each rank waits for its receive before it issues its send
    groups = {0: "up", 1: "down"}
    programs = {rank: [p2p(1, "recv", 1 - rank, groups[1 - rank]), wait(1),
                       p2p(2, "send", 1 - rank, groups[rank]), wait(2)]
                for rank in (0, 1)}
    verdict = replay(programs)
    assert len(verdict.stuck) == 2
    assert "rank 1 waits for recv from rank 0 (4 x float32) on group up" in str(verdict)


# -- real jobs, recorded --------------------------------------------------------------------------

STEPS = 3  # an evaluation and a checkpoint after each
STAGES_2 = ["parallel.stages=2", "parallel.balance=[2,1]"]
# name -> (settings, processes, resumed): between them the tick protocol with updates every N
# ticks, 2 and 3 stages, replicas of stages, both pipelined-BP schedules, each evaluating and
# checkpointing after every step (three jobs: every process of a job starts torch, seconds each).
# The chunked protocol's traffic, with the training recipe on: test_depth_parallel's resumed
# 2-stage job.
# A resumed job is recorded from its resume on, which saves a job: its pipeline is reset, so every
# batch starts from an empty one and the resumed job's traffic is a fresh job's from its first step.
CASES: dict[str, tuple[list[str], int, bool]] = {
    # with an EMA: each update of a clip's first ticks steps only the modules a message has
    # reached, and so only their averages move, in the stages as in one process
    "sideways tick, reset, every 2 ticks, 3 stages, resumed": (
        ["mode=sideways", "sideways.chunk=1", "sideways.between_clips=reset",
         "sideways.update=every 2 ticks", "precision=float64", "train.ema_decay=0.5",
         "parallel.stages=3", "parallel.balance=[1,1,1]"], 3, True),
    # replicas of pipelined BP: their gradients averaged after the stages' GPipe batches, then
    # clipped to their global norm over the stages; in float64 with AdamW, one process's numbers
    "bp gpipe, 2 replicas x 2 stages": (
        ["mode=bp", "parallel.microbatches=2", "precision=float64", "train.lr=0.01",
         "train.clip_grad_norm=0.01", "parallel.replicas=2", *STAGES_2], 4, False),
    # 1F1B: torch.distributed.pipelining issues its mixed batches (a send up with a receive from
    # above) through batch_isend_irecv, its one-way ones as plain isends or irecvs, as GPipe's.
    # In float64 with SGD, it must also give one process's losses, weights and evaluation.
    "bp 1f1b, 2 stages": (["mode=bp", "parallel.bp_schedule=1f1b", "parallel.microbatches=2",
                           "precision=float64", "train.optimizer=sgd", "train.lr=0.05", *STAGES_2],
                          2, False),
}
EXACT = {"bp gpipe, 2 replicas x 2 stages", "bp 1f1b, 2 stages",  # compared with one process too
         "sideways tick, reset, every 2 ticks, 3 stages, resumed"}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return tiny_run_config(tmp_path_factory.mktemp("traffic"), {
        "model": {"name": "c3d", "temporal_kernel": 3, "depth": 2},  # 3 modules: up to 3 stages
        "data": {"size": 16, "synthetic": {"train_per_class": 2}},
        "train": {"steps": STEPS, "eval_every": 1, "checkpoint_every": 1},
        "eval": {"clips_per_video": 1, "chunk": 4},  # the stages evaluate a time chunk at a time
        # a busy machine must not end a job that the replay is about
        "parallel": {"threads": 1, "timeout_s": 60}},
        generate=True)


def train(config: Path, out: Path, sets: list[str], env: dict[str, str]) -> subprocess.Popen:
    args = [sys.executable, "-m", "sideways_cli", "train", str(config), "--out", str(out),
            "--quiet"]
    return subprocess.Popen(args + [a for s in sets for a in ("--set", s)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def recorded_run(config: Path, out: Path, traffic: Path, sets: list[str]) -> dict[int, list[Event]]:
    """``sideways train`` with every process's traffic recorded into ``traffic``; its traces."""
    process = train(config, out, sets, recording(traffic))
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return load_traces(traffic)


def crashed_after_its_first_checkpoint(config: Path, out: Path, sets: list[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A run in this process (the stages resume from its ordinary checkpoint: the number of stages
    may change) that dies once it has written the checkpoint of its first step."""
    overrides = [*sets, "parallel.replicas=1", "parallel.stages=1", "parallel.balance=auto"]
    with monkeypatch.context() as patched:
        crash_after_first_checkpoint(patched)
        with pytest.raises(Crash):
            invoke("train", config, "--out", out, "--quiet", *[a for s in overrides for a in ("--set", s)])
    step = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert step == 1, f"stopped after step {step}: the resume would not evaluate between steps"


def point_to_point(events: list[Event]) -> list[Event]:
    return [e for e in events if e["ev"] == "issue" and e["kind"] != "collective"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(CASES))
def test_a_jobs_traffic_cannot_deadlock_under_nccl(case, config, tmp_path, monkeypatch):
    settings, processes, resumed = CASES[case]
    if resumed:
        crashed_after_its_first_checkpoint(config, tmp_path / "run", settings, monkeypatch)
    programs = recorded_run(config, tmp_path / "run", tmp_path / "traffic", settings)
    assert sorted(programs) == list(range(processes))
    assert all(point_to_point(events) for events in programs.values())
    verdict = replay(programs)
    assert verdict.ok, str(verdict)
    if case in EXACT:
        one = tmp_path / "one"
        single = [*settings, "parallel.replicas=1", "parallel.stages=1", "parallel.balance=auto"]
        invoke("train", config, "--out", one, "--quiet", *[a for s in single for a in ("--set", s)])
        assert_one_process_numbers(tmp_path / "run", one)


def assert_one_process_numbers(job: Path, one: Path) -> None:
    """The job's losses, weights and final evaluation are one process's, in float64; it ran as
    its config's stages (each measured its own memory)."""
    config = RunDir(job).read_config()
    summaries = [json.loads((run / "summary.json").read_text()) for run in (one, job)]
    assert len(summaries[1]["stage_peak_mem_mb"]) == config.parallel.stages
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (one, job)]
    assert len(losses[0]) == STEPS
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)
    checkpoints = [RunDir(run).load_checkpoint() for run in (one, job)]
    for part in ("model", "ema"):
        if part not in checkpoints[0]:
            continue
        weights = [ckpt[part] for ckpt in checkpoints]
        assert weights[0].keys() == weights[1].keys()
        assert all(w.dtype == torch.float64 for w in weights[1].values() if w.is_floating_point())
        for key, want in weights[0].items():
            torch.testing.assert_close(weights[1][key], want, rtol=1e-11, atol=1e-13)
    for key in ("train_loss", "val_clip_top1", "val_video_top1", "val_clips"):
        assert summaries[1][key] == pytest.approx(summaries[0][key], rel=1e-12), key
