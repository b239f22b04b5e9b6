"""Sideways across processes gives the single-process engine's numbers; a P-stage run's checkpoints
are ordinary ones; a stage that dies or hangs ends the job, naming it, with nothing left behind."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import spawned
from cli_helpers import invoke
from nccl_replay import load_traces, recording, replay
from optimizer_helpers import STEPS as ENGINE_STEPS, stepper
from sideways_cli.config import load_config
from sideways_cli.engine import Schedule, make_rule
from sideways_cli.engine.losses import OBJECTIVES
from sideways_cli.parallel.links import Links
from sideways_cli.parallel.staged_chunked import StagedChunked
from sideways_cli.parallel.staged_sideways import StagedSideways
from sideways_cli.parallel.stages import output_specs, stage_ranges, stage_stack
from sideways_cli.parallel.topology import make_topology
from sideways_cli.run.rundir import RunDir
from tiny import random_clips, tiny_network, tiny_run_config
from tracked import tensorboard_scalars

# -- the engine: P stages against the single-process engine with the same settings ------------------
# float64 over several steps of every optimizer: what is compared is the computation, not round-off

CASES = {  # name -> (between_clips, update, chunk, task, modules per stage[, sideways.stash])
    "reset": ("reset", "clip", 1, "classify", [2, 2]),
    "continuous": ("continuous", "clip", 1, "classify", [2, 2]),
    "every 3 ticks": ("reset", "every 3 ticks", 1, "classify", [1, 3]),
    "continuous every 2 ticks": ("continuous", "every 2 ticks", 1, "classify", [3, 1]),
    "reconstruct": ("continuous", "clip", 1, "reconstruct", [2, 2]),
    # the chunked executor, 1F1B over macro ticks
    "reset chunk 3": ("reset", "clip", 3, "classify", [2, 2]),
    "reset chunk 8": ("reset", "clip", 8, "classify", [1, 3]),
    "continuous chunk 2": ("continuous", "clip", 2, "classify", [1, 3]),
    "continuous chunk 8": ("continuous", "clip", 8, "classify", [2, 2]),
    "reset chunk 16": ("reset", "clip", 16, "classify", [2, 2]),  # more than a batch's ticks
    "reconstruct chunk 4": ("continuous", "clip", 4, "reconstruct", [2, 2]),
    # the staleness dial: routed messages (k = 3) and kept inputs across the boundary
    "stash full": ("reset", "clip", 1, "classify", [2, 2], "full"),
    "stash full, chunk 3": ("reset", "clip", 3, "classify", [1, 3], "full"),
    "stash full, continuous chunk 4": ("continuous", "clip", 4, "classify", [2, 2], "full"),
    "stash 2, every 3 ticks": ("reset", "every 3 ticks", 1, "classify", [1, 3], 2),
    "stash 3, continuous chunk 2": ("continuous", "clip", 2, "classify", [3, 1], 3),
}
THREE_STAGE_CASES = {  # a middle stage runs one forward ahead of the last
    "3 stages, reset chunk 2": ("reset", "clip", 2, "classify", [1, 2, 1]),
    "3 stages, continuous chunk 3": ("continuous", "clip", 3, "classify", [2, 1, 1]),
    "3 stages, stash full": ("reset", "clip", 1, "classify", [1, 2, 1], "full"),
    "3 stages, stash full, chunk 2": ("reset", "clip", 2, "classify", [2, 1, 1], "full"),
}


def case_settings(case: str) -> tuple:
    """(between_clips, update, chunk, task, modules per stage, stash)."""
    settings = {**CASES, **THREE_STAGE_CASES}[case]
    return settings if len(settings) == 6 else (*settings, 0)
SPAWN_OPTIMIZERS = ["sgd-nesterov", "adamw"]  # plain SGD has no state a step could carry wrongly


def network(task: str):
    if task == "reconstruct":
        return tiny_network("autoencoder", levels=2)
    return tiny_network("c3d", depth=3)


def batches():  # T = 12: reset batches take 15 ticks
    return random_clips(ENGINE_STEPS, frames=12, size=16, dtype=torch.float64)


def stage_process(rank: int, out: str, cases: dict, stages: int) -> None:
    """Stage ``rank`` of every case in turn, in one process group (spawning is the slow part)."""
    torch.set_num_threads(1)
    spawned.join(rank, stages, f"{out}/rendezvous-{stages}")
    topology = make_topology(1, stages, torch.device("cpu"), 30)
    for case, optimizer in itertools.product(cases, SPAWN_OPTIMIZERS):
        between_clips, update, chunk, task, sizes, stash = case_settings(case)
        model = network(task)
        schedule = Schedule.of(model, stash)
        modules = stage_ranges(sizes)[rank]
        stack = stage_stack(model, modules)
        last = topology.is_last
        specs = output_specs(model, (3, 16, 16))
        if chunk > 1:
            rule = StagedChunked(stack, modules, schedule, topology, specs, between_clips, chunk,
                                 OBJECTIVES[task], nullcontext)
        else:
            rule = StagedSideways(stack, modules, schedule, topology, specs, between_clips, update,
                                  OBJECTIVES[task], nullcontext)
        apply_update, schedule_step = stepper(optimizer, stack)
        stats = []
        for clips, labels in batches():
            mine = clips if rank == 0 or (last and task == "reconstruct") else None
            s, stop = topology.batch_stats(rule.train_batch(mine, labels if last else None,
                                                            apply_update, clips.shape))
            assert stop == 0
            schedule_step()
            stats.append((s.loss, s.losses, s.updates))
        torch.save({"stats": stats, "weights": [p.detach() for p in stack.parameters()]},
                   f"{out}/{case}-{optimizer}-stage{rank}.pt")
    spawned.leave()


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("staged")
    # both jobs at once: one's processes import torch while the other's compute
    jobs = [mp.start_processes(stage_process, args=(str(out), cases, stages), nprocs=stages,
                               join=False, start_method=spawned.START_METHOD)
            for cases, stages in ((CASES, 2), (THREE_STAGE_CASES, 3))]
    for job in jobs:
        while not job.join():
            pass
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("optimizer", SPAWN_OPTIMIZERS)
@pytest.mark.parametrize("case", list(CASES) + list(THREE_STAGE_CASES))
def test_stages_give_the_single_process_numbers(case, optimizer, staged, one_thread):
    between_clips, update, chunk, task, sizes, stash = case_settings(case)
    model = network(task)
    rule = make_rule("sideways", model, between_clips, update, chunk, OBJECTIVES[task], stash=stash)
    apply_update, schedule_step = stepper(optimizer, model)
    expected = []
    for clips, labels in batches():
        s = rule.train_batch(clips, labels, apply_update)
        schedule_step()
        expected.append((s.loss, s.losses, s.updates))

    results = [torch.load(staged / f"{case}-{optimizer}-stage{r}.pt") for r in range(len(sizes))]
    for stats in (results[0]["stats"], results[-1]["stats"]):  # every stage reports the batch
        assert [(n, u) for _, n, u in stats] == [(n, u) for _, n, u in expected]
        torch.testing.assert_close([loss for loss, _, _ in stats], [loss for loss, _, _ in expected],
                                   rtol=1e-12, atol=0)
    weights = [w for result in results for w in result["weights"]]
    assert len(weights) == len(list(model.parameters()))
    for got, want in zip(weights, model.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-11, atol=1e-13)
    assert not torch.equal(weights[0], next(network(task).parameters()))  # they did train


# -- the command line: sideways train --set parallel.stages=2 ---------------------------------------

STEPS = 6


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return tiny_run_config(tmp_path_factory.mktemp("parallel"), {
        "mode": "sideways", "model": {"name": "c3d", "temporal_kernel": 3, "depth": 2},
        "data": {"size": 16, "synthetic": {"train_per_class": 2}},
        "train": {"steps": STEPS, "warmup_steps": 2, "checkpoint_every": 3},
        "eval": {"clips_per_video": 1, "chunk": 4},  # 2 chunks of the clip
        "sideways": {"between_clips": "continuous", "chunk": 1},
        "parallel": {"balance": [2, 1], "threads": 1, "timeout_s": 5}},
        generate=True)  # generated once, before any run


def start(config: Path, out: Path, *sets: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "sideways_cli", "train", str(config), "--out", str(out), "--quiet"]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}  # one thread: as the stages and the in-process references
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=240)
    assert process.returncode == 0, err


def weights(run: Path, part: str = "model") -> dict[str, torch.Tensor]:
    """The network's weights (or with ``part`` "ema" their average) in the run's last checkpoint
    (a parallel job's shards merged)."""
    return RunDir(run).load_checkpoint()[part]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    torch.testing.assert_close(losses(a), losses(b), rtol=1e-5, atol=0)
    for part in ("model", "ema") if "ema" in RunDir(a).load_checkpoint() else ("model",):
        wa, wb = weights(a, part), weights(b, part)
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)
    # the final evaluation, run through the stages a time chunk at a time
    sa, sb = (json.loads((run / "summary.json").read_text()) for run in (a, b))
    for key in ("val_clip_top1", "val_clip_top5", "val_video_top1", "val_clips"):
        assert sa[key] == sb[key], key


def descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(c) for child in children for c in [child, *descendants(int(child))]]


def stage_pids(process: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the stage processes the launcher started (each in a session of its own);
    their data-loader workers inherit RANK but come after them in the walk."""
    pids = {}
    for pid in descendants(process.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            pids.setdefault(int(rank[0][5:]), pid)
    return pids


def kill_after_checkpoint(process: subprocess.Popen, run: Path, ranks: int = 2) -> None:
    """SIGKILL the launcher as soon as the run's first checkpoint is there (a tiny run's next
    one follows within a second: the stages are found while waiting, not after), then check that
    its ``ranks`` stage processes die with it."""
    deadline = time.monotonic() + 120
    stages: dict[int, int] = {}
    while not (run / "checkpoints" / "last.pt").is_file():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        if len(stages) < ranks:
            stages = stage_pids(process)
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher: its stages die with it
    assert len(stages) == ranks, stages
    process.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in stages.values()):
        assert time.monotonic() < deadline, "a stage outlived its launcher"
        time.sleep(0.05)


# The training recipe across stages: the global gradient norm summed over the stages once their
# batch's traffic is done, MixUp's class probabilities sent to the last stage, two optimizer
# groups split between the stages and joined again, the EMA's shards. 2-frame clips of a
# continuous run, a step of 2 batches: the bottom stage's one module gets its first message at
# tick 4, so the first step has nothing to step there, and that stage still joins the norm's sum.
# Evaluated a frame at a time: 2 chunks of the clip.
RECIPE = ("parallel.balance=[1,2]", "data.clip_len=2", "eval.chunk=1", "train.accumulate=2",
          "train.clip_grad_norm=0.01", "data.augment.mixup=0.4", "train.ema_decay=0.9",
          "train.decay_norms_and_biases=false")


def sets(*settings: str) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


@pytest.fixture(scope="module")
def single(config, tmp_path_factory, one_thread) -> Path:
    """The single-process reference, trained here (a process would spend seconds importing torch)
    at one thread, as the stages run."""
    run = tmp_path_factory.mktemp("single") / "run"
    invoke("train", config, *sets("parallel.stages=1", *RECIPE), "--out", run, "--quiet")
    return run


@pytest.mark.multiprocess
def test_a_killed_two_stage_run_resumes_as_two_stages_or_in_one_process(config, single, tmp_path,
                                                                        one_thread):
    """A 2-stage run of the chunked executor SIGKILLed after its first checkpoint, then started
    again from that checkpoint twice: as the same 2-stage job through the CLI, and in this one
    process (the stages' chunked registers reassemble into the single-process executor's). Both
    end with the tick rule's numbers (every chunk gives them). The tick rule's staged numbers:
    test_stages_give_the_single_process_numbers."""
    killed, handover = tmp_path / "two", tmp_path / "handover"
    staged = ("parallel.stages=2", "sideways.chunk=3", "log.tensorboard=true", *RECIPE)
    kill_after_checkpoint(start(config, killed, *staged), killed)
    shutil.copytree(killed, handover)
    # the chunked protocol's traffic, recorded from the resume on, replayed under NCCL's rules
    resumed = start(config, killed, *staged, env=recording(tmp_path / "traffic"))
    invoke("train", config, *sets("parallel.stages=1", "sideways.chunk=3", *RECIPE), "--out",
           handover, "--quiet")
    finish(resumed)
    for run in (killed, handover):
        assert_same_run(run, single)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["updates"] == STEPS
    stage_peaks = summary["stage_peak_mem_mb"]  # each stage measures its own, the largest counts
    assert len(stage_peaks) == 2 and min(stage_peaks) > 0
    assert summary["peak_mem_mb"] == max(stage_peaks)
    # only global rank 0 tracks: one event file a start, holding each logged step once
    assert len(list((killed / "tensorboard").glob("events.out.tfevents.*"))) == 2
    logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in tensorboard_scalars(killed)["train/loss"]] == logged
    programs = load_traces(tmp_path / "traffic")
    assert sorted(programs) == [0, 1]
    verdict = replay(programs)
    assert verdict.ok, str(verdict)


def training(config: Path, run: Path) -> subprocess.Popen:
    """A long 2-stage run that stays in its steps: a checkpoint's wait for the other stage is
    patient (writing one may take minutes), so a stage stopped then is not noticed within the
    hang timeout, which bounds a step's waits."""
    return start(config, run, "parallel.stages=2", "train.steps=100000", "train.checkpoint_every=0")


