"""Figures written next to the numbers: PNG files, rendered without a display."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from sideways_cli.reports.tables import format_value, mean_below_head
from sideways_cli.support.atomic import replace_atomically


class RunResult(Protocol):
    """What a plotted run offers (``comparison.RunResult``)."""

    name: str
    config: dict[str, Any]
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    evaluations: list[dict[str, float]]
    fidelity_curve: list[dict[str, Any]]
    variant: bool
    fidelity_mean: float | None
    tick_fidelity_mean: float | None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on a training machine
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 120) -> None:
    """Render to a temporary file and rename, so a reader never sees half an image."""
    try:
        replace_atomically(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        _pyplot().close(fig)


def confusion_png(confusion: torch.Tensor, classes: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (true class down, predicted across), written atomically."""
    plt = _pyplot()
    k = len(classes)
    rates = confusion.float() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    side = min(4 + 0.28 * k, 30)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's videos")
    ticks = range(k)
    ax.set_xticks(ticks, classes, rotation=90, fontsize=max(4, 10 - k // 20))
    ax.set_yticks(ticks, classes, fontsize=max(4, 10 - k // 20))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 20:  # counts stay legible on small matrices
        for i in ticks:
            for j in ticks:
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.tight_layout()
    _save(fig, path)


def _colors(n: int) -> list[Any]:
    """One distinct colour per run: tab10 while it lasts, then tab20, then a sampled colormap."""
    import matplotlib

    for name, size in (("tab10", 10), ("tab20", 20)):
        if n <= size:
            return [matplotlib.colormaps[name](i) for i in range(n)]
    return [matplotlib.colormaps["viridis"](i / max(1, n - 1)) for i in range(n)]


def _validation(run: RunResult) -> tuple[str, str, float]:
    """(summary key, axis label, scale) of a run's headline validation metric, by its task."""
    if run.summary.get("task") == "reconstruct":
        return "val_psnr", "val PSNR (dB)", 1.0
    return "val_video_top1", "val video top-1 (%)", 100.0


def compare_png(runs: list[RunResult], path: Path) -> None:
    """Learning curves (training loss, validation video top-1 or PSNR) against frames seen and
    against wall time, and throughput and peak-memory bars: one colour per run. Runs that
    measured their gradient fidelity while training (``train.fidelity_every``) add a row: its
    mean below the head, whole batch and per tick, against the step, and each module's last."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    val_key, val_label, scale = _validation(runs[0])
    colors = _colors(len(runs))
    with_fidelity = any(run.fidelity_curve for run in runs)
    fig, axes = plt.subplots(3 if with_fidelity else 2, 3, figsize=(16, 13.5 if with_fidelity else 9))
    if with_fidelity:
        _fidelity_row(runs, colors, axes[2])
    for run, color in zip(runs, colors):
        for col, x_key in enumerate(("frames_seen", "wall_s")):
            loss = [(m[x_key], m["loss"]) for m in run.metrics]
            top1 = [(e[x_key], scale * e[val_key]) for e in run.evaluations]
            for ax, points, marker in ((axes[0, col], loss, "o" if len(loss) == 1 else None),
                                       (axes[1, col], top1, "o")):  # few evaluations: show each
                if points:
                    ax.plot(*zip(*points), color=color, marker=marker, markersize=5)
    for col, x_label in enumerate(("frames seen", "wall time (s)")):
        axes[0, col].set(xlabel=x_label, ylabel="training loss", title=f"training loss vs {x_label}")
        axes[1, col].set(xlabel=x_label, ylabel=val_label, title=f"{val_label} vs {x_label}")
    names = [run.name for run in runs]
    for ax, key, label in ((axes[0, 2], "frames_per_s", "training frames/s"),
                           (axes[1, 2], "peak_mem_mb", "peak memory (MiB)")):
        ax.bar(range(len(runs)), [run.summary[key] for run in runs], color=colors)
        ax.set_xticks(range(len(runs)), names, rotation=30, ha="right", fontsize=8)
        ax.set(ylabel=label, title=label)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, marker="o", label=n) for c, n in zip(colors, names)]
    columns = min(len(runs), 5)
    fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=9)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * ((len(runs) - 1) // columns), 1, 1))
    _save(fig, path)


def _fidelity_row(runs: list[RunResult], colors: list[Any], axes) -> None:
    """fidelity.jsonl's curves: the mean over the modules below the head (the head's gradient is
    exact under every rule) of the whole batch's and the per-tick cosine, and the last
    measurement per module."""
    for run, color in zip(runs, colors):
        if not run.fidelity_curve:
            continue
        for ax, key in zip(axes, ("cosine", "tick_cosine")):
            points = [(line["step"], mean_below_head(line["modules"], key)) for line in run.fidelity_curve]
            ax.plot(*zip(*points), color=color, marker="o" if len(points) == 1 else None)
        last = run.fidelity_curve[-1]["modules"]
        axes[2].plot([row["index"] for row in last], [row["cosine"] for row in last], color=color,
                     marker="o")
    for ax, label in zip(axes, ("gradient fidelity", "per-tick fidelity")):
        ax.set(xlabel="training step", ylabel=f"{label} (mean below head)",
               title=f"{label} while training")
    axes[2].set(xlabel="module (0 = bottom)", ylabel="gradient fidelity",
                title="gradient fidelity per module, last measured")


def _metric(run: RunResult, metric: str) -> float | None:
    if metric in ("fidelity_mean", "tick_fidelity_mean"):
        return getattr(run, metric)
    key, _, scale = _validation(run)
    return scale * run.summary[key]


def sweep_png(runs: list[RunResult], swept: list[str], path: Path) -> None:
    """Val video top-1 or PSNR (and mean fidelity when measured) against each swept key: one line
    per mode (and per value of the other swept keys); --variant runs as dashed horizontal lines."""
    plt = _pyplot()
    rows = [("validation", _validation(runs[0])[1])]
    if any(run.fidelity_mean is not None for run in runs):
        rows += [("fidelity_mean", "gradient fidelity (mean below head)"),
                 ("tick_fidelity_mean", "per-tick fidelity (mean below head)")]
    fig, axes = plt.subplots(len(rows), len(swept), squeeze=False,
                             figsize=(6 * len(swept), 4.2 * len(rows)))
    points, variants = [r for r in runs if not r.variant], [r for r in runs if r.variant]
    modes = list(dict.fromkeys(r.summary["mode"] for r in runs))
    for col, key in enumerate(swept):
        values = list(dict.fromkeys(r.config[key] for r in points))
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        position = (lambda v: v) if numeric else values.index  # categories in the order given
        lines: dict[tuple[str, str], list[RunResult]] = {}
        for r in points:
            others = ", ".join(f"{k}={format_value(r.config[k])}" for k in swept if k != key)
            lines.setdefault((r.summary["mode"], others), []).append(r)
        styles = list(dict.fromkeys(others for _, others in lines))
        for row, (metric, label) in enumerate(rows):
            ax = axes[row][col]
            for (mode, others), members in lines.items():
                xy = sorted((position(r.config[key]), _metric(r, metric)) for r in members
                            if _metric(r, metric) is not None)
                if xy:
                    ax.plot(*zip(*xy), marker="os^vD"[styles.index(others) % 5],
                            linestyle=["-", "-.", ":"][styles.index(others) % 3],
                            color=f"C{modes.index(mode) % 10}",
                            label=mode + (f", {others}" if others else ""))
            for i, r in enumerate(variants):
                if _metric(r, metric) is not None:
                    ax.axhline(_metric(r, metric), color=f"C{modes.index(r.summary['mode']) % 10}",
                               linestyle=(0, (4, 2 + 2 * i)), linewidth=1, label=r.name)
            if not numeric:
                ax.set_xticks(range(len(values)), [format_value(v) for v in values])
                ax.set_xlim(-0.5, len(values) - 0.5)
            elif all(isinstance(v, int) for v in values):
                ax.set_xticks(values)  # strides 1, 2, 4, 8 at their own ticks
            ax.set(xlabel=key, ylabel=label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
