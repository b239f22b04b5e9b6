"""The ``sideways`` command line: parse, call, print. User mistakes become one line and exit 2."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from sideways_cli import comparison
from sideways_cli.build import build_network, resolve_config
from sideways_cli.check import (balance_lines, check_network, contract_table, costs_table,
                                failure_line, not_applicable_lines)
from sideways_cli.config import Config, from_dict
from sideways_cli.contract import causes
from sideways_cli.data import catalog
from sideways_cli.data.decode import DecodeError
from sideways_cli.data.download import DOWNLOADABLE, download_dataset
from sideways_cli.distributed.links import StageFailure
from sideways_cli.engine.losses import OBJECTIVES
from sideways_cli.engine.probes import VIDEO_KINDS
from sideways_cli.errors import UserError, print_user_error
from sideways_cli.evaluate import evaluate_split, evaluate_with_confusion
from sideways_cli.fidelity import fidelity_batch, gradient_fidelity
from sideways_cli.loaders import eval_loader
from sideways_cli.plots import confusion_png
from sideways_cli.progress import progress_bar
from sideways_cli.report import compare_table, eval_table, fidelity_table, stream_table, write_json
from sideways_cli.rundir import RunDir
from sideways_cli.runtime import configure_backends, forward_autocast, resolve_device
from sideways_cli.stream import as_dicts, prepare, run_stream, stream_psnr, synthetic_stream, video_stream
from sideways_cli.train import train as run_training

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train and compare video networks with backprop (bp) or Sideways.")
console = Console()
err_console = Console(stderr=True)

PRESET = Path("experiments") / "synthetic.yaml"
ConfigArg = Annotated[Optional[Path], typer.Argument(
    help="YAML config; defaults to experiments/synthetic.yaml, the embedded experiment.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a config key, e.g. --set train.lr=0.1 (repeatable).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed (overrides config 'seed').")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (for CI).")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="auto | cpu | cuda (overrides config 'device').")]
DeterministicOpt = Annotated[Optional[bool], typer.Option(
    "--deterministic/--no-deterministic",
    help="Deterministic algorithms only: the same numbers every run (config 'deterministic').")]
AmpOpt = Annotated[Optional[bool], typer.Option(
    "--amp/--no-amp", help="bf16 autocast for the forward passes (config 'amp').")]
RestartOpt = Annotated[bool, typer.Option(
    "--restart", help="Discard what the run directory holds and train from scratch.")]


def default_config_path() -> Path | None:
    """The embedded experiment: ./experiments/synthetic.yaml, else the copy beside the package."""
    for candidate in (PRESET, Path(__file__).resolve().parents[1] / PRESET):
        if candidate.is_file():
            return candidate
    return None


def overrides(sets: list[str] | None, **flags) -> list[str]:
    """--set, then the dedicated flags (None: not given) as the --set they stand for."""
    return list(sets or []) + [f"{key}={str(value).lower() if isinstance(value, bool) else value}"
                               for key, value in flags.items() if value is not None]


def resolve(config: Path | None, sets: list[str] | None, seed: int | None, mode: str | None = None,
            device: str | None = None, deterministic: bool | None = None,
            amp: bool | None = None) -> Config:
    """The config file, then --set, then the dedicated flags; checked by every layer."""
    return resolve_config(config if config is not None else default_config_path(),
                          overrides(sets, seed=seed, mode=mode, device=device,
                                    deterministic=deterministic, amp=amp))


def print_whole(renderable) -> None:
    """A terminal's width is a real limit; a log file's or a pipe's is not, so there a wide table
    (a sweep adds columns) keeps every value rather than being cut to 80 columns."""
    from rich.measure import Measurement

    if console.is_terminal:
        console.print(renderable)
        return
    natural = Measurement.get(console, console.options.update_width(10_000), renderable).maximum
    Console(width=max(console.width, natural), file=console.file).print(renderable)


def _log(quiet: bool):
    return (lambda msg: None) if quiet else (lambda msg: console.print(msg))


@app.command()
def train(
    config: ConfigArg = None,
    mode: Annotated[Optional[str], typer.Option(help="bp | sideways (overrides config 'mode').")] = None,
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Run directory (default runs/<config>-<mode>); if it holds an unfinished run of the "
             "same config, training resumes from its last checkpoint.")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    deterministic: DeterministicOpt = None,
    amp: AmpOpt = None,
    restart: RestartOpt = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the summary here.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Train one model; writes config.yaml, metrics.jsonl, summary.csv, checkpoints/last.pt (every
    train.checkpoint_every steps, resumable) and summary.json."""
    cfg = resolve(config, set_, seed, mode, device, deterministic, amp)
    run_dir = out or Path("runs") / f"{(config or PRESET).stem}-{cfg.mode}"
    summary = run_training(cfg, run_dir, quiet=quiet, log=_log(quiet), restart=restart)
    if summary is None:  # a stage of a job this command's own launcher started: it reports
        return
    if json_path:
        write_json(json_path, summary)
    if not quiet:
        console.print(compare_table([summary], title=f"run {run_dir}"))


