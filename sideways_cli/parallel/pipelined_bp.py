"""BP across stages: the baseline Sideways is measured against at the same stage count.

Exact backprop cannot keep every stage busy on one batch (a stage waits for the gradient of the
frames it sent up), so the batch is split into microbatches of clips and run through
torch.distributed.pipelining's GPipe (all forwards, then all backwards) or 1F1B (one forward, one
backward in the steady state) schedule. Each process owns one stage: its contiguous modules, run
over whole clips; activations go up and their gradients come down between neighbouring stages.

The gradients are those of single-process :class:`BackpropRule` on the whole batch (the mean loss
over all clips and frames). torch's schedules by default (``scale_grads=True``) divide every
``param.grad`` of the stage by the number of microbatches after the last backward, which is right
only for a mean loss per microbatch over equal microbatches, and also divides whatever gradient
was in ``param.grad`` before the step. Instead, each microbatch's loss here is weighted by its
share of the batch's clips and ``scale_grads=False``: the backward passes then sum to the whole
batch's mean, and gradients accumulate into ``param.grad`` exactly as in BackpropRule.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from sideways_cli.engine.losses import Objective, at_least_fp32
from sideways_cli.engine.rule import ApplyUpdate, BatchStats, LossSum
from sideways_cli.models import FrameStack
from sideways_cli.parallel.links import StageFailure, is_link_failure
from sideways_cli.support.runtime import Autocast

SCHEDULE_CLASSES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: the modules' frame folding leaves
    a stage's input gradient permuted, torch sizes the neighbour's receive buffer from the
    gradient it infers on the first batch, and gloo sends and receives only contiguous tensors."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _StageForward(nn.Module):
    """The stage's modules over whole clips, in the forward autocast, remembering the shape of the
    last microbatch it saw: the only way a middle stage, which gets no clips, knows B and T."""

    def __init__(self, stack: FrameStack, autocast: Autocast):
        super().__init__()
        self.stack = stack
        self.autocast = autocast
        self.clips = self.frames = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A clip and every module's output below the head are [B, C, T, H, W].
        self.clips, self.frames = x.shape[0], x.shape[2]
        if x.requires_grad:  # a received activation, whose gradient goes back to the stage below
            x = _ContiguousGrad.apply(x)
        with self.autocast():
            # the modules return frame-major views; gloo sends only contiguous tensors
            return self.stack(x).contiguous()


class PipelinedBackprop:
    """One stage of pipelined BP; every rank calls ``train_batch`` for every batch.

    The first stage passes the clips, the last stage the labels and, for an objective whose
    targets are the frames (reconstruct), the clips too; other ranks pass None. The batch size
    must be a multiple of ``microbatches``. The stage index must be the rank in ``group``.

    Shapes: on the first batch torch infers each stage's input, output and gradient shapes by
    running microbatch 0 through the stages once more (an extra forward and input-gradient pass
    per stage, outside the schedule, with the RNG forked), and sizes its receive buffers from it.
    They are never inferred again, so every later batch must have the same shape (B, C, T, H, W).
    torch does not check: a smaller microbatch lands in the old buffer beside stale data. So the
    first and last stages raise on a change, before sending anything; a middle stage, which
    cannot see it, is left waiting (the runtime's timeout ends the job). For a new shape (e.g. a
    last smaller batch), build a new PipelinedBackprop on every rank.

    Dropout in the modules draws other masks per microbatch than over the whole batch, so the
    gradients equal BackpropRule's only without it (the default).
    """

    def __init__(self, stack: FrameStack, stage: int, stages: int, schedule: str, microbatches: int,
                 objective: Objective, device: torch.device, autocast: Autocast = nullcontext,
                 group: dist.ProcessGroup | None = None):
        if schedule not in SCHEDULE_CLASSES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULE_CLASSES)}")
        if dist.get_rank(group) != stage:
            # torch.distributed.pipelining puts stage i on rank i of the group
            raise ValueError(f"stage {stage} runs on rank {dist.get_rank(group)} of its group")
        self.objective = objective
        self.microbatches = microbatches
        self.module = _StageForward(stack, autocast)
        self.stage = PipelineStage(self.module, stage, stages, device, group=group)
        self.schedule_name = schedule
        self.bp_schedule = SCHEDULE_CLASSES[schedule](self.stage, microbatches, loss_fn=self._microbatch_loss,
                                            scale_grads=False)
        self._shape: torch.Size | None = None  # the batch shape the buffers were sized for
        self._clips: torch.Tensor | None = None  # the last stage's targets during a step
        self._labels: torch.Tensor | None = None

    def _microbatch_loss(self, outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The microbatch's mean loss times its share of the batch's clips: summed over the
        microbatches (by their backward passes), the mean loss over the whole batch."""
        clips = None if self._clips is None else self._clips[index]  # Classify needs no frames
        loss = self.objective.clip_loss(at_least_fp32(outputs), clips, self._labels[index])
        return loss * (len(index) / len(self._labels))

    def _check_shape(self, shape: torch.Size) -> None:
        if shape[0] % self.microbatches:
            raise ValueError(f"a batch of {shape[0]} clips does not split into "
                             f"{self.microbatches} equal microbatches")
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"batch shape {tuple(shape)} differs from the first batch's "
                             f"{tuple(self._shape)}; the stages' buffers have that shape")
        self._shape = shape

    def train_batch(self, clips: torch.Tensor | None, labels: torch.Tensor | None,
                    apply_update: ApplyUpdate) -> BatchStats:
        args, target = (), None
        if self.stage.is_first:
            self._check_shape(clips.shape)
            args = (clips,)
        if self.stage.is_last:
            self._check_shape(clips.shape if clips is not None else labels.shape)
            self._clips, self._labels = clips, labels
            # The schedule splits the target as it splits the clips: each microbatch's loss gets
            # the indices of its clips and looks up its labels and frames.
            target = torch.arange(len(labels), device=labels.device)
        losses: list[torch.Tensor] = []
        try:
            self.bp_schedule.step(*args, target=target, losses=losses, return_outputs=False)
        except RuntimeError as exc:  # a send or receive of the schedule: a neighbour hung or died
            if not is_link_failure(exc):
                raise
            raise StageFailure(f"stage {self.stage.stage_index}, the {self.schedule_name} "
                               f"schedule: a neighbouring stage hung or died "
                               f"({str(exc).splitlines()[0]})") from None
        finally:
            self._clips = self._labels = None
        apply_update()
        frames = self.module.frames
        clips_seen = self.microbatches * self.module.clips
        # the microbatches' weighted losses add up to the batch's mean (the last stage's alone)
        summed = (LossSum.of_mean(torch.stack(losses).detach().double().sum(), frames)
                  if self.stage.is_last else LossSum())
        return BatchStats(summed, clips_seen * frames, updates=1)

    def state_dict(self) -> dict[str, Any]:
        return {}  # every batch starts from nothing but the weights

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
