"""The training loop: data, optimizer, schedule, evaluation, checkpoint, metrics.

It knows nothing of how gradients are made: the rule fills ``param.grad`` and calls back
``apply_update`` whenever its schedule says the weights change. A run directory with a resumable
``checkpoints/last.pt`` is continued from it (``resume.py``).
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
from rich.progress import Progress

from sideways_cli.atomic import replace_atomically
from sideways_cli.config import Config, TrainConfig, save_config, to_dict
from sideways_cli.data.catalog import DatasetIndex, resolve_dataset
from sideways_cli.data.datasets import ClipDataset, GuardedLoader, build_loader
from sideways_cli.data.sampler import Position
from sideways_cli.data.transforms import ClipTransform, default_flip, default_resize
from sideways_cli.engine import SidewaysRule, make_rule
from sideways_cli.engine.losses import OBJECTIVES
from sideways_cli.engine.rule import BatchStats
from sideways_cli.errors import UserError
from sideways_cli.evaluate import evaluate
from sideways_cli.memory import PeakMemory
from sideways_cli.models import FrameStack, build_model
from sideways_cli.progress import progress_bar
from sideways_cli.reconstruction import evaluate_reconstruction
from sideways_cli.report import write_json
from sideways_cli.resume import (PreviousRun, discard_run, find_previous_run, last_checkpoint,
                                 restore_rng, rng_state, trim_csv, trim_jsonl)
from sideways_cli.runtime import Autocast, forward_autocast, resolve_device, set_deterministic

if TYPE_CHECKING:
    from sideways_cli.distributed.context import StageContext

Log = Callable[[str], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


IMAGE_CHANNELS = 3
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


def build_network(cfg: Config, num_classes: int) -> FrameStack:
    """The model, initialised from ``cfg.seed`` so every mode of a comparison starts equal; a
    reconstructor's outputs are the frames' channels, a classifier's the classes."""
    options: dict[str, Any] = {"temporal_kernel": cfg.model.temporal_kernel, "dropout": cfg.model.dropout}
    if cfg.model.width is not None:
        options["width"] = cfg.model.width
    if cfg.model.depth is not None:
        options["depth"] = cfg.model.depth
    torch.manual_seed(cfg.seed)
    outputs = IMAGE_CHANNELS if cfg.task == "reconstruct" else num_classes
    # initialised in float32 whatever the precision, so a float64 run starts from the same weights
    return build_model(cfg.model.name, outputs, **options).to(PRECISIONS[cfg.precision])


def make_optimizer(cfg: TrainConfig, model: FrameStack) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)


