"""A trained run's predictions on any video: the run loaded once, then video after video.

A video is seen exactly as ``sideways eval`` sees a video of its split: the run's evaluation
views (``eval.clips_per_video`` evenly spaced clips, each as ``eval.crops`` crops), the run's
resize and crop, the same chunked causal forward, and the mean of the views' probabilities. So on
a video of the validation split a prediction equals that video's row of ``eval --dump``.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from sideways_cli.config import Config, from_dict
from sideways_cli.data.datasets import ClipDataset, VideoEntry, collate_clips
from sideways_cli.data.decode import DecodeError, iter_frames, open_video
from sideways_cli.data.transforms import ClipTransform, default_resize
from sideways_cli.engine.losses import at_least_fp32
from sideways_cli.run.build import build_network
from sideways_cli.run.evaluate import batch_probabilities
from sideways_cli.run.rundir import RunDir
from sideways_cli.support.errors import UserError
from sideways_cli.support.runtime import configure_backends, forward_autocast, resolve_device, to_device


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

    def __init__(self, run_dir: Path | str, checkpoint: str = "last", device: str | None = None):
        run = RunDir(Path(run_dir))
        ckpt = run.load_checkpoint(checkpoint)
        self.cfg: Config = from_dict(ckpt["config"], str(run.checkpoint(checkpoint)))
        if self.cfg.task != "classify":
            raise UserError(f"{run.path} is a {self.cfg.task} run; predict gives class labels "
                            "of a classification run")
        if device is not None:
            self.cfg.device = device
        configure_backends(self.cfg)
        self.device = resolve_device(self.cfg.device)
        self.autocast = forward_autocast(self.device, self.cfg.amp)
        self.classes: list[str] = list(ckpt["classes"])
        self.model = build_network(self.cfg, len(self.classes), pretrained=False)
        self.model.load_state_dict(ckpt["model"])
        self.model.to(self.device).eval()
        self.step = int(ckpt["step"])

    @torch.no_grad()
    def predict(self, video: Path | str, top_k: int = 5, clips: int | None = None) -> Prediction:
        """``video``'s prediction over ``clips`` clips (default: the run's eval.clips_per_video)
        and the run's eval.crops crops each. VideoDecodeError (a DecodeError) if it cannot be
        read."""
        video = Path(video)
        with closing(open_video(video, self.cfg.data.decoder)) as decoder:
            entry = VideoEntry(video.resolve(), 0, decoder.num_frames, decoder.fps)
        d = self.cfg.data
        views = ClipDataset([entry], clip_len=d.clip_len, frame_stride=d.frame_stride,
                            shuffle_frames=d.shuffle_frames, train=False,
                            clips_per_video=clips or self.cfg.eval.clips_per_video,
                            crops=self.cfg.eval.crops, seed=self.cfg.seed, decoder_backend=d.decoder,
                            transform=ClipTransform(size=d.size, resize=default_resize(d.dataset, d.resize)))
        batch = collate_clips([views[i] for i in range(len(views))])
        if batch["failed"]:
            raise DecodeError(f"cannot decode video {video}: {batch['failed'][0][1]}")
        probs = torch.cat([batch_probabilities(self.model, clips, self.device, self.autocast,
                                               self.cfg.eval.chunk)
                           for clips in batch["clip"].split(self.cfg.eval.batch_size)]).mean(dim=0)
        top = probs.topk(min(top_k, len(self.classes)))
        return Prediction(video, [(self.classes[int(i)], float(p)) for p, i in zip(*top)],
                          dict(zip(self.classes, probs.tolist())))

    @torch.no_grad()
    def predict_frames(self, video: Path | str, top_k: int = 5) -> Iterator[FramePrediction]:
        """Online prediction: the video streamed through the causal network one frame per tick
        (every data.frame_stride-th frame, the spacing the run trained on), each frame's top
        labels yielded as it arrives, from that frame and those before it alone. Memory is one
        frame and each module's window, whatever the video's length; the outputs are exactly the
        whole-clip forward's for those frames."""
        d = self.cfg.data
        transform = ClipTransform(size=d.size, resize=default_resize(d.dataset, d.resize))
        stream = self.model.stream()
        for index, frame in enumerate(iter_frames(video)):
            if index % d.frame_stride:
                continue
            x = transform.normalise(transform.view(transform.resized(frame[None]), 0, 1))
            with self.autocast():
                logits = stream(to_device(x[None], self.device, self.model.dtype))  # [1, K, 1]
            probs = at_least_fp32(logits)[0, :, 0].softmax(dim=0).cpu()
            top = probs.topk(min(top_k, len(self.classes)))
            yield FramePrediction(index, [(self.classes[int(i)], float(p)) for p, i in zip(*top)])
