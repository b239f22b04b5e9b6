"""The training loop: batches in, a :class:`~sideways_cli.run.learner.StageLearner`
steps, evaluations, checkpoints and metrics out.

Every process of a job runs this same loop (SPMD): one process alone, or each of the replicas x
stages processes of a parallel job, each over its own slice of the network (``parallel/``).
They walk the same deterministic sampler, step together and agree on every statistic; only global
rank 0 logs and writes the run's shared files, and each process writes its own checkpoint shard.
It knows nothing of how gradients are made (the learner's rule fills ``param.grad`` and steps). A
run directory with a resumable ``checkpoints/last.pt`` is continued from it (``resume.py``),
ending exactly where an uninterrupted run would.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from sideways_cli.config import Config, to_dict
from sideways_cli.data.catalog import DatasetIndex, resolve_dataset
from sideways_cli.data.decode import auto_decoder
from sideways_cli.data.mixing import BatchMix
from sideways_cli.models.user import is_user_builder
from sideways_cli.parallel.resharding import with_learner
from sideways_cli.parallel.topology import Topology, join, launched, leave, single
from sideways_cli.reports.progress import Log, progress_bar, silent
from sideways_cli.reports.tables import write_json
from sideways_cli.run.build import DTYPES, build_network, fetch_named_weights
from sideways_cli.run.contract_gate import refuse_broken_builder
from sideways_cli.run.evaluate import evaluate_split, evaluation_line
from sideways_cli.run.evaluations import Evaluations
from sideways_cli.run.launch import run_as_processes
from sideways_cli.run.learner import StageLearner
from sideways_cli.run.loaders import data_loaders, forever, validate_training_memory
from sideways_cli.run.lock import RunLock
from sideways_cli.run.resume import PreviousRun, RunState, find_previous_run
from sideways_cli.run.rundir import LineLog, RunDir, read_jsonl, save_checkpoint, trim_jsonl
from sideways_cli.run.tracking import Trackers, evaluation_scalars, fidelity_scalars, training_scalars
from sideways_cli.support.errors import UserError
from sideways_cli.support.memory import PeakMemory
from sideways_cli.support.runtime import configure_backends, forward_autocast, seed_everything, to_device
from sideways_cli.support.stop_signals import Stopped, StopRequests


def train(cfg: Config, out_dir: Path, quiet: bool = False, log: Log = print,
          restart: bool = False) -> dict[str, Any] | None:
    """Train ``cfg`` into ``out_dir``; returns (and writes) the run's summary.

    If ``out_dir`` holds a resumable ``checkpoints/last.pt`` of this config, the run continues from
    it and ends exactly where an uninterrupted one would; a finished run only returns its summary.
    ``restart`` discards what ``out_dir`` holds first.

    With ``parallel.replicas`` or ``parallel.stages`` > 1 this process is one of a job started by
    torchrun (or by ``sideways train``, through the same launcher): each runs this loop over its
    own slice; only global rank 0 logs and returns the summary, the others return None.
    """
    configure_backends(cfg)  # before anything touches CUDA
    run = RunDir(out_dir)
    if cfg.parallel.stages * cfg.parallel.replicas == 1:
        with RunLock(run.path):
            return _train(cfg, run, quiet, log, restart, single(cfg))
    if not launched():  # start every process of the job, each training this config
        with RunLock(run.path):
            return run_as_processes(cfg, run, quiet, restart)
    topology = join(cfg)
    if not topology.is_writer:
        quiet, log = True, silent
    try:
        with _job_lock(run, topology):
            summary = _train(cfg, run, quiet, log, restart, topology)
    except Stopped as stopped:  # every process stopped after the same step: the group is whole
        leave()
        if not topology.is_writer or topology.reports_to_parent:  # the message is another's
            stopped.silent = True
        raise
    leave()  # not after a failure: tearing down a group with a dead member may hang
    return summary if topology.is_writer and not topology.reports_to_parent else None


@contextmanager
def _job_lock(run: RunDir, topology: Topology) -> Iterator[None]:
    """The run directory's lock for a job torchrun started: global rank 0 holds it for all (when
    ``sideways train`` started the job, it holds it itself), and every process learns whether it
    got it."""
    with ExitStack() as held:
        refusal = None
        if topology.is_writer and not topology.reports_to_parent:
            try:
                held.enter_context(RunLock(run.path))
            except UserError as exc:
                refusal = str(exc)
        refusal = topology.from_writer(refusal, "locking the run directory")
        if refusal is not None:
            raise UserError(refusal)
        yield


def _train(cfg: Config, run: RunDir, quiet: bool, log: Log, restart: bool,
           topology: Topology) -> dict[str, Any]:
    forward_autocast(topology.device, cfg.amp)  # refuses AMP where it cannot run, before any work
    validate_training_memory(cfg, topology.replicas, topology.device)  # clips that cannot fit, too
    if topology.is_writer:
        run.remove_temporaries()  # what a killed write left; the lock says none is under way
        if restart:
            run.discard()
    topology.barrier("waiting for the run directory")  # the others read it once discarded
    previous = find_previous_run(run, cfg, topology.device)
    if previous is not None and previous.summary is not None:
        log(f"{run.path} has finished its {previous.step} steps; not training it again "
            "(--restart discards it)")
        return previous.summary
    if topology.is_writer:
        run.write_config(cfg)
    # rank 0 first: a dataset generated or indexed on first use is prepared once, and
    # torchvision's weights named by model.weights downloaded once
    data = resolve_dataset(cfg.data, progress=not quiet) if topology.is_writer else None
    if topology.is_writer and previous is None and topology.distributed:
        fetch_named_weights(cfg)
    if cfg.data.decoder == "auto":
        log(f"decoding with {auto_decoder()}")
    topology.barrier("waiting for the dataset")
    if data is None:
        data = resolve_dataset(cfg.data, progress=False)
    # once: the gate checks what the learner trains; a resumed run takes its weights from its checkpoint
    network = build_network(cfg, len(data.classes), pretrained=previous is None)
    if topology.is_writer and is_user_builder(cfg.model.name):
        refuse_broken_builder(cfg, len(data.classes), network)  # a second, before any step is spent
    learner = StageLearner(cfg, topology, network)
    session = Session(cfg, run, data, learner, log, previous)
    try:
        # a step's waits are bounded by the hang timeout: start the first only once every process
        # has built its learner (importing torch's compiler stack, loading a checkpoint: seconds)
        topology.barrier("waiting for the other processes to be ready")
        session.train_steps(quiet)
        summary = session.finish(quiet)
    except Stopped:
        session.close("stopped")
        raise
    except BaseException:
        session.close("failed")
        raise
    session.close("finished")
    log(evaluation_line(summary["steps"], cfg.train.steps, session.val, summary["wall_s"], cfg.mode)
        + f", {summary['frames_per_s']:.0f} frames/s")
    return summary


class Session:
    """One start of a run on one process: the steps not yet done, their logs, evaluations and
    checkpoints, then the final evaluation and the summary. Every process of a job runs one, in
    step with the others (the first stage of each replica on that replica's shard of the data);
    only global rank 0's writes the run's shared files."""

    def __init__(self, cfg: Config, run: RunDir, data: DatasetIndex, learner: StageLearner,
                 log: Log, previous: PreviousRun | None):
        self.cfg, self.run, self.data, self.learner, self.log = cfg, run, data, learner, log
        self.topology = topology = learner.topology
        self.device, self.autocast = topology.device, learner.autocast
        self.writer = topology.is_writer
        self.state = previous.state if previous is not None else RunState()
        self.started = time.perf_counter() - self.state.wall_s  # wall_s: over every start
        self.train_loader, self.val_loader = data_loaders(cfg, data, self.state.data_position,
                                                          (topology.replica, topology.replicas),
                                                          self.device)
        seed_everything(cfg.seed + topology.stage)  # each stage its own stream (dropout)
        self.mix = BatchMix(cfg.data.augment.mixup, cfg.data.augment.cutmix, len(data.classes))
        self.first_step, kept_rows = 1, None
        if previous is None and self.writer:
            run.fidelity.unlink(missing_ok=True)  # a start that never checkpointed
        if previous is not None:
            learner.load(previous.checkpoint)
            self.train_loader.failed.update(self.state.unreadable)  # reported once, over every start
            self.first_step = previous.step + 1
            log(f"resuming {run.path} from step {previous.step}")
            if self.writer:  # a kill after the checkpoint may have logged steps to be redone
                trim_jsonl(run.metrics, previous.step)
                trim_jsonl(run.fidelity, previous.step)
            # the checkpoint at the last step comes before the final evaluation, which is redone
            final = previous.step >= cfg.train.steps
            kept_rows = previous.step - final
        self.evaluations = Evaluations(cfg, run, self.started, self.state, kept_rows, self.writer)
        # the run's last step: train.steps, or the one early stopping ended it at
        self.last_step = previous.step if self.evaluations.exhausted() else cfg.train.steps
        self.val: dict[str, float] = {}
        self.trackers = self._trackers(kept_rows or 0)

    def _trackers(self, kept: int) -> Trackers:
        """The live trackers, continuing from step ``kept``: the metrics.jsonl records past it (the
        final step's, when the final evaluation is redone) are logged again after the purge."""
        trackers = Trackers(self.cfg, self.run, kept, self.writer)
        if self.writer and trackers.live and kept:
            for record in read_jsonl(self.run.metrics):
                if record["step"] > kept:
                    trackers.scalars(record["step"], training_scalars(record))
        return trackers

    def close(self, outcome: str) -> None:
        """Stop the loaders' workers now (none outlives the run) and end the trackers' runs as
        ``outcome`` (finished, stopped, failed)."""
        self.train_loader.close()
        self.val_loader.close()
        self.trackers.close(outcome)

    def train_steps(self, quiet: bool) -> None:
        """Steps first_step .. train.steps: train, log, evaluate, checkpoint, as the config says."""
        cfg, state = self.cfg, self.state
        # only the first stage reads clips; the others know the batch's shape from the config
        batches = forever(self.train_loader) if self.topology.is_first else None
        with ExitStack() as stack:
            metrics = (stack.enter_context(LineLog(self.run.metrics, fresh=self.first_step == 1))
                       if self.writer else None)
            bar = stack.enter_context(progress_bar(quiet))
            self.memory = stack.enter_context(PeakMemory(self.device))
            stops = stack.enter_context(StopRequests(self.log))
            task = bar.add_task(f"train {cfg.mode}", total=cfg.train.steps,
                                completed=self.first_step - 1, info="") if bar else None
            if state.pending_evaluation:  # stopped by a signal before this step's evaluation
                self.evaluate(self.first_step - 1, bar)
            for step in range(self.first_step, self.last_step + 1):
                stop = self.train_step(step, batches, stops.signum)
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    record = self.record(step)  # on every process: it gathers their peaks
                    if metrics is not None:
                        metrics.append(json.dumps(record))
                    self.trackers.scalars(step, training_scalars(record))
                evaluates = bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0 \
                    and step < cfg.train.steps
                if stop:  # every process of a job stops after this same step
                    state.pending_evaluation = evaluates  # the restarted run evaluates it first
                    self.checkpoint(step)
                    raise Stopped(stop, step)
                if evaluates:
                    self.evaluate(step, bar)
                if bar:
                    bar.update(task, advance=1, info=f"loss {state.loss():.3f}")
                if step == self.last_step:  # train.steps, or early stopping's: finish() checkpoints it
                    break
                every = cfg.train.checkpoint_every
                if every and step % every == 0 and step < cfg.train.steps:
                    self.checkpoint(step)
            self.update_peaks()  # training's, not the final evaluation's

    def train_step(self, step: int, batches: Iterator[dict] | None, stop: int) -> int:
        """The step's clips through the learner, train.accumulate batches of them; the time spent
        waiting for them and training on them (not measuring fidelity, when due, on the first
        batch). Returns the stop signal the job agrees on after the step, given this process's
        (0: none)."""
        state, accumulate, started = self.state, self.cfg.train.accumulate, time.perf_counter()
        parts: list[tuple] = [(None, None)] * accumulate
        if batches is not None:
            clips, labels = self.next_clips(batches)
            parts = list(zip(clips.chunk(accumulate), labels.chunk(accumulate)))
        state.wait_s += time.perf_counter() - started
        state.data_position = self.train_loader.loader.batch_sampler.advance(state.data_position)
        every = self.cfg.train.fidelity_every
        if every and step % every == 0:  # every replica, so that none waits on rank 0's; it logs
            rows = self.learner.fidelity(*parts[0])  # its share of the batch
            if self.writer:
                self.record_fidelity(step, rows)
        losses, agreed = [], 0
        computing = time.perf_counter()
        for batch_in_step, (clips, labels) in enumerate(parts):
            stats, stopped = self.learner.train_batch(clips, labels, stop, batch_in_step)
            agreed = agreed or stopped
            state.frames_seen += stats.frames
            losses.append(stats.loss)
        state.compute_s += time.perf_counter() - computing
        state.updates += stats.updates  # the step's last batch made its updates
        # the mean over the step's batches, equal in size: the loss of their clips together
        state.recent = (state.recent + [sum(losses) / len(losses)])[-self.cfg.train.log_every:]
        # the step's norm before clipping; none when no gradient was anywhere (a continuous run's
        # first messages still on their way down, where the stages of a job still step together)
        norm = self.learner.grad_norm.item() if self.learner.grad_norm is not None else 0.0
        if norm > 0:
            state.grad_norms = (state.grad_norms + [norm])[-self.cfg.train.log_every:]
        return agreed

    def next_clips(self, batches: Iterator[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's clips and labels on the device (data.batch_size x train.accumulate clips,
        this replica's share of them); with MixUp or CutMix, mixed, and the labels class
        probabilities in the run's precision."""
        batch = next(batches)
        clips = to_device(batch["clip"], self.device, DTYPES[self.cfg.precision])
        labels = to_device(batch["label"], self.device)
        if self.mix.on:
            sampler = self.train_loader.loader.batch_sampler
            first = len(clips) * self.topology.replica  # where this share starts in the step's
            clips, labels = self.mix(clips, labels, self.cfg.seed,
                                     sampler.normalise(self.state.data_position), first)
        return clips, labels

    def record_fidelity(self, step: int, rows: list[dict]) -> None:
        """A line of fidelity.jsonl, and the trackers' fidelity/ scalars."""
        with LineLog(self.run.fidelity) as log:
            log.append(json.dumps({"step": step, "modules": rows}))
        self.trackers.scalars(step, fidelity_scalars(rows))

    def update_peaks(self) -> None:
        self.state.add_peaks(self.topology.peaks_mb(self.memory.read()))

    def record(self, step: int) -> dict[str, Any]:
        """A line of metrics.jsonl."""
        state = self.state
        self.update_peaks()
        norm = {"grad_norm": sum(state.grad_norms) / len(state.grad_norms)} if state.grad_norms else {}
        return {"step": step, "loss": state.loss(), **norm, "lr": self.learner.trained_lr,
                "frames_seen": state.frames_seen, "frames_per_s": state.frames_seen / state.compute_s,
                "data_wait_share": state.wait_s / (state.wait_s + state.compute_s), **state.peaks(),
                "wall_s": time.perf_counter() - self.started}

    def validation(self, bar) -> dict[str, float]:
        """The validation metrics, on every process (each replica's first stage evaluates its
        share of the split, through its stages)."""
        return self.learner.evaluated(lambda network: evaluate_split(
            self.cfg, network, self.val_loader, self.data, self.device, "val", self.autocast, bar,
            self.topology.across))

    def evaluate(self, step: int, bar) -> None:
        """An evaluation during training, the checkpoints it earns and, with
        ``train.early_stop_patience`` run out, the end of the training at ``step``."""
        self.val = self.validation(bar)
        self.trackers.scalars(step, evaluation_scalars(self.val))
        self.state.pending_evaluation = False
        self.evaluations.record(step, self.state.frames_seen, self.state.loss(), self.val,
                                lambda which: self.save(which, step))
        self.log(evaluation_line(step, self.cfg.train.steps, self.val,
                                 time.perf_counter() - self.started))
        if self.evaluations.exhausted():
            self.last_step = step
            self.log(f"stopping early at step {step}: {self.cfg.train.early_stop_patience} "
                     f"evaluations in a row without a better {self.evaluations.monitor}")

    def save(self, which: str, step: int, **extra: Any) -> None:
        """Checkpoint ``which`` (last, best) at ``step``, by every process: its learner's part;
        ``extra`` (``resume``: the run's state, ``summary``) goes with it.

        One process writes the ordinary checkpoint. In a parallel job each writes its own shard,
        all wait for all, then rank 0 writes ``which``.pt naming them: until that rename the old
        checkpoint and its shards stand whole, so a kill at any point leaves one to resume from."""
        payload = {"step": step, "config": to_dict(self.cfg), "classes": self.data.classes, **extra}
        shard = self.learner.shard(resuming="resume" in extra)
        path, topology = self.run.checkpoint(which), self.topology
        if not topology.distributed:
            save_checkpoint(with_learner(payload, shard), path)
            return
        save_checkpoint(shard, self.run.shard(which, step, topology.rank))
        topology.barrier(f"saving the {which} checkpoint")
        if not self.writer:
            return
        ranks = range(topology.replicas * topology.stages)
        save_checkpoint({**payload, "shards": [self.run.shard(which, step, r).name for r in ranks],
                         "topology": {"replicas": topology.replicas, "stages": topology.stages}},
                        path)
        self.run.drop_shards_before(which, step)

    def checkpoint(self, step: int, **extra: Any) -> None:
        """checkpoints/last.pt with what a restart needs to continue as if never stopped (the
        learner adds its rule's registers)."""
        state = self.state
        state.wall_s = time.perf_counter() - self.started
        state.unreadable = dict(self.train_loader.failed)
        self.trackers.flush()  # what was logged up to here outlives a kill: a resume keeps it
        self.save("last", step, resume=state.to_checkpoint(self.device), **extra)

    def finish(self, quiet: bool) -> dict[str, Any]:
        """The final evaluation and the summary (after a last checkpoint, so that a kill during a
        long final evaluation keeps the training)."""
        cfg, state, steps = self.cfg, self.state, self.last_step
        stopped_early = steps < cfg.train.steps  # its evaluation at that step is recorded already
        if self.first_step <= steps:
            self.checkpoint(steps)
        with progress_bar(quiet) as bar:
            self.val = self.validation(bar)
        self.trackers.scalars(steps, evaluation_scalars(self.val))
        early = {"stopped_early": True} if stopped_early else {}
        summary = {
            "mode": cfg.mode, "task": cfg.task, "model": cfg.model.name, "dataset": cfg.data.dataset,
            "seed": cfg.seed, "steps": steps, **early, "updates": state.updates,
            "frames_seen": state.frames_seen, "train_loss": state.loss(), **self.val,
            "frames_per_s": state.frames_seen / state.compute_s,
            "data_wait_share": state.wait_s / (state.wait_s + state.compute_s),
            **state.peaks(), "wall_s": time.perf_counter() - self.started,
        }
        if not stopped_early:
            self.evaluations.record(steps, state.frames_seen, summary["train_loss"], self.val,
                                    lambda which: self.save(which, steps, summary=summary))
        self.checkpoint(steps, summary=summary)
        if self.writer:
            write_json(self.run.summary, summary)
        return summary
