"""The ``sideways`` command line: parse, call, print. User mistakes become one line and exit 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.console import Console

from sideways_cli.config import MODES, Config, from_dict, load_config
from sideways_cli.errors import UserError, print_user_error

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


def resolve(config: Path | None, sets: list[str] | None, seed: int | None, mode: str | None = None,
            device: str | None = None, deterministic: bool | None = None,
            amp: bool | None = None) -> Config:
    """The config file, then --set, then the dedicated flags (None: not given)."""
    overrides = list(sets or [])
    flags = {"seed": seed, "mode": mode, "device": device, "deterministic": deterministic, "amp": amp}
    overrides += [f"{key}={str(value).lower() if isinstance(value, bool) else value}"
                  for key, value in flags.items() if value is not None]
    return load_config(config if config is not None else default_config_path(), overrides)


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
    from sideways_cli.report import compare_table, write_json
    from sideways_cli.train import train as run_training

    cfg = resolve(config, set_, seed, mode, device, deterministic, amp)
    run_dir = out or Path("runs") / f"{(config or PRESET).stem}-{cfg.mode}"
    summary = run_training(cfg, run_dir, quiet=quiet, log=_log(quiet), restart=restart)
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
    confusion-matrix PNG in the run directory."""
    from sideways_cli.data.catalog import resolve_dataset
    from sideways_cli.evaluate import evaluate_with_confusion
    from sideways_cli.plots import confusion_png
    from sideways_cli.progress import progress_bar
    from sideways_cli.report import eval_table, write_json
    from sideways_cli.runtime import forward_autocast, resolve_device
    from sideways_cli.train import build_network, eval_loader

    if split not in ("val", "train"):
        raise UserError(f"--split must be val or train, got {split!r}")
    if clips is not None and clips < 1:
        raise UserError(f"--clips must be >= 1, got {clips}")
    path = run_dir / "checkpoints" / "last.pt"
    if not path.is_file():
        raise UserError(f"{path} not found; train first with 'sideways train --out {run_dir}'")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = from_dict(ckpt["config"], str(path))
    device = resolve_device(cfg.device)
    autocast = forward_autocast(device, cfg.amp)  # evaluated as the run was trained
    data = resolve_dataset(cfg.data, progress=not quiet)
    model = build_network(cfg, len(ckpt["classes"]))
    model.load_state_dict(ckpt["model"])
    views = clips or cfg.eval.clips_per_video
    with progress_bar(quiet) as bar:
        metrics, confusion = evaluate_with_confusion(model.to(device), eval_loader(cfg, data, split, views),
                                                     len(data.split(split)), len(ckpt["classes"]),
                                                     device, split, autocast, bar)
    figure = run_dir / f"confusion_{split}.png"
    views_text = f"{views} clips x 1 centre crop per video"
    confusion_png(confusion, ckpt["classes"], figure, title=f"{run_dir.name} ({cfg.mode}), {split}, {views_text}")
    result = {"run": str(run_dir), "mode": cfg.mode, "split": split, "clips_per_video": views,
              **metrics, "confusion_png": str(figure)}
    if json_path:
        write_json(json_path, result)
    console.print(eval_table(metrics, title=f"{run_dir} ({cfg.mode}), {split} split, {views_text}"))
    _log(quiet)(f"wrote {figure}")


@app.command()
def compare(
    config: ConfigArg = None,
    modes: Annotated[str, typer.Option(help="Comma-separated modes to train.")] = "bp,sideways",
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Output folder (default runs/compare-<config>); a run already there of the same config "
             "resumes, or is reused when finished.")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    deterministic: DeterministicOpt = None,
    amp: AmpOpt = None,
    restart: RestartOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train each mode with the same seed, data and initial weights; print one table."""
    from sideways_cli.data.catalog import resolve_dataset
    from sideways_cli.isolated import train_isolated
    from sideways_cli.report import compare_table, write_json

    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    for m in mode_list:
        if m not in MODES:
            raise UserError(f"--modes: unknown mode {m!r}; choose from {', '.join(MODES)}")
    out_dir = out or Path("runs") / f"compare-{(config or PRESET).stem}"
    configs = [resolve(config, set_, seed, m, device, deterministic, amp) for m in mode_list]
    resolve_dataset(configs[0].data, progress=not quiet)  # prepare (e.g. generate) the data once
    # each mode in its own process, so peak memory and speed are measured from the same start
    summaries = [train_isolated(cfg, out_dir / cfg.mode, quiet=quiet, restart=restart) for cfg in configs]
    write_json(out_dir / "compare.json", summaries)
    console.print(compare_table(summaries))
    console.print(f"wrote {out_dir / 'compare.json'}")


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
    from sideways_cli.data.catalog import resolve_dataset
    from sideways_cli.fidelity import VIDEO_KINDS, gradient_fidelity, make_video
    from sideways_cli.report import fidelity_table, write_json
    from sideways_cli.train import build_network, eval_loader

    if video not in VIDEO_KINDS:
        raise UserError(f"--video must be one of {', '.join(VIDEO_KINDS)}, got {video!r}")
    cfg = resolve(config, set_, seed)
    data = resolve_dataset(cfg.data, progress=not quiet)
    model = build_network(cfg, len(data.classes))
    if run is not None:
        path = run / "checkpoints" / "last.pt"
        if not path.is_file():
            raise UserError(f"{path} not found; --run takes a run directory written by 'sideways train'")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["model"])
    batch = next(iter(eval_loader(cfg, data)))
    clips = make_video(batch["clip"][: cfg.data.batch_size], video, seed=cfg.seed)
    rows = gradient_fidelity(model, clips, batch["label"][: cfg.data.batch_size])
    result = {"video": video, "model": cfg.model.name, "frame_stride": cfg.data.frame_stride,
              "clip_len": cfg.data.clip_len, "modules": rows}
    if json_path:
        write_json(json_path, result)
    console.print(fidelity_table(rows, title=f"gradient fidelity, {video} video, "
                                             f"{cfg.model.name}, stride {cfg.data.frame_stride}"))


@app.command()
def download(
    dataset: Annotated[str, typer.Argument(help="ucf101 | hmdb51 | synthetic")],
    root: Annotated[Path, typer.Option(help="Data root; the dataset lands in ROOT/<dataset>/.")] = Path("data"),
    mirror: Annotated[Optional[str], typer.Option(
        help="Fetch each archive from MIRROR/<file name> instead of the official address.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Download, verify and extract a dataset, then index it; re-running only does what is left."""
    from sideways_cli.data.download import DOWNLOADABLE, download_dataset

    if dataset not in DOWNLOADABLE:
        raise UserError(f"unknown dataset {dataset!r}; choose from {', '.join(DOWNLOADABLE)}")
    if dataset == "synthetic" and mirror:
        raise UserError("--mirror does not apply to synthetic, which is generated here; drop it")
    folder = download_dataset(dataset, root, mirror=mirror, progress=not quiet)
    if dataset != "synthetic":  # the synthetic generator writes its own index
        from sideways_cli.data.catalog import index_dataset

        index_dataset(dataset, root, progress=not quiet)
    _log(quiet)(f"{dataset} is ready in {folder}")


def main() -> None:
    from sideways_cli.data.decode import DecodeError

    try:
        app()
    except (UserError, DecodeError) as exc:
        print_user_error(exc)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
