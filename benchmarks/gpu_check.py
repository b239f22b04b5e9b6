"""The GPU check: every part of ``sideways train`` that a CUDA device changes, once, in one table.

    python benchmarks/gpu_check.py [--device cuda|cpu] [--tiny] [--parallel] [--budget-s 480]
                                   [--jobs N] [--work runs/gpu-check] [--json PATH]
    make gpu-check

Each row is one check, run through the command line as a user runs it (``--set device=cuda``):

* BP and Sideways training, and ``sideways eval`` of the BP run;
* kill and resume: BP and Sideways (``sideways.between_clips: continuous``, dropout), ``--deterministic``,
  SIGKILLed after their first checkpoint and started again, against uninterrupted runs: weights,
  optimizer state and logged losses bit-identical (same GPU, same build, deterministic kernels,
  the random streams restored from the checkpoint: any difference is a resume bug, not rounding);
* ``--amp`` (bf16 autocast) training, both rules;
* ``--deterministic`` with ``torchvision:resnet18`` and ``torchvision:r2plus1d_18``: two runs
  give bit-identical weights;
* engine frames/s (median of timed batches after warm-up, timed with CUDA events) and peak CUDA
  memory of BP and Sideways at ``sideways.chunk`` 1, 8 and 16, and with ``sideways.stash: full``
  at chunk 8: C3D (width 32, 8 conv modules,
  the UCF101 preset's) at 112x112, B=16, 16- and 64-frame clips, one fresh process per length;
* with 2 or more GPUs: float64 P=1 references, then 2 stages with both executors (chunk 1 and 8)
  and both pipelines, 2 replicas, and 2 x 2 with 4 GPUs, each within 1e-9 of its reference
  (float64 round-off is 1e-16; an executor or exchange bug shows at 1e-3 and more); and P=1 vs
  P=2 frames/s of the C3D above through ``sideways train`` (compute only, first steps dropped).

A failed check does not stop the others; the exit status is 1 if any failed. Every process has a
timeout, clipped to what is left of the budget, so a hang costs its own row and no more. The
correctness checks run several at a time (``--jobs``), the timings alone; an engine row's seconds
are its share of its process's. Runs and logs stay in ``--work`` (its runs/ and logs/ are cleared
first). Without a CUDA device it says so, checks nothing and exits 0 (CI, CPU machines).
``--device cpu --tiny`` runs the same checks at tiny sizes on the CPU (``tests/test_gpu_check.py``);
the multi-process rows run there only with ``--parallel``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import av
import torch

from common import PRESET, default_setup, emit, median, random_batch, rule_for, time_rules
from sideways_cli.config import load_config
from sideways_cli.data.catalog import resolve_dataset
from sideways_cli.data.decode import TorchCodecDecoder, torchcodec_decoders
from sideways_cli.run.rundir import RunDir
from sideways_cli.support.memory import PeakMemory, fresh_process_env

RESULTS = Path(__file__).parent / "results"
BUDGET_S = 480.0  # the 8 minutes on one H100
# the engine rows: name -> (common.RULES name, sideways.chunk)
ENGINE_RULES = {"bp": ("bp", None), "sideways chunk 1": ("sideways-tick", 1),
                "sideways chunk 8": ("sideways", 8), "sideways chunk 16": ("sideways", 16),
                "sideways stash full chunk 8": ("sideways-stash-full", 8)}
# the training recipe on the device: per-clip augmentation in the loader, MixUp on the GPU,
# clipping, accumulation and the EMA in the optimizer loop, all carried across the kill
RECIPE = ("data.augment.resized_crop=[0.5,1.0]", "data.augment.randaugment=9",
          "data.augment.erasing=0.25", "data.augment.mixup=0.4", "data.augment.cutmix=1.0",
          "train.label_smoothing=0.1", "train.clip_grad_norm=1.0", "train.accumulate=2",
          "train.ema_decay=0.9", "train.decay_norms_and_biases=false")
RESUME_CASES = {"bp": ("--mode", "bp"),
                "sideways continuous": ("--mode", "sideways", "--set", "sideways.between_clips=continuous"),
                "sideways recipe": ("--mode", "sideways", *[a for s in RECIPE for a in ("--set", s)])}
STAGE_TOLERANCE = 1e-9  # max |weight difference| / max |weight|, float64 (see the docstring)


@dataclass(frozen=True)
class Sizes:
    """What the checks train: ``--set`` overrides of experiments/synthetic.yaml (the work
    directory's data.root is added), each later entry over ``run``."""

    run: tuple[str, ...]  # training, evaluation, AMP
    resume: tuple[str, ...]  # enough steps after the first checkpoint for the kill to land mid-run
    resume_cases: tuple[str, ...]  # the RESUME_CASES killed and resumed
    torchvision: tuple[str, ...]  # torchvision's networks are heavy: a few small steps
    stages: tuple[str, ...]  # the float64 stage and replica rows
    pipeline: tuple[str, ...]  # P=1 vs P=2 frames/s
    engine: tuple[str, ...]  # common.default_setup overrides of the engine frames/s rows
    lengths: tuple[int, ...]  # the engine rows' clip lengths
    warmup: int  # engine batches per rule before timing (allocator, cuDNN heuristics)
    repeats: int  # timed engine batches per rule
    skip_steps: int  # P=1 vs P=2: steps left out of the rate (start-up, first kernels)
    timeout_s: float  # one process; a GPU run of these sizes takes 10-30 s


FULL = Sizes(
    run=("data.batch_size=8", "data.synthetic.train_per_class=4", "data.synthetic.val_per_class=2",
         "data.synthetic.num_frames=32", "train.steps=20", "train.log_every=5",
         "train.warmup_steps=2"),
    resume=("train.steps=40", "train.checkpoint_every=5", "train.log_every=2", "train.eval_every=20",
            "model.dropout=0.3", "data.synthetic.train_per_class=2"),
    resume_cases=("bp", "sideways continuous", "sideways recipe"),
    torchvision=("data.clip_len=8", "data.batch_size=2", "train.steps=3", "eval.clips_per_video=1"),
    stages=("precision=float64", "train.steps=4", "train.log_every=1"),
    pipeline=("model.width=32", "model.depth=8", "data.size=112", "data.batch_size=16",
              "data.num_workers=4", "data.synthetic.train_per_class=2",
              "data.synthetic.val_per_class=1", "data.synthetic.num_frames=16", "train.steps=12",
              "train.log_every=1", "eval.clips_per_video=1"),
    engine=("model.width=32", "model.depth=8", "data.size=112", "data.batch_size=16"),
    lengths=(16, 64), warmup=2, repeats=5, skip_steps=3, timeout_s=150)

TINY = Sizes(
    run=("model.width=4", "model.depth=2", "data.size=16", "data.clip_len=6", "data.batch_size=4",
         "data.num_workers=0", "data.synthetic.train_per_class=1", "data.synthetic.val_per_class=1",
         "data.synthetic.num_frames=12", "train.steps=3", "train.log_every=1",
         "train.warmup_steps=0", "eval.batch_size=8"),
    resume=("train.steps=8", "train.checkpoint_every=3", "train.log_every=2", "train.eval_every=4",
            "model.dropout=0.3", "data.synthetic.train_per_class=2"),
    resume_cases=("sideways continuous",),  # the case with the most state; one runs the check's code
    torchvision=("data.clip_len=2", "data.batch_size=2", "train.steps=1", "eval.clips_per_video=1"),
    stages=("precision=float64", "train.steps=3"),
    pipeline=("train.steps=6",),
    engine=("model.width=4", "model.depth=2", "data.size=16", "data.batch_size=2"),
    lengths=(8,), warmup=1, repeats=3, skip_steps=2, timeout_s=180)  # one length runs their code


class CheckFailed(Exception):
    """What a check found wrong, in one line: its row's reason."""


class CheckSkipped(Exception):
    """Why a check cannot run on this machine, in one line: its row's reason."""


@dataclass
class Row:
    name: str
    status: str = "pass"  # pass | FAIL | skip
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    multi_gpu: bool = False


class Budget:
    """The whole check's wall-clock allowance: every process's timeout is clipped to what is left."""

    def __init__(self, total_s: float):
        self.total_s, self.started = total_s, time.monotonic()

    def used_s(self) -> float:
        return time.monotonic() - self.started

    def timeout(self, wanted_s: float) -> float:
        left = self.total_s - self.used_s()
        if left <= 0:
            raise CheckFailed(f"not run: the {self.total_s:.0f} s budget is spent")
        return min(wanted_s, left)


@dataclass
class Context:
    """What every check shares: the device, the sizes, the work directory, the budget, and the
    run directories that later checks build on (eval on the BP run, stages on their reference)."""

    device: torch.device
    sizes: Sizes
    work: Path
    budget: Budget
    tiny: bool
    parallel: bool  # run the multi-process rows on the CPU
    only: list[str] | None = None  # --only: the checks whose name contains one of these
    runs: dict[str, Path] = field(default_factory=dict)

    def unasked(self, name: str) -> str | None:
        """Why check ``name`` is left out by --only; None if it runs."""
        if self.only is None or any(text in name for text in self.only):
            return None
        return "not asked for (--only)"

    def sets(self, *groups: tuple[str, ...]) -> list[str]:
        """The run overrides, then ``groups`` over them, with the work directory's data."""
        return [*self.sizes.run, *(s for group in groups for s in group),
                f"data.root={self.work / 'data'}"]

    def run_dir(self, name: str) -> Path:
        return self.work / "runs" / name.replace(" ", "-")


@dataclass
class Job:
    name: str
    process: subprocess.Popen
    stdout: Path
    stderr: Path


class Launcher:
    """The processes of one check: each in a session of its own (a kill takes its loader workers
    and stages along), output to log files (a pipe nobody reads can block a child), waited on with
    a timeout; whatever is still running when the check ends is killed."""

    def __init__(self, ctx: Context):
        self.ctx, self.jobs = ctx, []

    def start(self, name: str, *args: str) -> Job:
        logs = self.ctx.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        stem = name.replace(" ", "-")
        stdout, stderr = logs / f"{stem}.out", logs / f"{stem}.err"
        with stdout.open("w") as out, stderr.open("w") as err:
            process = subprocess.Popen([sys.executable, "-m", "sideways_cli", *args], stdout=out,
                                       stderr=err, start_new_session=True, env=self.env())
        job = Job(name, process, stdout, stderr)
        self.jobs.append(job)
        return job

    def env(self) -> dict[str, str]:
        """On the CPU several tiny runs share the cores: one thread each, not a thread per core
        each (stage processes set their own)."""
        if self.ctx.device.type == "cuda":
            return dict(os.environ)
        return {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(self, name: str, sets: list[str], *flags: str, quiet: bool = True,
              run: str | None = None) -> Job:
        """``sideways train`` into the run directory ``run`` (default: ``name``'s)."""
        args = ["train", str(PRESET), "--out", str(self.ctx.run_dir(run or name)),
                "--set", f"device={self.ctx.device.type}", *flags]
        for setting in sets:
            args += ["--set", setting]
        return self.start(name, *args, *(["--quiet"] if quiet else []))

    def finish(self, job: Job) -> str:
        """Wait for ``job`` within its timeout; its standard output."""
        try:
            job.process.wait(timeout=self.ctx.budget.timeout(self.ctx.sizes.timeout_s))
        except subprocess.TimeoutExpired:
            self.kill(job)
            raise CheckFailed(f"{job.name}: no result within {self.ctx.sizes.timeout_s:.0f} s "
                              "(or the budget's end); killed") from None
        if job.process.returncode != 0:
            raise CheckFailed(f"{job.name} exited {job.process.returncode}: {last_line(job.stderr)}")
        return job.stdout.read_text()

    def kill(self, job: Job) -> None:
        if job.process.poll() is None:
            os.killpg(job.process.pid, signal.SIGKILL)
        job.process.wait()

    def stop_all(self) -> None:
        for job in self.jobs:
            self.kill(job)


@dataclass
class Check:
    name: str
    run: Callable[[Context, Launcher], dict[str, Any]]
    gpus: int = 1  # more than 1: a multi-process row (one GPU per process)


# ---- reading runs ---------------------------------------------------------------------------

def last_line(path: Path) -> str:
    """The last line of a log: a CLI error is one line; a traceback ends with its exception."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def read_summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def last_checkpoint(run: Path) -> dict[str, Any]:
    """As one process would have written it: a parallel job's last.pt names its shards."""
    return RunDir(run).load_checkpoint()


def tensors_of(tree: Any) -> list[torch.Tensor]:
    """Every tensor in a checkpoint entry, in a fixed order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for key in sorted(tree, key=str) for t in tensors_of(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in tensors_of(item)]
    return []


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max |a - b| / max |a| over every floating tensor; inf if the structures differ."""
    pairs = [(x, y) for x, y in zip(a, b) if x.is_floating_point()]
    if len(a) != len(b) or any(x.shape != y.shape for x, y in pairs):
        return math.inf
    scale = max((x.double().abs().max().item() for x, _ in pairs if x.numel()), default=0.0)
    worst = max(((x.double() - y.double()).abs().max().item() for x, y in pairs if x.numel()),
                default=0.0)
    return worst / scale if scale else worst


def logged(run: Path) -> list[tuple]:
    """metrics.jsonl without its timings and memory."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(m["step"], m["loss"], m["lr"], m["frames_seen"]) for m in map(json.loads, lines)]


def steady_frames_per_s(run: Path, skip_steps: int) -> float:
    """Training frames/s over the logged steps after ``skip_steps`` (metrics.jsonl's frames/s is
    cumulative over compute time, so two lines give the compute time between them)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in lines if m["step"] >= skip_steps)
    last = lines[-1]
    compute_s = (last["frames_seen"] / last["frames_per_s"]
                 - first["frames_seen"] / first["frames_per_s"])
    return (last["frames_seen"] - first["frames_seen"]) / compute_s


def unwrapped(text: str) -> str:
    """Without whitespace: rich wraps long lines (and paths) at the console's width."""
    return "".join(text.split())


def require_finite_loss(summary: dict[str, Any], what: str) -> float:
    loss = summary["train_loss"]
    if not math.isfinite(loss):
        raise CheckFailed(f"{what}: training loss {loss}")
    return loss


# ---- the single-device checks ----------------------------------------------------------------

def check_training(mode: str) -> Callable[[Context, Launcher], dict[str, Any]]:
    def check(ctx: Context, launcher: Launcher) -> dict[str, Any]:
        name = f"train {mode}"
        launcher.finish(launcher.train(name, ctx.sets(), "--mode", mode))
        run = ctx.run_dir(name)
        summary = read_summary(run)
        trained_on = last_checkpoint(run)["resume"]["device"]
        if trained_on != ctx.device.type:
            raise CheckFailed(f"trained on {trained_on}, not {ctx.device.type}")
        loss = require_finite_loss(summary, name)
        ctx.runs[name] = run
        return {"steps": summary["steps"], "loss": round(loss, 4),
                "frames/s": round(summary["frames_per_s"]), "peak MiB": round(summary["peak_mem_mb"])}
    return check


def check_eval(ctx: Context, launcher: Launcher) -> dict[str, Any]:
    """``sideways eval`` of the BP run against its own final evaluation: the same weights on the
    same device, so equal up to one clip (a near-tie logit may round the other way if cuDNN picks
    another algorithm in a fresh process)."""
    run = ctx.runs.get("train bp")
    if run is None:
        raise CheckFailed("no run to evaluate: the train bp row failed")
    result_path = ctx.work / "eval-bp.json"
    launcher.finish(launcher.start("eval bp", "eval", str(run), "--json", str(result_path), "--quiet"))
    result, summary = json.loads(result_path.read_text()), read_summary(run)
    clips = summary.get("val_clips") or 1
    difference = abs(result["val_clip_top1"] - summary["val_clip_top1"])
    if difference > 1 / clips + 1e-9:
        raise CheckFailed(f"clip top-1 {result['val_clip_top1']:.3f} vs the run's "
                          f"{summary['val_clip_top1']:.3f}: more than one of {clips} clips apart")
    return {"clip top-1": round(result["val_clip_top1"], 3),
            "the run's own": round(summary["val_clip_top1"], 3)}


def kill_after_first_checkpoint(launcher: Launcher, jobs: dict[str, Job],
                                runs: dict[str, Path]) -> dict[str, int]:
    """SIGKILL each job's process group as soon as its first checkpoint is there (polled every
    5 ms: the next steps follow within milliseconds on a GPU); the step each one saved."""
    steps: dict[str, int] = {}
    deadline = time.monotonic() + launcher.ctx.budget.timeout(launcher.ctx.sizes.timeout_s)
    while len(steps) < len(jobs):
        for case, job in jobs.items():
            if case in steps:
                continue
            last = runs[case] / "checkpoints" / "last.pt"
            if last.is_file():
                launcher.kill(job)
                steps[case] = last_checkpoint(runs[case])["step"]
            elif job.process.poll() is not None:
                raise CheckFailed(f"{job.name} ended before its first checkpoint: "
                                  f"{last_line(job.stderr)}")
        if time.monotonic() > deadline:
            raise CheckFailed("no checkpoint appeared in time")
        time.sleep(0.005)
    return steps


def same_run(straight: Path, resumed: Path) -> str | None:
    """What differs between an uninterrupted run and a resumed one; None if nothing does."""
    a, b = last_checkpoint(straight), last_checkpoint(resumed)
    for part in ("model", "optimizer"):
        x, y = tensors_of(a[part]), tensors_of(b[part])
        if len(x) != len(y) or not all(torch.equal(p, q) for p, q in zip(x, y)):
            return f"{part} differs (max relative {relative_difference(x, y):.1e})"
    for key in ("train_loss", "frames_seen", "updates", "val_clip_top1"):
        if a["summary"][key] != b["summary"][key]:
            return f"summary {key}: {a['summary'][key]} vs {b['summary'][key]}"
    if logged(straight) != logged(resumed):
        return "metrics.jsonl differs (a step logged twice, missing, or another loss)"
    return None


def check_resume(ctx: Context, launcher: Launcher) -> dict[str, Any]:
    """Killed and uninterrupted runs side by side, then the killed ones started again."""
    sets = ctx.sets(ctx.sizes.resume)
    steps = load_config(PRESET, sets).train.steps
    cases = {case: RESUME_CASES[case] for case in ctx.sizes.resume_cases}
    runs = {case: ctx.run_dir(f"resume {case}") for case in cases}
    killed = {case: launcher.train(f"resume {case}", sets, *flags, "--deterministic")
              for case, flags in cases.items()}
    straight = {case: launcher.train(f"straight {case}", sets, *flags, "--deterministic")
                for case, flags in cases.items()}
    saved = kill_after_first_checkpoint(launcher, killed, runs)
    for case, step in saved.items():
        if not 0 < step < steps:
            raise CheckFailed(f"{case}: the kill landed at step {step} of {steps}, not mid-run")
    resumed = {case: launcher.train(f"resumed {case}", sets, *flags, "--deterministic",
                                    quiet=False, run=f"resume {case}")  # its output says it resumed
               for case, flags in cases.items()}
    for job in straight.values():
        launcher.finish(job)
    for case, job in resumed.items():
        said = unwrapped(launcher.finish(job))
        if unwrapped(f"from step {saved[case]}") not in said or "resuming" not in said:
            raise CheckFailed(f"{case}: the second start did not resume from step {saved[case]}")
        difference = same_run(ctx.run_dir(f"straight {case}"), runs[case])
        if difference:
            raise CheckFailed(f"{case}: {difference}")
        if list(runs[case].rglob("*.tmp")):  # what the kill interrupted must not outlive the run
            raise CheckFailed(f"{case}: left {[p.name for p in runs[case].rglob('*.tmp')]}")
    return {"killed at": ", ".join(f"{case} {step}/{steps}" for case, step in saved.items()),
            "weights, optimizer, losses": "bit-identical"}


def check_amp(ctx: Context, launcher: Launcher) -> dict[str, Any]:
    jobs = {mode: launcher.train(f"amp {mode}", ctx.sets(), "--mode", mode, "--amp")
            for mode in ("bp", "sideways")}
    figures = {}
    for mode, job in jobs.items():
        launcher.finish(job)
        run = ctx.run_dir(f"amp {mode}")
        figures[f"{mode} loss"] = round(require_finite_loss(read_summary(run), f"amp {mode}"), 4)
        kinds = {t.dtype for t in tensors_of(last_checkpoint(run)["model"]) if t.is_floating_point()}
        if kinds != {torch.float32}:
            raise CheckFailed(f"amp {mode}: weights stored as {sorted(map(str, kinds))}, not float32")
    return figures


def check_gpu_decoding(ctx: Context, launcher: Launcher) -> dict[str, Any]:
    """``data.decoder: torchcodec-cuda``: an H.264 video decoded on the GPU against TorchCodec's
    CPU decoding (NVDEC converts to RGB itself: a few levels apart at most), then a run that
    decodes on the GPU and trains as the CPU-decoded ``train bp`` row does."""
    if ctx.device.type != "cuda":
        raise CheckSkipped("decodes on a CUDA device only")
    if torchcodec_decoders() is None:
        raise CheckSkipped("TorchCodec is not installed (pip install 'sideways-cli[torchcodec]', "
                           "with FFmpeg's libraries)")
    video = ctx.work / "h264.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        generator = torch.Generator().manual_seed(0)
        for _ in range(16):
            frame = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=generator)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.numpy(), format="rgb24")))
        container.mux(stream.encode())
    frames = {device: TorchCodecDecoder(video, device=device).get(range(16)).cpu().int()
              for device in ("cpu", "cuda")}
    apart = int((frames["cuda"] - frames["cpu"]).abs().max())
    if apart > 4:
        raise CheckFailed(f"frames decoded on the GPU are up to {apart} levels from the CPU's")
    name = "train bp, decoding on the GPU"
    launcher.finish(launcher.train(name, ctx.sets(("data.decoder=torchcodec-cuda",
                                                   "data.num_workers=0")), "--mode", "bp"))
    loss = require_finite_loss(read_summary(ctx.run_dir(name)), name)
    return {"levels apart": apart, "loss": round(loss, 4)}


