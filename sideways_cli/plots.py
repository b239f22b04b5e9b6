"""Figures written next to the numbers: PNG files, rendered without a display."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def confusion_png(confusion: torch.Tensor, classes: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (true class down, predicted across), written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training machine
    import matplotlib.pyplot as plt

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
