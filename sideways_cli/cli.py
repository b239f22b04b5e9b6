"""The ``sideways`` command line: parse, call, print. User mistakes become one line and exit 2."""

from __future__ import annotations

import os
import re
import sys
from contextlib import ExitStack
from importlib import metadata
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from rich.console import Console

from sideways_cli.analyses import comparison
from sideways_cli.analyses.check import (balance_lines, check_network, contract_table, costs_table,
                                         not_applicable_lines)
from sideways_cli.analyses.fidelity import fidelity_batch, load_run_weights
from sideways_cli.analyses.stream import as_dicts, prepare, run_stream, stream_psnr, synthetic_stream, video_stream
from sideways_cli.config import Config, to_dict
from sideways_cli.data import catalog
from sideways_cli.data.decode import DecodeError
from sideways_cli.data.download import DOWNLOADABLE, download_dataset
from sideways_cli.engine.contract import causes
from sideways_cli.engine.fidelity import gradient_fidelity
from sideways_cli.engine.losses import OBJECTIVES
from sideways_cli.engine.probes import VIDEO_KINDS
from sideways_cli.parallel.links import StageFailure
from sideways_cli.parallel.topology import end_process
from sideways_cli.reports.config_reference import key_rows
from sideways_cli.reports.plots import confusion_png
from sideways_cli.reports.progress import console_log, progress_bar
from sideways_cli.reports.tables import (compare_table, eval_table, fidelity_table, prediction_table,
                                         stream_table, write_csv, write_json)
from sideways_cli.run.build import build_network, resolve_config
from sideways_cli.run.contract_gate import failure_line
from sideways_cli.run.evaluate import evaluate_split, evaluate_videos, write_video_scores
from sideways_cli.run.loaders import eval_loader
from sideways_cli.run.lock import RunLock
from sideways_cli.run.predict import Predictor
from sideways_cli.run.rundir import RunDir
from sideways_cli.run.train import train as run_training
from sideways_cli.run.trained import load_trained
from sideways_cli.support.errors import UserError, print_user_error
from sideways_cli.support.help_format import HelpfulTyper, HelpGroup
from sideways_cli.support.paths import output_dir, output_file, output_per_input, preset
from sideways_cli.support.runtime import configure_backends, resolve_device
from sideways_cli.support.stop_signals import Stopped


def package_version() -> str:
    """The installed distribution's version; a source tree that was never installed reads its
    pyproject.toml."""
    try:
        return metadata.version("sideways-cli")
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE) \
            if pyproject.is_file() else None
        return f"{found[1]} (not installed)" if found else "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"sideways {package_version()}")
        raise typer.Exit()


app = HelpfulTyper(cls=HelpGroup, no_args_is_help=True, pretty_exceptions_enable=False,
           help="Train and compare video networks with backprop (bp) or Sideways.")
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _sideways(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print the installed version (sideways X.Y.Z) and exit.")] = False,
) -> None:
    pass


OVERRIDES = "Config overrides"  # the help panel of the options that stand for a --set
PRESET = Path("experiments") / "synthetic.yaml"
STREAM_PRESET = Path("experiments") / "stream.yaml"
ConfigArg = Annotated[Optional[Path], typer.Argument(
    metavar="CONFIG", show_default=str(PRESET),
    help="YAML config: a preset from experiments/ or your own. Without one, the embedded "
         "experiment: ./experiments/synthetic.yaml if there, else the copy installed with sideways.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", rich_help_panel=OVERRIDES,
    help="Override a config key, e.g. --set train.lr=0.1 (repeatable).")]