def wait_for_a_step(process: subprocess.Popen, run: Path) -> None:
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)


@pytest.mark.multiprocess
def test_a_killed_or_hung_stage_ends_the_job_naming_it_within_a_minute(config, tmp_path):
    """Two jobs side by side (each mostly waits): stage 1 of one is killed, stage 1 of the other
    stopped (alive, holding its sockets, doing nothing)."""
    runs = {name: tmp_path / name for name in ("killed", "hung")}
    jobs = {name: training(config, run) for name, run in runs.items()}
    try:
        for name, job in jobs.items():
            wait_for_a_step(job, runs[name])
        stop_one_stage_of_each(jobs)
    finally:  # a failed check leaves no job running
        for job in jobs.values():
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)


def stop_one_stage_of_each(jobs: dict[str, subprocess.Popen]) -> None:
    pids = {name: stage_pids(job) for name, job in jobs.items()}
    signalled = time.monotonic()
    os.kill(pids["killed"][1], signal.SIGKILL)
    os.kill(pids["hung"][1], signal.SIGSTOP)

    _, err = jobs["killed"].communicate(timeout=60)
    assert time.monotonic() - signalled < 60
    assert jobs["killed"].returncode != 0
    assert "stage 1 was killed by SIGKILL" in err
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids["killed"].values())  # none left

    deadline = signalled + 45
    while Path(f"/proc/{pids['hung'][0]}").exists():  # stage 0 finds the silence and ends the job
        assert time.monotonic() < deadline, "stage 0 did not notice its silent neighbour"
        time.sleep(0.05)
    # torch's agent now sends SIGTERM, which a stopped process takes only once continued, and
    # waits a fixed 30 s before SIGKILL (docs/runs.md): continue it, so that wait is not the test's
    os.kill(pids["hung"][1], signal.SIGCONT)
    _, err = jobs["hung"].communicate(timeout=60)
    assert time.monotonic() - signalled < 60
    assert jobs["hung"].returncode != 0
    assert "stage 1 sent nothing for 5 s" in err
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids["hung"].values())