def make_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant or cosine decay to zero at ``train.steps``."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class LocalLearner:
    """The network, its rule, optimizer and schedule in this process. A P-stage run's first stage
    has a ``distributed.runner.DistributedLearner`` instead, with the same interface."""

    def __init__(self, cfg: Config, num_classes: int, device: torch.device, autocast: Autocast):
        self.cfg = cfg
        self.model = build_network(cfg, num_classes).to(device)
        self.rule = make_rule(cfg.mode, self.model, cfg.sideways.pipeline, cfg.sideways.update,
                              cfg.sideways.chunk, OBJECTIVES[cfg.task], autocast)
        self.optimizer = make_optimizer(cfg.train, self.model)
        self.schedule = make_schedule(cfg.train, self.optimizer)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def apply_update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_batch(self, clips: torch.Tensor, labels: torch.Tensor) -> BatchStats:
        stats = self.rule.train_batch(clips, labels, self.apply_update)
        self.schedule.step()
        return stats

    def save(self, path: Path, payload: dict[str, Any]) -> None:
        """The checkpoint: weights, optimizer, schedule, ``payload``; a ``resume`` entry in it
        gets the rule's state too."""
        ckpt = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), **payload}
        if "resume" in payload:
            ckpt["resume"] = {**payload["resume"], "rule": self.rule.state_dict()}
        save_atomic(ckpt, path)

    def load(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        layout = "pipeline" if isinstance(self.rule, SidewaysRule) else "registers"
        state = carried_rule_state(ckpt["resume"]["rule"], layout, self.cfg)
        if state is not None:
            self.rule.load_state_dict(state)

    def close(self) -> None:
        pass


def carried_rule_state(state: dict[str, Any], layout: str, cfg: Config) -> dict[str, Any] | None:
    """The rule's registers from a checkpoint, for an executor that keeps them under ``layout``
    ("pipeline": the tick rule, sideways.chunk 1; "registers": the chunked executor, any chunk
    above 1; a P-stage run's reassemble into its executor's); None when there is nothing to carry.
    With ``pipeline: reset`` and ``update: clip`` nothing survives a batch, so a checkpoint in the
    other layout starts the next one alike."""
    if cfg.mode == "bp" or not state or layout in state:
        return state
    if cfg.sideways.pipeline == "reset" and cfg.sideways.update == "clip":
        return None
    chunk = "sideways.chunk=1" if "pipeline" in state else "the sideways.chunk (above 1) it ran with"
    raise UserError(f"this checkpoint holds the pipeline registers of a run with another "
                    f"sideways.chunk; with pipeline {cfg.sideways.pipeline!r} resume it with {chunk}")


def data_loaders(cfg: Config, data: DatasetIndex,
                 start: Position = (0, 0)) -> tuple[GuardedLoader, GuardedLoader]:
    """Train and val loaders; each reports videos that fail to decode and stops the run when a
    split has more than data.max_bad_fraction of them (counting those found at indexing). The
    training batches start at (epoch, position) ``start``."""
    d = cfg.data
    train_tf = ClipTransform(size=d.size, resize=default_resize(d.dataset, d.resize),
                             flip=default_flip(d.dataset, d.flip))
    train_set = ClipDataset(data.train, clip_len=d.clip_len, frame_stride=d.frame_stride,
                            shuffle_frames=d.shuffle_frames, train=True, seed=cfg.seed,
                            decoder_backend=d.decoder, transform=train_tf)
    if len(train_set) < d.batch_size:
        raise UserError(f"data.batch_size={d.batch_size} is larger than the {len(train_set)} "
                        "training videos; lower data.batch_size")
    loader = build_loader(train_set, d.batch_size, shuffle=True, num_workers=d.num_workers,
                          seed=cfg.seed, drop_last=True, start=start)
    return _guarded(cfg, data, "train", loader), eval_loader(cfg, data, "val")


def eval_loader(cfg: Config, data: DatasetIndex, split: str = "val",
                clips_per_video: int | None = None) -> GuardedLoader:
    """Evaluation clips of ``split``: ``clips_per_video`` (default eval.clips_per_video) evenly
    spaced clips per video, centre crop, no flip."""
    d = cfg.data
    dataset = ClipDataset(data.split(split), clip_len=d.clip_len,
                          frame_stride=d.frame_stride, shuffle_frames=d.shuffle_frames, train=False,
                          clips_per_video=clips_per_video or cfg.eval.clips_per_video, seed=cfg.seed,
                          decoder_backend=d.decoder,
                          transform=ClipTransform(size=d.size, resize=default_resize(d.dataset, d.resize)))
    loader = build_loader(dataset, cfg.eval.batch_size, shuffle=False, num_workers=d.num_workers,
                          seed=cfg.seed, drop_last=False)
    return _guarded(cfg, data, split, loader)


# what an evaluation is ranked by (best.pt) and reported with, per task
PRIMARY_METRIC = {"classify": "val_video_top1", "reconstruct": "val_psnr"}


def evaluate_split(cfg: Config, model: FrameStack, loader: GuardedLoader, data: DatasetIndex,
                   device: torch.device, split: str = "val", autocast: Autocast | None = None,
                   bar: Progress | None = None) -> dict[str, float]:
    """The task's metrics on ``split``: accuracies for classify, MSE and PSNR for reconstruct."""
    autocast = autocast or forward_autocast(device, cfg.amp)
    if cfg.task == "reconstruct":
        transform = loader.loader.dataset.transform
        return evaluate_reconstruction(model, loader, device, transform.mean, transform.std, split,
                                       autocast, bar, chunk=cfg.eval.chunk)
    return evaluate(model, loader, len(data.split(split)), len(data.classes), device, split,
                    autocast, bar, chunk=cfg.eval.chunk)


def _guarded(cfg: Config, data: DatasetIndex, split: str, loader) -> GuardedLoader:
    return GuardedLoader(loader, split, listed=data.listed.get(split, len(loader.dataset.entries)),
                         bad_at_index=data.bad.get(split, 0),
                         max_bad_fraction=cfg.data.max_bad_fraction, report=data.bad_files)


def forever(loader: Iterable[dict]) -> Iterator[dict]:
    while True:
        yield from loader


def save_atomic(obj: Any, path: Path) -> None:
    """Write to a temporary file and rename, so a crash never leaves a half-written checkpoint."""
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))