SeedOpt = Annotated[Optional[int], typer.Option(
    metavar="N", rich_help_panel=OVERRIDES, help="Random seed (overrides config 'seed').")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (for CI).")]
DeviceOpt = Annotated[Optional[str], typer.Option(
    metavar="DEVICE", rich_help_panel=OVERRIDES, help="auto | cpu | cuda (overrides config 'device').")]
DeterministicOpt = Annotated[Optional[bool], typer.Option(
    "--deterministic/--no-deterministic", rich_help_panel=OVERRIDES,
    help="Deterministic algorithms only: the same numbers every run (overrides config "
         "'deterministic').")]
AmpOpt = Annotated[Optional[bool], typer.Option(
    "--amp/--no-amp", rich_help_panel=OVERRIDES,
    help="bf16 autocast for the forward passes (overrides config 'amp').")]


def json_option(what: str):
    """The --json option of a command that writes ``what``."""
    return Annotated[Optional[Path], typer.Option(
        "--json", metavar="FILE", help=f"Also write {what} to this JSON file.")]


def overrides(sets: list[str] | None, **flags) -> list[str]:
    """--set, then the dedicated flags (None: not given) as the --set they stand for."""
    return list(sets or []) + [f"{key}={str(value).lower() if isinstance(value, bool) else value}"
                               for key, value in flags.items() if value is not None]


def resolve(config: Path | None, sets: list[str] | None, seed: int | None, mode: str | None = None,
            device: str | None = None, deterministic: bool | None = None,
            amp: bool | None = None, preset_name: str = PRESET.name) -> Config:
    """The config file (a preset without one), then --set, then the dedicated flags; checked by
    every layer."""
    return resolve_config(config if config is not None else preset(preset_name),
                          overrides(sets, seed=seed, mode=mode, device=device,
                                    deterministic=deterministic, amp=amp))


def checked_checkpoint(which: str) -> None:
    """--checkpoint of eval and predict: the run directory's last or best checkpoint, or one of
    the best that train.keep_best keeps (best_<step>)."""
    if which not in ("last", "best") and not re.fullmatch(r"best_\d+", which):
        raise UserError(f"--checkpoint must be last, best or best_<step> (train.keep_best), "
                        f"got {which!r}")


EMA_HELP = ("Use the checkpoint's moving average of the weights (a run trained with "
            "train.ema_decay) instead of the weights themselves.")


def print_whole(renderable) -> None:
    """A terminal's width is a real limit; a log file's or a pipe's is not, so there a wide table
    (a sweep adds columns) keeps every value rather than being cut to 80 columns."""
    from rich.measure import Measurement

    if console.is_terminal:
        console.print(renderable)
        return
    natural = Measurement.get(console, console.options.update_width(10_000), renderable).maximum
    Console(width=max(console.width, natural), file=console.file).print(renderable)


@app.command()
def train(
    config: ConfigArg = None,
    mode: Annotated[Optional[str], typer.Option(
        metavar="MODE", rich_help_panel=OVERRIDES, help="bp | sideways (overrides config 'mode').")] = None,
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option(
        metavar="DIR", show_default="runs/<config>-<mode>",
        help="Run directory. If it holds an unfinished run of the same config, training resumes "
             "from its last checkpoint; a finished one is reported, not trained again.")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    deterministic: DeterministicOpt = None,
    amp: AmpOpt = None,
    restart: Annotated[bool, typer.Option(
        "--restart", help="Discard what the run directory holds (checkpoints, logs, summary, "
                          "figures) and train from scratch.")] = False,
    json_path: json_option("the run's summary (as in summary.json)") = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="Print nothing but errors: no progress bars, log lines or final "
                              "table (for CI).")] = False,
) -> None:
    """Train one model with backprop or Sideways.

    The run directory gets config.yaml, metrics.jsonl, evaluations.csv (a row per evaluation),
    checkpoints/last.pt (resumable, written every train.checkpoint_every steps) and, when the run
    finishes, summary.json.
    """
    cfg = resolve(config, set_, seed, mode, device, deterministic, amp)
    if json_path:
        output_file(json_path, "--json")
    run_dir = output_dir(out or Path("runs") / f"{(config or PRESET).stem}-{cfg.mode}", "--out")
    summary = run_training(cfg, run_dir, quiet=quiet, log=console_log(console, quiet), restart=restart)
    if summary is None:  # a stage of a job this command's own launcher started: it reports
        return
    if json_path:
        write_json(json_path, summary)
    if not quiet:
        console.print(compare_table([summary], title=f"run {run_dir}"))


config_app = HelpfulTyper(cls=HelpGroup, no_args_is_help=True,
                          help="Show a resolved config, or every config key.")
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(config: ConfigArg = None, set_: SetOpt = None) -> None:
    """Print the config a run would train with, as YAML: the file after its bases, then --set."""
    cfg = resolve(config, set_, seed=None)
    typer.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False), nl=False)


@config_app.command("keys")
def config_keys() -> None:
    """Every config key: its default and the values it accepts, then what it means (the
    reference in docs/config.md)."""
    rows = key_rows()
    width = max(len(key) for key, *_ in rows)
    for key, default, accepts, meaning in rows:
        typer.echo(f"{key:<{width}}  {default}  ({accepts})\n    {meaning}")