@app.command("eval")
def evaluate_run(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by 'sideways train'.")],
    split: Annotated[str, typer.Option(help="val | train")] = "val",
    clips: Annotated[Optional[int], typer.Option(
        help="Clips per video (default: the run's eval.clips_per_video).")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the result here.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a run's last checkpoint: clip and video top-1/top-5, mean class accuracy, and a
    confusion-matrix PNG in the run directory (reconstruction: MSE and PSNR)."""
    if split not in ("val", "train"):
        raise UserError(f"--split must be val or train, got {split!r}")
    if clips is not None and clips < 1:
        raise UserError(f"--clips must be >= 1, got {clips}")
    run = RunDir(run_dir)
    ckpt = run.load_checkpoint()
    cfg = from_dict(ckpt["config"], str(run.checkpoint()))
    configure_backends(cfg)  # evaluated as the run was trained
    device = resolve_device(cfg.device)
    autocast = forward_autocast(device, cfg.amp)
    data = catalog.resolve_dataset(cfg.data, progress=not quiet)
    model = build_network(cfg, len(ckpt["classes"]), pretrained=False)
    model.load_state_dict(ckpt["model"])
    views = clips or cfg.eval.clips_per_video
    views_text = f"{views} clips x 1 centre crop per video"
    loader = eval_loader(cfg, data, split, views, device=device)
    result = {"run": str(run_dir), "mode": cfg.mode, "task": cfg.task, "split": split,
              "clips_per_video": views}
    figure = None
    with progress_bar(quiet) as bar:
        if cfg.task == "reconstruct":
            metrics = evaluate_split(cfg, model.to(device), loader, data, device, split, autocast, bar)
        else:
            metrics, confusion = evaluate_with_confusion(model.to(device), loader, len(data.split(split)),
                                                         len(ckpt["classes"]), device, split, autocast, bar,
                                                         chunk=cfg.eval.chunk)
            figure = run.confusion(split)
    if figure:
        confusion_png(confusion, ckpt["classes"], figure,
                      title=f"{run_dir.name} ({cfg.mode}), {split}, {views_text}")
        result["confusion_png"] = str(figure)
    result.update(metrics)
    if json_path:
        write_json(json_path, result)
    console.print(eval_table(metrics, title=f"{run_dir} ({cfg.mode}), {split} split, {views_text}"))
    if figure:
        _log(quiet)(f"wrote {figure}")


@app.command()
def compare(
    config: ConfigArg = None,
    modes: Annotated[Optional[str], typer.Option(
        help="Comma-separated modes to train [default: bp,sideways].")] = None,
    set_: SetOpt = None,
    sweep: Annotated[Optional[list[str]], typer.Option(
        help="Train every mode at every value: KEY=V1,V2,... (repeatable: the grid of all).")] = None,
    variant: Annotated[Optional[list[str]], typer.Option(
        help="One more run per mode with KEY=V[,KEY2=V2] on top of the config (repeatable).")] = None,
    runs: Annotated[Optional[list[Path]], typer.Option(
        "--runs", help="Compare this finished run directory instead of training (repeatable).")] = None,
    keys: Annotated[Optional[str], typer.Option(
        help="Config keys compared besides mode and the swept ones, K1,K2: table columns, no warning.")] = None,
    measure_fidelity: Annotated[bool, typer.Option(
        "--fidelity", help="Also measure each run's gradient fidelity at its final weights.")] = False,
    out: Annotated[Optional[Path], typer.Option(
        help="Output folder (default runs/compare-<config>; runs/compare with --runs); a run already "
             "there of the same config resumes, or is reused when finished.")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    deterministic: DeterministicOpt = None,
    amp: AmpOpt = None,
    restart: RestartOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train each mode (at each swept value) with the same seed, data and initial weights, or read
    finished runs; one table, compare.json, compare.csv, compare.png (and sweep.png)."""
    key_list = comparison.parse_keys(keys)
    if runs:
        comparison.refuse_with_runs({"CONFIG": config, "--modes": modes, "--set": set_,
                                     "--sweep": sweep, "--variant": variant, "--seed": seed,
                                     "--device": device, "--deterministic": deterministic,
                                     "--amp": amp, "--restart": restart or None})
        results, compared = comparison.read_runs(runs, key_list)
        swept: list[str] = []
        out_dir = out or Path("runs") / "compare"
    else:
        base = overrides(set_, seed=seed, device=device, deterministic=deterministic, amp=amp)
        out_dir = out or Path("runs") / f"compare-{(config or PRESET).stem}"
        plan = comparison.plan_training(config if config is not None else default_config_path(), base,
                                        comparison.parse_modes(modes), sweep or [], variant or [],
                                        key_list, out_dir)
        results = comparison.train_all(plan, quiet=quiet, log=console.print, restart=restart)
        compared, swept = plan.compared, plan.swept
    if measure_fidelity:
        comparison.add_fidelity(results, progress=not quiet)
    diffs = comparison.differences(results, compared)
    for line in comparison.difference_warnings(diffs):
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
    written = comparison.write_outputs(out_dir, results, compared, swept, diffs)
    print_whole(comparison.table(results, compared, with_fidelity=measure_fidelity))
    means = comparison.fold_means(results, swept)
    if means:
        folds = ", ".join(map(str, means[0]["folds"]))
        print_whole(compare_table(means, title=f"mean over folds {folds}",
                                  settings=[{"mode": m["mode"], **m["settings"]} for m in means]))
    console.print(f"wrote {', '.join(map(str, written))}", soft_wrap=True)


@app.command()
def check(
    config: ConfigArg = None,
    set_: SetOpt = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the result here.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Check that the configured network keeps the frame-step contract the engine relies on
    (tick path == clip, causal, per sample, Sideways == BP where it must be); print its
    per-module costs and the stage splits balance: auto would choose. Exit 1 if a property fails."""
    cfg = resolve(config, set_, None)
    configure_backends(cfg)  # the costs are measured as a run of this config would see them
    data = catalog.resolve_dataset(cfg.data, progress=not quiet)
    report = check_network(cfg, len(data.classes))
    if json_path:
        write_json(json_path, report.as_dict())
    print_whole(contract_table(report))
    for line in not_applicable_lines(report):
        console.print(f"[dim]n/a {line}[/]", highlight=False, soft_wrap=True)
    print_whole(costs_table(report))
    for line in balance_lines(report):
        console.print(line)
    for row in causes(report.rows):
        err_console.print(f"[red]error:[/] {failure_line(row)}", highlight=False, soft_wrap=True)
    if not report.passed:
        raise typer.Exit(1)


@app.command()
def fidelity(
    config: ConfigArg = None,
    set_: SetOpt = None,
    video: Annotated[str, typer.Option(help="natural | static | shuffled")] = "natural",
    run: Annotated[Optional[Path], typer.Option(help="Use this run's trained weights.")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the result here.")] = None,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Cosine similarity between each module's Sideways pseudo-gradient and its BP gradient."""
    if video not in VIDEO_KINDS:
        raise UserError(f"--video must be one of {', '.join(VIDEO_KINDS)}, got {video!r}")
    cfg = resolve(config, set_, seed)
    configure_backends(cfg)
    data = catalog.resolve_dataset(cfg.data, progress=not quiet)
    model = build_network(cfg, len(data.classes))
    if run is not None:
        model.load_state_dict(RunDir(run).load_checkpoint()["model"])
    model.to(resolve_device(cfg.device))
    clips, labels = fidelity_batch(cfg, data, video)
    rows = gradient_fidelity(model, clips, labels, OBJECTIVES[cfg.task])
    result = {"video": video, "model": cfg.model.name, "frame_stride": cfg.data.frame_stride,
              "clip_len": cfg.data.clip_len, "modules": rows}
    if json_path:
        write_json(json_path, result)
    console.print(fidelity_table(rows, title=f"gradient fidelity, {video} video, "
                                             f"{cfg.model.name}, stride {cfg.data.frame_stride}"))


@app.command()
def stream(
    config: Annotated[Optional[Path], typer.Argument(
        help="A reconstruction config; defaults to experiments/stream.yaml.")] = None,
    video: Annotated[Optional[Path], typer.Option(
        help="Stream this video file (default: synthetic shots cut together).")] = None,
    frames: Annotated[int, typer.Option(help="Frames in the stream (one per tick).")] = 1024,
    update_every: Annotated[int, typer.Option(help="Sideways updates the weights every N ticks.")] = 4,
    set_: SetOpt = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the result here.")] = None,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Learn to reconstruct a video as it streams in, one frame per tick: blocking BP drops the
    frames that arrive while it works; Sideways uses every one. Reports frames used and PSNR."""
    if frames < 2 or update_every < 1:
        raise UserError("--frames must be >= 2 and --update-every >= 1")
    cfg = resolve(config or Path("experiments") / "stream.yaml", set_, seed)
    if cfg.task != "reconstruct":
        raise UserError("sideways stream trains frame reconstruction: give a config with task: "
                        "reconstruct (experiments/stream.yaml)")
    configure_backends(cfg)
    device = resolve_device(cfg.device)
    if video is not None:
        if not video.is_file():
            raise UserError(f"--video {video} does not exist; give a video file")
        raw, held_out = video_stream(video, frames, cfg.data.decoder), None
    else:  # the held-out stream: other objects, colours and backgrounds, the same classes
        shot = cfg.data.synthetic.num_frames
        raw = synthetic_stream(frames, cfg.data.size, shot, cfg.seed)
        held_out = synthetic_stream(frames // 2, cfg.data.size, shot, cfg.seed + 1)
    with progress_bar(quiet) as bar:
        def ticks(mode: str):
            task = bar.add_task(f"stream {mode}", total=len(raw), info="ticks") if bar else None
            return (lambda n: bar.advance(task, n)) if bar else (lambda n: None)

        results = run_stream(cfg, lambda: build_network(cfg, 0), raw, update_every, device, held_out, ticks)
    initial = stream_psnr(build_network(cfg, 0).to(device), *prepare(raw, cfg.data.size), cfg.eval.chunk)
    result = {"video": str(video) if video else "synthetic", "initial_psnr": initial,
              "update_every": update_every, "learners": as_dicts(results)}
    if json_path:
        write_json(json_path, result)
    console.print(stream_table(result["learners"], title=f"streaming {len(raw)} frames, one per tick "
                                                         f"(initial weights: PSNR {initial:.2f} dB)"))


@app.command()
def download(
    dataset: Annotated[str, typer.Argument(help="ucf101 | hmdb51 | synthetic")],
    root: Annotated[Path, typer.Option(help="Data root; the dataset lands in ROOT/<dataset>/.")] = Path("data"),
    mirror: Annotated[Optional[str], typer.Option(
        help="Fetch each archive from MIRROR/<file name> instead of the official address.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Download, verify and extract a dataset, then index it; re-running only does what is left."""
    if dataset not in DOWNLOADABLE:
        raise UserError(f"unknown dataset {dataset!r}; choose from {', '.join(DOWNLOADABLE)}")
    if dataset == "synthetic" and mirror:
        raise UserError("--mirror does not apply to synthetic, which is generated here; drop it")
    folder = download_dataset(dataset, root, mirror=mirror, progress=not quiet)
    if dataset != "synthetic":  # the synthetic generator writes its own index
        catalog.index_dataset(dataset, root, progress=not quiet)
    _log(quiet)(f"{dataset} is ready in {folder}")


def main() -> None:
    try:
        app()
    except (UserError, DecodeError) as exc:
        print_user_error(exc)
        sys.exit(2)
    except StageFailure as exc:  # another stage died or hung; the launcher stops the rest
        print_user_error(exc)
        sys.stdout.flush()
        sys.stderr.flush()
        # no interpreter shutdown: it would tear down a process group whose peer is gone and
        # join data-loader workers, either of which can block; the launcher reaps what is left
        os._exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