def check_determinism(model: str) -> Callable[[Context, Launcher], dict[str, Any]]:
    """Two ``--deterministic`` Sideways runs of a torchvision network, side by side."""
    def check(ctx: Context, launcher: Launcher) -> dict[str, Any]:
        short = model.split(":")[1]
        sets = ctx.sets(ctx.sizes.torchvision, (f"model.name={model}",))
        names = [f"{short} run {i}" for i in (1, 2)]
        for job in [launcher.train(name, sets, "--mode", "sideways", "--deterministic")
                    for name in names]:
            launcher.finish(job)
        first, second = (ctx.run_dir(name) for name in names)
        a, b = tensors_of(last_checkpoint(first)["model"]), tensors_of(last_checkpoint(second)["model"])
        if len(a) != len(b) or not all(torch.equal(x, y) for x, y in zip(a, b)):
            raise CheckFailed(f"weights differ between two runs (max relative "
                              f"{relative_difference(a, b):.1e})")
        if logged(first) != logged(second):
            raise CheckFailed("logged losses differ between two runs")
        for run in (first, second):  # 0.3-0.75 GB a run; a failing row keeps them to look at
            shutil.rmtree(run / "checkpoints")
        parameters = sum(t.numel() for t in a)
        return {"parameters": f"{parameters / 1e6:.1f}M", "weights": "bit-identical",
                "loss": round(read_summary(first)["train_loss"], 4)}
    return check