class Evaluations:
    """Every evaluation of a run: a row of ``summary.csv`` each, and ``checkpoints/best.pt`` when
    the task's primary metric (video top-1, PSNR) is the best so far (ties keep the earlier,
    cheaper-to-reach one)."""

    RUN_KEYS = ("step", "frames_seen", "wall_s", "train_loss")
    TASK_KEYS = {"classify": ("val_clip_top1", "val_clip_top5", "val_video_top1", "val_video_top5",
                              "val_mean_class_acc"),
                 "reconstruct": ("val_mse", "val_psnr")}

    def __init__(self, out_dir: Path, started: float, task: str,
                 continued: tuple[int, float] | None = None):
        """``continued``: (the last step whose rows stand, the best primary metric so far) when a
        run resumes; the rows after that step are dropped."""
        self.path, self.best_path = out_dir / "summary.csv", out_dir / "checkpoints" / "best.pt"
        self.started = started
        self.keys = self.RUN_KEYS + self.TASK_KEYS[task]
        self.primary = PRIMARY_METRIC[task]
        self.best = -math.inf
        if continued is None:
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self.keys)
        else:
            kept, self.best = continued
            trim_csv(self.path, kept, self.keys)

    def record(self, step: int, frames_seen: int, train_loss: float, val: dict[str, float],
               save_best: Callable[[Path], None]) -> None:
        row = {"step": step, "frames_seen": frames_seen, "train_loss": train_loss,
               "wall_s": time.perf_counter() - self.started, **val}
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row[key] for key in self.keys])
        if val[self.primary] > self.best:
            self.best = val[self.primary]
            save_best(self.best_path)


def make_learner(cfg: Config, num_classes: int, device: torch.device, autocast: Autocast,
                 out_dir: Path, resume: Path | None, stage: StageContext | None):
    """This process's learner: the whole network, or (``stage`` set) stage 0 of a P-stage job."""
    if stage is None:
        return LocalLearner(cfg, num_classes, device, autocast)
    from sideways_cli.distributed.runner import DistributedLearner, stage_sizes

    sizes = stage_sizes(cfg, build_network(cfg, num_classes), device, autocast)
    return DistributedLearner(cfg, stage, num_classes, sizes, out_dir, resume)


def train(cfg: Config, out_dir: Path, quiet: bool = False, log: Log = print,
          restart: bool = False) -> dict[str, Any] | None:
    """Train ``cfg`` into ``out_dir``; returns (and writes) the run's summary.

    If ``out_dir`` holds a resumable ``checkpoints/last.pt`` of this config, the run continues from
    it and ends exactly where an uninterrupted one would; a finished run only returns its summary.
    ``restart`` discards what ``out_dir`` holds first.

    With ``parallel.stages`` > 1 this process is one stage of a job started by torchrun (or by
    ``sideways train``, through the same launcher): the first stage runs this loop, the others
    follow its commands and return None.
    """
    set_deterministic(cfg.deterministic)  # before anything touches CUDA
    stage = None
    if cfg.parallel.stages > 1:
        from sideways_cli.distributed.context import join, launched, leave
        from sideways_cli.distributed.launch import run_as_stages
        from sideways_cli.distributed.runner import follow

        if not launched():  # start one process per stage, each training this config
            return run_as_stages(cfg, out_dir, quiet, restart)
        stage = join(cfg)
        if not stage.is_first:
            follow(cfg, stage)
            leave()
            return None
    summary = _train(cfg, out_dir, quiet, log, restart, stage)
    if stage is not None:  # not after a failure: tearing down a group with a dead member may hang
        leave()
    return None if stage is not None and stage.reports_to_parent else summary


