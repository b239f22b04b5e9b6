"""A trained run's predictions on any video: the run loaded once, then video after video.

A video is seen exactly as ``sideways eval`` sees a video of its split: the run's evaluation
views (``eval.clips_per_video`` evenly spaced clips, each as ``eval.crops`` crops), the run's
resize and crop, the same chunked causal forward, and the mean of the views' probabilities. So on
a video of the validation split a prediction equals that video's row of ``eval --dump``.
"""

from __future__ import annotations

from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from sideways_cli.data.datasets import VideoEntry, collate_clips
from sideways_cli.data.decode import DecodeError, open_video
from sideways_cli.engine.losses import at_least_fp32
from sideways_cli.reports.labelled_video import LabelledVideo
from sideways_cli.run.evaluate import batch_probabilities
from sideways_cli.run.loaders import eval_dataset, eval_transform
from sideways_cli.run.trained import load_trained
from sideways_cli.support.errors import UserError
from sideways_cli.support.runtime import to_device


@dataclass
class Prediction:
    """One video's prediction: the ``top`` (label, probability) pairs, most likely first, and
    every class's probability."""

    video: Path
    top: list[tuple[str, float]]
    probabilities: dict[str, float]

    def as_dict(self) -> dict:
        return {"video": str(self.video), "top": [{"label": label, "probability": p}
                                                  for label, p in self.top]}


@dataclass
class FramePrediction:
    """One frame's top (label, probability) pairs, from the frames up to it alone."""

    frame: int  # its index in the video
    top: list[tuple[str, float]]


class Predictor:
    """A run directory's model, ready to predict: ``Predictor(run_dir).predict(video)``."""

    def __init__(self, run_dir: Path | str, checkpoint: str = "last", device: str | None = None,
                 ema: bool = False):
        self.trained = trained = load_trained(run_dir, checkpoint, device, ema)
        if trained.cfg.task != "classify":
            raise UserError(f"{trained.run.path} is a {trained.cfg.task} run; predict gives class "
                            "labels of a classification run")
        self.cfg, self.classes, self.step = trained.cfg, trained.classes, trained.step
        self.model = trained.model.eval()

    @torch.no_grad()
    def predict(self, video: Path | str, top_k: int = 5, clips: int | None = None) -> Prediction:
        """``video``'s prediction over ``clips`` clips (default: the run's eval.clips_per_video)
        and the run's eval.crops crops each. VideoDecodeError (a DecodeError) if it cannot be
        read."""
        video = Path(video)
        with closing(open_video(video, self.cfg.data.decoder)) as decoder:
            entry = VideoEntry(video.resolve(), 0, decoder.num_frames, decoder.fps)
        views = eval_dataset(self.cfg, [entry], clips)
        batch = collate_clips([views[i] for i in range(len(views))])
        if batch["failed"]:
            raise DecodeError(f"cannot decode video {video}: {batch['failed'][0][1]}")
        probs = torch.cat([batch_probabilities(self.model, clips, self.trained.device,
                                               self.trained.autocast, self.cfg.eval.chunk)
                           for clips in batch["clip"].split(self.cfg.eval.batch_size)]).mean(dim=0)
        return Prediction(video, self._top(probs, top_k), dict(zip(self.classes, probs.tolist())))

    @torch.no_grad()
    def predict_frames(self, video: Path | str, top_k: int = 5,
                       out_video: Path | None = None) -> Iterator[FramePrediction]:
        """Online prediction: the video streamed through the causal network one frame per tick
        (every data.frame_stride-th frame, the spacing the run trained on), each frame's top
        labels yielded as it arrives, from that frame and those before it alone. Memory is one
        frame and each module's window, whatever the video's length; the outputs are exactly the
        whole-clip forward's for those frames. ``out_video``: also write every frame of the video
        to that MP4 with the running label (the latest prediction's top one) drawn on it."""
        transform = eval_transform(self.cfg)
        stream = self.model.stream()
        with ExitStack() as stack:
            decoder = stack.enter_context(closing(open_video(video, "pyav")))
            labelled = stack.enter_context(LabelledVideo(out_video, decoder.fps)) if out_video else None
            latest = None
            for index, frame in enumerate(decoder.frames()):
                if index % self.cfg.data.frame_stride == 0:
                    x = transform.normalise(transform.spatial(frame[None], None))
                    with self.trained.autocast():
                        logits = stream(to_device(x[None], self.trained.device, self.model.dtype))  # [1, K, 1]
                    probs = at_least_fp32(logits)[0, :, 0].softmax(dim=0).cpu()
                    latest = FramePrediction(index, self._top(probs, top_k))
                    yield latest
                if labelled is not None:
                    label, probability = latest.top[0]
                    labelled.write(frame.numpy(), f"{label} {100 * probability:.0f}%")

    def _top(self, probs: torch.Tensor, k: int) -> list[tuple[str, float]]:
        """The ``k`` most likely (label, probability) pairs of ``probs`` [classes], most likely first."""
        top = probs.topk(min(k, len(self.classes)))
        return [(self.classes[int(i)], float(p)) for p, i in zip(*top)]