# ---- the engine rows (one fresh process per clip length) --------------------------------------

def measure_engine(device: torch.device, sizes: Sizes, clip_len: int) -> dict[str, dict[str, Any]]:
    """Per rule: frames/s (median over timed batches, after warm-up, interleaved with the other
    rules), the peak memory of one more batch, or the error that stopped it (out of memory)."""
    cfg, model = default_setup(list(sizes.engine))
    model.to(device)
    clips, labels = (t.to(device) for t in random_batch(cfg, clip_len))
    results: dict[str, dict[str, Any]] = {}
    working = {}
    for name, (rule_name, chunk) in ENGINE_RULES.items():
        rule = rule_for(rule_name, cfg, model, chunk)
        try:  # the first warm-up batch, alone: a rule that fails loses its own row only
            results[name] = {"probe_s": one_batch(rule, model, clips, labels, device)}
            working[name] = rule
        except RuntimeError as error:  # CUDA out of memory, an unsupported kernel
            results[name] = {"error": str(error).splitlines()[0][:300]}
            if device.type == "cuda":
                torch.cuda.empty_cache()  # what the failed batch held, for the next rules
    times = time_rules(working, model, clips, labels, sizes.repeats, device, sizes.warmup - 1)
    frames = clips.shape[0] * clips.shape[2]
    for name, rule in working.items():
        model.zero_grad(set_to_none=True)  # the last batch's gradients are not the next one's base
        with PeakMemory(device) as peak:
            one_batch(rule, model, clips, labels, device)
        results[name].update(frames_per_s=frames / median(times[name]), peak_mib=peak.peak_mb,
                             batch_s=times[name])
    return results