def _train(cfg: Config, out_dir: Path, quiet: bool, log: Log, restart: bool,
           stage: StageContext | None) -> dict[str, Any]:
    device = stage.device if stage is not None else resolve_device(cfg.device)
    autocast = forward_autocast(device, cfg.amp)  # refuses AMP where it cannot run
    if restart:
        discard_run(out_dir)
    previous: PreviousRun | None = find_previous_run(out_dir, cfg, device)
    if previous is not None and previous.summary is not None:
        log(f"{out_dir} has finished its {previous.step} steps; not training it again "
            "(--restart discards it)")
        if stage is not None:
            from sideways_cli.distributed.runner import start

            start(stage, {"finished": True})
        return previous.summary
    resumed = previous.checkpoint if previous is not None else None
    run: dict[str, Any] = resumed["resume"] if resumed else {
        "data_position": (0, 0), "recent": [], "frames_seen": 0, "updates": 0, "compute_s": 0.0,
        "wait_s": 0.0, "wall_s": 0.0, "peak_mem_mb": 0.0}
    started = time.perf_counter() - run["wall_s"]  # wall_s: time spent on the run, over every start
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    data = resolve_dataset(cfg.data, progress=not quiet)
    learner = make_learner(cfg, len(data.classes), device, autocast, out_dir,
                           last_checkpoint(out_dir) if resumed else None, stage)
    train_loader, val_loader = data_loaders(cfg, data, start=tuple(run["data_position"]))
    seed_everything(cfg.seed)
    first_step = 1
    if resumed:
        learner.load(resumed)
        restore_rng(run["rng"])
        train_loader.failed.update(run["unreadable"])  # reported once, counted once, over every start
        first_step = resumed["step"] + 1
        log(f"resuming {out_dir} from step {resumed['step']}")

    def save(path: Path, step: int, **extra: Any) -> None:
        learner.save(path, {"step": step, "config": to_dict(cfg), "classes": data.classes, **extra})

    def resume_state() -> dict[str, Any]:
        """What a restart needs besides the weights to continue as if never stopped (the
        learner adds its rule's registers)."""
        return {"rng": rng_state(device), "data_position": position, "recent": list(recent),
                "frames_seen": frames_seen, "updates": updates, "compute_s": compute_s,
                "wait_s": wait_s, "wall_s": time.perf_counter() - started, **peaks(),
                "best": evaluations.best, "device": device.type,
                "unreadable": dict(train_loader.failed)}

    def peaks() -> dict[str, Any]:
        """Peak memory over every start: this process's, or with stages each stage's and the
        largest of them (what must fit on one device)."""
        own = memory.read()
        if stage is None:
            return {"peak_mem_mb": max(run["peak_mem_mb"], own)}
        per_stage = learner.stage_peaks_mb(own)
        before = run.get("stage_peak_mem_mb")
        if before is not None and len(before) == len(per_stage):  # resumed with as many stages
            per_stage = [max(a, b) for a, b in zip(before, per_stage)]
        return {"peak_mem_mb": max(run["peak_mem_mb"], *per_stage), "stage_peak_mem_mb": per_stage}

    metrics_path = out_dir / "metrics.jsonl"
    continued = None
    if resumed:  # a kill after the checkpoint may have logged steps the resumed run will redo
        trim_jsonl(metrics_path, resumed["step"])
        # the checkpoint at the last step comes before the final evaluation, which is redone
        final = resumed["step"] >= cfg.train.steps
        continued = (resumed["step"] - final, run["best"])
    evaluations = Evaluations(out_dir, started, cfg.task, continued)
    recent: list[float] = list(run["recent"])
    frames_seen, updates = run["frames_seen"], run["updates"]
    compute_s, wait_s = run["compute_s"], run["wait_s"]
    position: Position = tuple(run["data_position"])
    sampler = train_loader.loader.batch_sampler
    val: dict[str, float] = {}
    batches = forever(train_loader)
    with metrics_path.open("a" if resumed else "w") as metrics, progress_bar(quiet) as bar, \
            PeakMemory(device) as memory:
        task = bar.add_task(f"train {cfg.mode}", total=cfg.train.steps, completed=first_step - 1,
                            info="") if bar else None
        for step in range(first_step, cfg.train.steps + 1):
            t0 = time.perf_counter()
            batch = next(batches)
            position = sampler.advance(position)
            clips = batch["clip"].to(device, PRECISIONS[cfg.precision])
            labels = batch["label"].to(device)
            t1 = time.perf_counter()
            stats = learner.train_batch(clips, labels)
            t2 = time.perf_counter()
            wait_s, compute_s = wait_s + t1 - t0, compute_s + t2 - t1
            frames_seen += stats.frames
            updates += stats.updates
            recent = (recent + [stats.loss])[-cfg.train.log_every:]
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                record = {"step": step, "loss": sum(recent) / len(recent),
                          "lr": learner.lr, "frames_seen": frames_seen,
                          "frames_per_s": frames_seen / compute_s,
                          "data_wait_share": wait_s / (wait_s + compute_s),
                          **peaks(), "wall_s": time.perf_counter() - started}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                val = evaluate_split(cfg, learner.model, val_loader, data, device, "val", autocast, bar)
                evaluations.record(step, frames_seen, sum(recent) / len(recent), val,
                                   lambda path: save(path, step))
                log(evaluation_line(step, cfg.train.steps, val, time.perf_counter() - started))
            if bar:
                bar.update(task, advance=1, info=f"loss {sum(recent) / len(recent):.3f}")
            every = cfg.train.checkpoint_every
            if every and step % every == 0 and step < cfg.train.steps:
                save(last_checkpoint(out_dir), step, resume=resume_state())
        peak = peaks()  # training's, not the final evaluation's
    if first_step <= cfg.train.steps:  # a kill during a long final evaluation keeps the training
        save(last_checkpoint(out_dir), cfg.train.steps, resume=resume_state())
    with progress_bar(quiet) as bar:
        val = evaluate_split(cfg, learner.model, val_loader, data, device, "val", autocast, bar)
    summary = {
        "mode": cfg.mode, "task": cfg.task, "model": cfg.model.name, "dataset": cfg.data.dataset, "seed": cfg.seed,
        "steps": cfg.train.steps, "updates": updates, "frames_seen": frames_seen,
        "train_loss": sum(recent) / len(recent), **val,
        "frames_per_s": frames_seen / compute_s, "data_wait_share": wait_s / (wait_s + compute_s),
        **peak, "wall_s": time.perf_counter() - started,
    }
    evaluations.record(cfg.train.steps, frames_seen, summary["train_loss"], val,
                       lambda path: save(path, cfg.train.steps, summary=summary))
    save(last_checkpoint(out_dir), cfg.train.steps, summary=summary, resume=resume_state())
    learner.close()
    write_json(out_dir / "summary.json", summary)
    log(evaluation_line(cfg.train.steps, cfg.train.steps, val, summary["wall_s"], cfg.mode)
        + f", {summary['frames_per_s']:.0f} frames/s")
    return summary


def evaluation_line(step: int, steps: int, val: dict[str, float], elapsed_s: float,
                    prefix: str = "") -> str:
    """The one line an evaluation prints: where, how good, how long the run has taken so far."""
    minutes, seconds = divmod(round(elapsed_s), 60)
    hours, minutes = divmod(minutes, 60)
    if "val_psnr" in val:
        headline = f"val PSNR {val['val_psnr']:.2f} dB, MSE {val['val_mse']:.4f}"
    else:
        headline = f"val clip top-1 {val['val_clip_top1']:.3f}, video top-1 {val['val_video_top1']:.3f}"
    return f"{prefix + ' ' if prefix else ''}step {step}/{steps}: {headline}, elapsed {hours}:{minutes:02d}:{seconds:02d}"
