"""What keeps a GPU busy, checked on a CPU: a training batch reads one value back to the host, the
loaders pin batches bound for CUDA, and host-to-GPU copies do not wait."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sideways_cli.config import load_config
from sideways_cli.data.catalog import resolve_dataset
from sideways_cli.engine import SidewaysRule, ChunkedSideways, make_rule
from sideways_cli.engine.losses import OBJECTIVES
from sideways_cli.run.loaders import data_loaders, eval_loader
from sideways_cli.support.runtime import to_device
from tiny import random_clips, tiny_network

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# the ops whose result the host must wait for on a GPU: a value read back (item, float, bool,
# equal, ...) or an output whose size depends on the values (nonzero, boolean masks, unique, ...)
HOST_WAITS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)


class HostWaits(TorchDispatchMode):
    """Records every op, run while it is active, that would make the host wait for a GPU."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(tag in func.tags for tag in HOST_WAITS):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# (model, temporal kernel, mode, chunk, update, between_clips): both rules, both Sideways executors,
# both of the chunked executor's graph forms, updates within the batch, a carried-over pipeline
RULES = {
    "bp": ("c3d", 3, "bp", 1, "clip", "reset"),
    "tick rule": ("vgg", 1, "sideways", 1, "clip", "reset"),
    "tick rule, every 2 ticks, continuous": ("c3d", 3, "sideways", 1, "every 2 ticks", "continuous"),
    "chunked, 3D convs": ("c3d", 3, "sideways", 4, "clip", "reset"),
    "chunked, residual blocks, continuous": ("resnet18", 3, "sideways", 3, "clip", "continuous"),
    "chunked, reconstruction": ("autoencoder", 2, "sideways", 4, "clip", "reset"),
}


def rule_and_batches(case: str):
    name, k, mode, chunk, update, between_clips = RULES[case]
    objective = OBJECTIVES["reconstruct" if name == "autoencoder" else "classify"]
    model = tiny_network(name, k, **{"levels" if name == "autoencoder" else "depth": 2})
    rule = make_rule(mode, model, between_clips, update, chunk, objective)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def apply_update() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    batches = 2 if between_clips == "continuous" else 1  # the second one meets a carried-over pipeline
    return rule, random_clips(batches, 6, dtype=torch.float64), apply_update


@pytest.mark.parametrize("case", list(RULES))
def test_a_training_batch_reads_one_value_back_to_the_host(case):
    """The mean loss that BatchStats reports, read once: the losses of the frames stay on the
    device until then, whatever the rule, executor, update schedule or pipeline mode."""
    rule, batches, apply_update = rule_and_batches(case)
    for clips, labels in batches:
        with HostWaits() as waits:
            stats = rule.train_batch(clips, labels, apply_update)
            loss = stats.loss  # what the trainer logs
        assert waits.ops == ["aten._local_scalar_dense.default"], waits.ops
        assert isinstance(loss, float) and stats.losses > 0


def record_calls(rule, method: str) -> list:
    """What ``rule.method`` returns, every call (the staged executors call it and sum)."""
    returned = []
    original = getattr(rule, method)

    def recorded(*args, **kwargs):
        returned.append(original(*args, **kwargs))
        return returned[-1]

    setattr(rule, method, recorded)
    return returned


def assert_detached_scalar(loss: torch.Tensor) -> None:
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad


def test_the_tick_rule_gives_each_tick_loss_as_a_tensor():
    """SidewaysRule.tick: the loss of the frame at the top as a detached 0-dim tensor, or None."""
    rule = SidewaysRule(tiny_network("c3d", 3, depth=2))
    returned = record_calls(rule, "tick")
    (clips, labels), = random_clips(1, 6, dtype=torch.float64)
    stats = rule.train_batch(clips, labels, lambda: None)
    losses = [loss for loss in returned if loss is not None]
    assert len(losses) == stats.losses and returned[0] is None  # none until a frame reaches the top
    for loss in losses:
        assert_detached_scalar(loss)
    assert stats.loss == pytest.approx(sum(loss.item() for loss in losses) / len(losses), rel=1e-15)


def test_the_chunked_executor_gives_each_macro_ticks_loss_sum_as_a_tensor():
    """ChunkedSideways.frame_losses: (sum, count), the sum a detached 0-dim tensor, a zero
    where no frame reached the top in the macro tick."""
    rule = ChunkedSideways(tiny_network("c3d", 3, depth=2), chunk=2)
    returned = record_calls(rule, "frame_losses")
    (clips, labels), = random_clips(1, 6, dtype=torch.float64)
    stats = rule.train_batch(clips, labels, lambda: None)
    assert (0, 0) == (returned[0][0].item(), returned[0][1])  # the first macro tick: nothing at the top
    for total, _ in returned:
        assert_detached_scalar(total)
    assert sum(count for _, count in returned) == stats.losses
    assert stats.loss == pytest.approx(sum(total.item() for total, _ in returned) / stats.losses,
                                       rel=1e-15)


def test_loaders_pin_the_batches_of_a_cuda_run(tmp_path):
    """Built, not iterated: pinning itself needs a GPU."""
    cfg = load_config(None, [f"data.root={tmp_path}", "data.synthetic.train_per_class=1",
                             "data.synthetic.val_per_class=1", "data.synthetic.num_frames=4",
                             "data.batch_size=2", "data.num_workers=0", "data.clip_len=4"])
    data = resolve_dataset(cfg.data, progress=False)
    for device, pinned in ((torch.device("cuda"), True), (torch.device("cpu"), False)):
        train, val = data_loaders(cfg, data, device=device)
        assert train.loader.pin_memory is val.loader.pin_memory is pinned
        assert eval_loader(cfg, data, "train", device=device).loader.pin_memory is pinned
    assert data_loaders(cfg, data)[0].loader.pin_memory is False  # the default: the CPU


class CopyRecorder:
    """Stands for a host tensor: records how it is asked to move."""

    def to(self, *args, **kwargs):
        self.asked = (args, kwargs)
        return self


@pytest.mark.parametrize("device, waits", [("cuda", False), ("cpu", True)])
def test_to_device_queues_copies_to_a_gpu(device, waits):
    recorder = CopyRecorder()
    to_device(recorder, torch.device(device), torch.float64)
    assert recorder.asked == ((torch.device(device), torch.float64), {"non_blocking": not waits})
    moved = to_device(torch.arange(3), torch.device("cpu"), torch.float64)
    assert moved.dtype == torch.float64 and moved.tolist() == [0.0, 1.0, 2.0]
