"""Reading back what a run's trackers logged, as their own readers see it."""

from __future__ import annotations

from pathlib import Path


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of ``run/tensorboard`` -> its (step, value) points, as TensorBoard shows
    them (what a resumed run purged is gone)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(point.step, point.value) for point in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def tensorboard_tags(run: Path) -> dict[str, list[str]]:
    """The tags of ``run/tensorboard`` by kind (scalars, tensors: text and hparams, ...)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return events.Tags()