def one_batch(rule, model, clips: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    started = time.perf_counter()
    model.zero_grad(set_to_none=True)
    rule.train_batch(clips, labels, apply_update=lambda: None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def engine_rows(ctx: Context, clip_len: int) -> list[Row]:
    """The rows of one clip length, measured in a child process under the budget's timeout."""
    names = [f"engine T={clip_len} {name}" for name in ENGINE_RULES]
    started = time.monotonic()
    command = [sys.executable, __file__, "--engine", str(clip_len), "--device", ctx.device.type]
    try:
        timeout = ctx.budget.timeout(ctx.sizes.timeout_s)
        # a fixed mmap threshold: on the CPU the resident set then tracks the live tensors
        done = subprocess.run(command + ["--tiny"] * ctx.tiny, capture_output=True, text=True,
                              timeout=timeout, start_new_session=True, env=fresh_process_env())
        if done.returncode:
            raise CheckFailed(f"the measuring process exited {done.returncode}: "
                              f"{(done.stderr.strip().splitlines() or ['(no output)'])[-1][:300]}")
        results = json.loads(done.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        results = {name: {"error": "no result within the timeout"} for name in ENGINE_RULES}
    except CheckFailed as failure:
        results = {name: {"error": str(failure)} for name in ENGINE_RULES}
    seconds = time.monotonic() - started
    bp = results["bp"].get("frames_per_s")
    return [engine_row(row_name, results[name], bp, seconds / len(names))
            for row_name, name in zip(names, ENGINE_RULES)]


def engine_row(name: str, result: dict[str, Any], bp_frames_per_s: float | None,
               seconds: float) -> Row:
    if "error" in result:
        return Row(name, "FAIL", result["error"], seconds=seconds)
    figures = {"frames/s": round(result["frames_per_s"]), "peak MiB": round(result["peak_mib"], 1),
               "batch ms": round(median(result["batch_s"]) * 1000, 1)}
    if bp_frames_per_s:
        figures["x BP"] = round(result["frames_per_s"] / bp_frames_per_s, 2)
    return Row(name, figures=figures, seconds=seconds)


# ---- the multi-process checks ----------------------------------------------------------------

def check_reference(between_clips: str) -> Callable[[Context, Launcher], dict[str, Any]]:
    """The float64 single-process run the stage and replica rows are compared with (every
    executor trains to the same float64 weights, so one per pipeline mode serves all)."""
    def check(ctx: Context, launcher: Launcher) -> dict[str, Any]:
        name = f"reference {between_clips}"
        sets = ctx.sets(ctx.sizes.stages, (f"sideways.between_clips={between_clips}",))
        launcher.finish(launcher.train(name, sets, "--mode", "sideways"))
        ctx.runs[name] = ctx.run_dir(name)
        return {"loss": round(require_finite_loss(read_summary(ctx.run_dir(name)), name), 6)}
    return check


def check_parallel(stages: int, replicas: int, chunk: int,
                   between_clips: str) -> Callable[[Context, Launcher], dict[str, Any]]:
    def check(ctx: Context, launcher: Launcher) -> dict[str, Any]:
        reference = ctx.runs.get(f"reference {between_clips}")
        if reference is None:
            raise CheckFailed(f"no float64 reference: its row ({between_clips}) failed")
        name = f"P={stages} R={replicas} chunk {chunk} {between_clips}"
        sets = ctx.sets(ctx.sizes.stages, (
            f"sideways.between_clips={between_clips}", f"sideways.chunk={chunk}",
            f"parallel.stages={stages}", f"parallel.replicas={replicas}"))
        launcher.finish(launcher.train(name, sets, "--mode", "sideways"))
        run = ctx.run_dir(name)
        weights = relative_difference(tensors_of(last_checkpoint(reference)["model"]),
                                      tensors_of(last_checkpoint(run)["model"]))
        expected, got = logged(reference), logged(run)
        if [line[0] for line in expected] != [line[0] for line in got]:
            raise CheckFailed(f"logged steps {[line[0] for line in got]}, one process's "
                              f"{[line[0] for line in expected]}")
        losses = max(abs(a[1] - b[1]) / abs(a[1]) for a, b in zip(expected, got))
        if not (weights <= STAGE_TOLERANCE and losses <= STAGE_TOLERANCE):
            raise CheckFailed(f"weights {weights:.1e}, losses {losses:.1e} from one process's "
                              f"(tolerance {STAGE_TOLERANCE:g}, float64)")
        return {"weights vs P=1": f"{weights:.1e}", "losses vs P=1": f"{losses:.1e}"}
    return check


def check_pipeline_speed(ctx: Context, launcher: Launcher) -> dict[str, Any]:
    """The same float32 Sideways run (chunk 8, reset) in one process and in two stages, one
    after the other (alone on the GPUs)."""
    rates = {}
    for stages in (1, 2):
        name = f"speed P={stages}"
        sets = ctx.sets(ctx.sizes.pipeline, (f"parallel.stages={stages}",))
        launcher.finish(launcher.train(name, sets, "--mode", "sideways"))
        rates[stages] = steady_frames_per_s(ctx.run_dir(name), ctx.sizes.skip_steps)
    return {"P=1 frames/s": round(rates[1]), "P=2 frames/s": round(rates[2]),
            "P=2 / P=1": round(rates[2] / rates[1], 2)}


# ---- running the checks ----------------------------------------------------------------------

def phases(ctx: Context, jobs: int) -> list[tuple[list[Check | int], int]]:
    """Checks in the order they run: each phase's checks side by side (``jobs`` at once), but
    timings alone (an int is an engine clip length: its rows come from one child)."""
    single = [Check(f"train {mode}", check_training(mode)) for mode in ("bp", "sideways")]
    single += [Check("kill and resume, --deterministic", check_resume),
               Check("--amp (bf16)", check_amp), Check("decoding on the GPU", check_gpu_decoding)]
    single += [Check(f"--deterministic {model}", check_determinism(model))
               for model in ("torchvision:resnet18", "torchvision:r2plus1d_18")]
    references = [Check(f"P=1 float64 reference, {p}", check_reference(p), gpus=2)
                  for p in ("reset", "continuous")]
    parallel = [Check(f"2 stages, chunk {c}, {p}", check_parallel(2, 1, c, p), gpus=2)
                for c in (1, 8) for p in ("reset", "continuous")]
    parallel += [Check("2 replicas", check_parallel(1, 2, 8, "reset"), gpus=2),
                 Check("2 replicas x 2 stages", check_parallel(2, 2, 8, "reset"), gpus=4)]
    return [(single, jobs), ([Check("eval bp", check_eval)], 1), (list(ctx.sizes.lengths), 1),
            (references, jobs), (parallel, jobs),
            ([Check("P=1 vs P=2 frames/s", check_pipeline_speed, gpus=2)], 1)]


def missing_devices(gpus: int, ctx: Context) -> str | None:
    """Why a row of ``gpus`` processes (one GPU each) cannot run here; None if it can."""
    if gpus == 1:
        return None
    if ctx.device.type == "cpu":
        return None if ctx.parallel else "multi-process: --parallel runs it on the CPU"
    visible = torch.cuda.device_count()
    return None if visible >= gpus else f"needs {gpus} GPUs, {visible} visible"


def run_check(check: Check, ctx: Context) -> Row:
    row = Row(check.name, multi_gpu=check.gpus > 1)
    reason = missing_devices(check.gpus, ctx) or ctx.unasked(check.name)
    if reason:
        row.status, row.reason = "skip", reason
        return row
    started, launcher = time.monotonic(), Launcher(ctx)
    try:
        row.figures = check.run(ctx, launcher)
    except CheckFailed as failure:
        row.status, row.reason = "FAIL", str(failure)
    except CheckSkipped as skipped:
        row.status, row.reason = "skip", str(skipped)
    except Exception as error:  # a check's own bug, or an unreadable result: still one row
        row.status, row.reason = "FAIL", f"{type(error).__name__}: {error}".splitlines()[0][:300]
    finally:
        launcher.stop_all()
    row.seconds = time.monotonic() - started
    return row


def run_phase(checks: list[Check | int], jobs: int, ctx: Context) -> list[Row]:
    def one(item: Check | int) -> list[Row]:
        if isinstance(item, int):
            reason = ctx.unasked(f"engine T={item}")
            rows = [Row(f"engine T={item}", status="skip", reason=reason)] if reason \
                else engine_rows(ctx, item)
        else:
            rows = [run_check(item, ctx)]
        for row in rows:
            print(f"{ctx.budget.used_s():6.0f} s  {row.status:<4} {row.name}"
                  + (f": {row.reason}" if row.reason else ""), flush=True)
        return rows
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # the threads only wait on processes
        return [row for rows in pool.map(one, checks) for row in rows]


def generate_datasets(ctx: Context) -> None:
    """Every dataset the runs read, made once before any runs (concurrent runs would each
    render the same videos, and a killed run's timing would include it)."""
    sizes = ctx.sizes
    groups = [(), sizes.resume, sizes.torchvision]
    if missing_devices(2, ctx) is None:
        groups += [sizes.stages, sizes.pipeline]
    for group in groups:
        resolve_dataset(load_config(PRESET, ctx.sets(group)).data, progress=False)


def device_description(device: torch.device) -> str:
    if device.type != "cuda":
        return f"cpu ({os.cpu_count()} cores)"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)


def report(rows: list[Row], ctx: Context, json_path: Path) -> None:
    described = device_description(ctx.device)
    table = [[row.name, row.status + (f": {row.reason}" if row.reason else ""),
              ", ".join(f"{k} {v}" for k, v in row.figures.items()), row.seconds] for row in rows]
    payload = {"device": described, "torch": torch.__version__, "cuda": torch.version.cuda,
               "tiny": ctx.tiny, "budget_s": ctx.budget.total_s, "used_s": ctx.budget.used_s(),
               "sizes": asdict(ctx.sizes), "rows": [asdict(row) for row in rows]}
    emit(f"GPU check{' (tiny sizes)' if ctx.tiny else ''} on {described}, torch {torch.__version__}",
         ["check", "status", "figures", "s"], table, payload, json_path, whole=True)


def default_json(device: str, tiny: bool) -> Path:
    """A CPU or tiny run never overwrites the GPU's results."""
    suffix = "" if device == "cuda" and not tiny else f"_{device}" + "_tiny" * tiny
    return RESULTS / f"gpu_check{suffix}.json"


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (seconds per run on a CPU)")
    parser.add_argument("--parallel", action="store_true",
                        help="on the CPU, also the multi-process rows (gloo)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help="wall-clock allowance; every process's timeout is clipped to it")
    parser.add_argument("--jobs", type=int,
                        help="checks run side by side (default: 3 on CUDA, 2 on the CPU); timings "
                             "always run alone")
    parser.add_argument("--work", type=Path, default=Path("runs/gpu-check"),
                        help="runs, logs and data (its runs/ and logs/ are cleared first)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="run only the checks whose name contains TEXT (repeatable)")
    parser.add_argument("--engine", type=int, metavar="CLIP_LEN", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    sizes = TINY if args.tiny else FULL
    if args.device == "cuda" and not torch.cuda.is_available():
        build = torch.version.cuda or "none"
        print(f"no CUDA device (torch {torch.__version__}, CUDA build {build}): nothing was checked")
        return 0
    device = torch.device(args.device)
    if args.engine:  # the child process of engine_rows
        print(json.dumps(measure_engine(device, sizes, args.engine)))
        return 0
    ctx = Context(device, sizes, args.work.resolve(), Budget(args.budget_s), args.tiny,
                  args.parallel, args.only)
    for old in ("runs", "logs"):  # a run directory left from before would resume, not train
        shutil.rmtree(ctx.work / old, ignore_errors=True)
    generate_datasets(ctx)
    jobs = args.jobs or (3 if device.type == "cuda" else 2)
    print(f"GPU check on {device_description(device)}: budget {args.budget_s:.0f} s, "
          f"{jobs} checks at a time, runs and logs in {ctx.work}", flush=True)
    rows = [row for checks, at_once in phases(ctx, jobs)
            for row in run_phase(checks, at_once, ctx)]
    report(rows, ctx, args.json or default_json(args.device, args.tiny))
    failed = [row.name for row in rows if row.status == "FAIL"]
    print(f"budget: {ctx.budget.used_s():.0f} s of {ctx.budget.total_s:.0f} s used; "
          + (f"{len(failed)} failed: {', '.join(failed)}" if failed else "no check failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