@app.command("eval")
def evaluate_run(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", help="A run directory written by 'sideways train'.")],
    split: Annotated[str, typer.Option(metavar="SPLIT", help="The split to evaluate: val | train.")] = "val",
    checkpoint: Annotated[str, typer.Option(
        metavar="WHICH", help="last: the last checkpoint | best: the best evaluation's "
                              "(best.pt) | best_<step>: one of the best train.keep_best "
                              "keeps.")] = "last",
    ema: Annotated[bool, typer.Option("--ema", help=EMA_HELP)] = False,
    clips: Annotated[Optional[int], typer.Option(
        metavar="N", show_default="the run's eval.clips_per_video",
        help="Clips per video; a video's prediction averages their probabilities.")] = None,
    crops: Annotated[Optional[int], typer.Option(
        metavar="C", show_default="the run's eval.crops",
        help="Crops per clip: 1 (the centre) or 3 (along the long side: the 3-crop test).")] = None,
    dump: Annotated[Optional[Path], typer.Option(
        metavar="FILE", help="Also write every video's probabilities, label and prediction: "
                             "JSON for a .json name, else CSV.")] = None,
    json_path: json_option("the result (the metrics, split, checkpoint and views)") = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No progress bars or 'wrote' line; the table is still printed.")] = False,
) -> None:
    """Evaluate a run's checkpoint on a split.

    Classification: clip and video top-1/top-5 and mean class accuracy, and a confusion-matrix PNG
    written into the run directory (confusion_<split>.png). Reconstruction: MSE and PSNR.
    """
    if split not in ("val", "train"):
        raise UserError(f"--split must be val or train, got {split!r}")
    checked_checkpoint(checkpoint)
    if clips is not None and clips < 1:
        raise UserError(f"--clips must be >= 1, got {clips}")
    if crops is not None and crops not in (1, 3):
        raise UserError(f"--crops must be 1 or 3, got {crops}")
    for path, option in ((json_path, "--json"), (dump, "--dump")):
        if path:
            output_file(path, option)
    trained = load_trained(run_dir, checkpoint, ema=ema)
    cfg, model, device, autocast = trained.cfg, trained.model, trained.device, trained.autocast
    if crops is not None:
        cfg.eval.crops = crops
    if dump and cfg.task == "reconstruct":
        raise UserError("--dump writes class probabilities; a reconstruction run has none")
    data = catalog.resolve_dataset(cfg.data, progress=not quiet)
    views = clips or cfg.eval.clips_per_video
    crop_text = "1 centre crop" if cfg.eval.crops == 1 else f"{cfg.eval.crops} crops"
    views_text = f"{views} clips x {crop_text} per video"
    loader = eval_loader(cfg, data, split, views, device=device)
    result = {"run": str(run_dir), "mode": cfg.mode, "task": cfg.task, "split": split,
              "checkpoint": checkpoint, "ema": ema, "step": trained.step, "clips_per_video": views,
              "crops": cfg.eval.crops}
    figure = None
    with progress_bar(quiet) as bar:
        if cfg.task == "reconstruct":
            metrics = evaluate_split(cfg, model, loader, data, device, split, autocast, bar)
        else:
            scores = evaluate_videos(model, loader, len(data.split(split)), len(trained.classes),
                                     device, split, autocast, bar, chunk=cfg.eval.chunk)
            metrics = scores.metrics
            figure = trained.run.confusion(split)
    if figure:
        confusion_png(scores.confusion, trained.classes, figure,
                      title=f"{run_dir.name} ({cfg.mode}), {split}, {views_text}")
        result["confusion_png"] = str(figure)
    if dump:
        write_video_scores(dump, scores, [entry.path for entry in data.split(split)], trained.classes)
    result.update(metrics)
    if json_path:
        write_json(json_path, result)
    weights = f"{checkpoint}.pt" + (" (EMA)" if ema else "")
    console.print(eval_table(metrics, title=f"{run_dir} ({cfg.mode}), {weights} at step "
                                            f"{trained.step}, {split} split, {views_text}"))
    for path in (figure, dump):
        if path:
            console_log(console, quiet)(f"wrote {path}")


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", help="A run directory written by 'sideways train' (classification).")],
    videos: Annotated[list[Path], typer.Argument(metavar="VIDEO", help="Video files to label.")],
    checkpoint: Annotated[str, typer.Option(
        metavar="WHICH", help="last: the last checkpoint | best: the best evaluation's | "
                              "best_<step>: one of the best train.keep_best keeps.")] = "last",
    ema: Annotated[bool, typer.Option("--ema", help=EMA_HELP)] = False,
    top_k: Annotated[int, typer.Option("--top-k", metavar="K", help="Labels to report per video.")] = 5,
    clips: Annotated[Optional[int], typer.Option(
        metavar="N", show_default="the run's eval.clips_per_video",
        help="Clips per video, evenly spaced; the prediction averages their probabilities.")] = None,
    json_path: json_option("one record per video: its path and top-k labels with probabilities") = None,
    csv_path: Annotated[Optional[Path], typer.Option(
        "--csv", metavar="FILE", help="Also write a row per video: video, rank, label, "
                                      "probability.")] = None,
    per_frame: Annotated[bool, typer.Option(
        "--per-frame", help="Also stream each video through the causal network a frame at a "
                            "time, printing every frame's top-k as it arrives (bounded memory, "
                            "any length); --json records them too.")] = False,
    out_video: Annotated[Optional[Path], typer.Option(
        "--out-video", metavar="PATH",
        help="Also write each video as an MP4 with the running label (streamed as --per-frame) "
             "drawn on every frame: PATH.mp4 for one VIDEO, else a folder of <name>.mp4 files "
             "laid out as the videos' folders are.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Label videos with a trained run's top-k classes and their probabilities.

    A video is seen as 'sideways eval' sees one of its split (the run's clips, crops and
    transforms), so a validation video gets the probabilities eval computes for it. A video that
    is missing or cannot be decoded is named in one line and the others are still labelled; the
    exit status is then 1.
    """
    checked_checkpoint(checkpoint)
    if top_k < 1 or (clips is not None and clips < 1):
        raise UserError(f"--top-k and --clips must be >= 1, got {top_k} and {clips}")
    for path, option in ((json_path, "--json"), (csv_path, "--csv")):
        if path:
            output_file(path, option)
    labelled = output_per_input(out_video, videos, "--out-video", ".mp4") if out_video else {}
    predictor = Predictor(run_dir, checkpoint, ema=ema)
    predictions, failed = [], 0
    frames: dict[str, list[dict]] = {}
    for video in videos:
        try:
            predictions.append(predictor.predict(video, top_k, clips))
            if per_frame or out_video:
                frames[str(video)] = []
                for online in predictor.predict_frames(video, top_k, labelled.get(video)):
                    if not per_frame:
                        continue
                    labels = ", ".join(f"{label} {100 * p:.1f}%" for label, p in online.top)
                    console.print(f"{video} frame {online.frame}: {labels}", highlight=False,
                                  soft_wrap=True)
                    frames[str(video)].append({"frame": online.frame, "top": [
                        {"label": label, "probability": p} for label, p in online.top]})
                if out_video:
                    console_log(console, quiet)(f"wrote {labelled[video]}")
        except DecodeError as exc:
            print_user_error(exc)
            failed += 1
    if json_path:
        write_json(json_path, {"run": str(run_dir), "checkpoint": checkpoint, "step": predictor.step,
                               "videos": [{**p.as_dict(), **({"frames": frames[str(p.video)]}
                                                             if per_frame else {})}
                                          for p in predictions]})
    if csv_path:
        rows = [[str(p.video), rank, label, f"{prob:.6g}"] for p in predictions
                for rank, (label, prob) in enumerate(p.top, start=1)]
        write_csv(csv_path, ["video", "rank", "label", "probability"], rows)
    weights = f"{checkpoint}.pt" + (" (EMA)" if ema else "")
    console.print(prediction_table(predictions, title=f"{run_dir}, {weights} at step "
                                                      f"{predictor.step}"))
    if failed:
        raise typer.Exit(1)


@app.command()
def compare(
    config: ConfigArg = None,
    modes: Annotated[Optional[str], typer.Option(
        metavar="MODES", show_default="bp,sideways",
        help="Comma-separated modes to train: bp, sideways.")] = None,
    set_: SetOpt = None,
    sweep: Annotated[Optional[list[str]], typer.Option(
        metavar="KEY=V1,V2,...",
        help="Train every mode at every value of KEY (repeatable: the grid of all); bp trains "
             "once for all values of a sideways.* key.")] = None,
    variant: Annotated[Optional[list[str]], typer.Option(
        metavar="KEY=V[,KEY2=V2]",
        help="One more run per mode with these keys set on top of the config (repeatable).")] = None,
    runs: Annotated[Optional[list[Path]], typer.Option(
        "--runs", metavar="RUN_DIR",
        help="Compare this finished run directory instead of training (repeatable).")] = None,
    keys: Annotated[Optional[str], typer.Option(
        metavar="K1,K2",
        help="More config keys to show as table columns, besides mode and the swept ones; runs "
             "that differ in them draw no warning.")] = None,
    measure_fidelity: Annotated[bool, typer.Option(
        "--fidelity", help="Also measure each run's gradient fidelity at its final weights.")] = False,
    out: Annotated[Optional[Path], typer.Option(
        metavar="DIR", show_default="runs/compare-<config>; runs/compare with --runs",
        help="Output folder: compare.json, compare.csv, compare.png (and sweep.png) go here, and "
             "each run trains in a folder of its own inside it, resumed if unfinished, reused if "
             "finished.")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    deterministic: DeterministicOpt = None,
    amp: AmpOpt = None,
    restart: Annotated[bool, typer.Option(
        "--restart", help="Train every run from scratch, discarding what its folder holds.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train bp and Sideways alike and compare them in one table.

    Each mode (at each swept value) trains with the same seed, data and initial weights, each in a
    process of its own; with --runs, finished runs are read instead. Writes compare.json,
    compare.csv, compare.png and, with --sweep, sweep.png.
    """
    key_list = comparison.parse_keys(keys)
    with ExitStack() as held:  # one compare (or train) at a time in the output folder
        if runs:
            comparison.refuse_with_runs({"CONFIG": config, "--modes": modes, "--set": set_,
                                         "--sweep": sweep, "--variant": variant, "--seed": seed,
                                         "--device": device, "--deterministic": deterministic,
                                         "--amp": amp, "--restart": restart or None})
            out_dir = output_dir(out or Path("runs") / "compare", "--out")
            held.enter_context(RunLock(out_dir))
            results, compared = comparison.read_runs(runs, key_list)
            swept: list[str] = []
        else:
            base = overrides(set_, seed=seed, device=device, deterministic=deterministic, amp=amp)
            out_dir = out or Path("runs") / f"compare-{(config or PRESET).stem}"
            plan = comparison.plan_training(config if config is not None else preset(PRESET.name), base,
                                            comparison.parse_modes(modes), sweep or [], variant or [],
                                            key_list, out_dir)
            output_dir(out_dir, "--out")
            held.enter_context(RunLock(out_dir))  # its runs' own directories are locked in train
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
    json_path: json_option("the report (each property, the per-module costs, the stage splits)") = None,
    quiet: QuietOpt = False,
) -> None:
    """Check that the network keeps the frame-step contract the engine relies on.

    The properties: the tick path computes what the whole clip does, causal, per sample, and
    Sideways equals BP where it must. Also prints the per-module costs and the stage splits that
    parallel.balance: auto would choose. Exits 1 if a property fails.
    """
    cfg = resolve(config, set_, None)
    if json_path:
        output_file(json_path, "--json")
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
    video: Annotated[str, typer.Option(
        metavar="KIND",
        help="natural: clips as decoded | static: the first frame repeated | shuffled: the "
             "frames in random order.")] = "natural",
    run: Annotated[Optional[Path], typer.Option(
        metavar="RUN_DIR", help="Measure at this run's trained weights (its last checkpoint) "
                                "instead of fresh ones; CONFIG must build the same network.")] = None,
    json_path: json_option("the per-module cosines") = None,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Measure Sideways' pseudo-gradients against BP's gradients, module by module.

    Prints the cosine similarity of the two, per module, on a batch of validation clips.
    """
    if video not in VIDEO_KINDS:
        raise UserError(f"--video must be one of {', '.join(VIDEO_KINDS)}, got {video!r}")
    cfg = resolve(config, set_, seed)
    if json_path:
        output_file(json_path, "--json")
    configure_backends(cfg)
    data = catalog.resolve_dataset(cfg.data, progress=not quiet)
    # a run's weights replace every tensor: model.weights (a file, torchvision's) is not read
    model = build_network(cfg, len(data.classes), pretrained=run is None)
    if run is not None:
        load_run_weights(model, RunDir(run))
    model.to(resolve_device(cfg.device))
    clips, labels = fidelity_batch(cfg, data, video)
    rows = gradient_fidelity(model, clips, labels, OBJECTIVES[cfg.task], cfg.sideways.stash)
    result = {"video": video, "model": cfg.model.name, "frame_stride": cfg.data.frame_stride,
              "clip_len": cfg.data.clip_len, "modules": rows}
    if json_path:
        write_json(json_path, result)
    stash = f", stash {cfg.sideways.stash}" if cfg.sideways.stash != 0 else ""
    console.print(fidelity_table(rows, title=f"gradient fidelity, {video} video, "
                                             f"{cfg.model.name}, stride {cfg.data.frame_stride}{stash}"))


@app.command()
def stream(
    config: Annotated[Optional[Path], typer.Argument(
        metavar="CONFIG", show_default=str(STREAM_PRESET),
        help="A reconstruction config (task: reconstruct). Without one, the streaming preset: "
             "./experiments/stream.yaml if there, else the copy installed with sideways.")] = None,
    video: Annotated[Optional[Path], typer.Option(
        metavar="FILE", show_default="synthetic shots cut together",
        help="Stream the first --frames frames of this video file.")] = None,
    frames: Annotated[int, typer.Option(metavar="N", help="Frames in the stream (one per tick).")] = 1024,
    update_every: Annotated[int, typer.Option(
        metavar="N", help="Sideways updates the weights every N ticks; blocking BP updates after "
                          "each frame it takes.")] = 4,
    set_: SetOpt = None,
    json_path: json_option("the result (frames used and PSNR of each learner)") = None,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Learn to reconstruct a video as it streams in, one frame per tick.

    Blocking BP drops the frames that arrive while it works; Sideways uses every one. Reports the
    frames each learner used and its PSNR.
    """
    if frames < 2 or update_every < 1:
        raise UserError("--frames must be >= 2 and --update-every >= 1")
    cfg = resolve(config, set_, seed, preset_name=STREAM_PRESET.name)
    if cfg.task != "reconstruct":
        raise UserError("sideways stream trains frame reconstruction: give a config with task: "
                        "reconstruct (experiments/stream.yaml)")
    if video is not None and not video.is_file():
        what = "is a directory" if video.is_dir() else \
            "does not exist" if not video.exists() else "is not a regular file"
        raise UserError(f"--video {video} {what}; give a video file")
    if json_path:
        output_file(json_path, "--json")
    configure_backends(cfg)
    device = resolve_device(cfg.device)
    if video is not None:
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
    dataset: Annotated[str, typer.Argument(metavar="DATASET", help="ucf101 | hmdb51 | synthetic.")],
    root: Annotated[Path, typer.Option(
        metavar="ROOT",
        help="Data root, as the config's data.root: ucf101 and hmdb51 land in ROOT/<dataset>/ "
             "(archives in ROOT/<dataset>/downloads/, the index in ROOT/<dataset>/index/); "
             "synthetic in ROOT/synthetic-<hash>/, one folder per generator setting.")] = Path("data"),
    mirror: Annotated[Optional[str], typer.Option(
        metavar="URL", help="Fetch each archive from URL/<file name> instead of the official "
                            "address (ucf101, hmdb51).")] = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No progress bars or messages, errors aside (for CI).")] = False,
) -> None:
    """Download, verify and extract a dataset, then index it.

    Every step is done once: re-running after an interruption only does what is left. synthetic
    is generated here, with the default data.size and data.synthetic settings, not fetched.
    """
    if dataset not in DOWNLOADABLE:
        raise UserError(f"unknown dataset {dataset!r}; choose from {', '.join(DOWNLOADABLE)}")
    if dataset == "synthetic" and mirror:
        raise UserError("--mirror does not apply to synthetic, which is generated here; drop it")
    output_dir(root, "--root")
    folder = download_dataset(dataset, root, mirror=mirror, progress=not quiet)
    if dataset != "synthetic":  # the synthetic generator writes its own index
        catalog.index_dataset(dataset, root, progress=not quiet)
    console_log(console, quiet)(f"{dataset} is ready in {folder}")


def main() -> None:
    try:
        app()
    except SystemExit as exc:  # how typer ends every command, a success too
        end_process(exc.code)
    except (UserError, DecodeError) as exc:
        print_user_error(exc)
        end_process(getattr(exc, "exit_code", 2))  # a write the user cannot fix (EIO) is 1
    except Stopped as exc:  # a signal: the step in hand finished and checkpointed
        if not exc.silent:
            err_console.print(str(exc), highlight=False, soft_wrap=True)
        end_process(exc.exit_code)
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