def test_registers_of_another_executor_are_refused_with_the_fix():
    """A continuous pipeline's registers are laid out by executor: the error names the chunk."""
    from sideways_cli.run.resume import carried_rule_state
    from sideways_cli.support.errors import UserError

    cfg = load_config(None, ["mode=sideways", "sideways.between_clips=continuous", "sideways.chunk=4"])
    with pytest.raises(UserError, match="resume it with sideways.chunk=1"):
        carried_rule_state({"pipeline": {}}, cfg)  # the chunked executor keeps "registers"
    cfg = load_config(None, ["mode=sideways", "sideways.between_clips=continuous", "sideways.chunk=1"])
    with pytest.raises(UserError, match=r"the sideways.chunk \(above 1\) it ran with"):
        carried_rule_state({"registers": []}, cfg)  # the tick rule keeps "pipeline"
    reset = load_config(None, ["mode=sideways", "sideways.between_clips=reset", "sideways.chunk=1"])
    assert carried_rule_state({"registers": []}, reset) is None  # nothing to carry


def test_a_silent_collective_names_the_stage_when_it_can():
    """A hang found in an all_reduce: of two stages the silent one is the other; of more, the
    backend does not say which."""
    timeout = RuntimeError("Timed out waiting 5000ms for recv operation to complete")
    cpu = torch.device("cpu")
    unused = dict(up=None, down=None, pipeline=None)  # naming needs no group
    two = Links(0, 2, 5, cpu, [0, 1], **unused).failure(None, "summing the batch's losses", timeout)
    assert str(two).startswith("stage 0, summing the batch's losses: stage 1 sent nothing for 5 s")
    three = Links(2, 3, 5, cpu, [0, 1, 2], **unused).failure(None, "summing the batch's losses",
                                                            timeout)
    assert "another stage sent nothing for 5 s" in str(three)
