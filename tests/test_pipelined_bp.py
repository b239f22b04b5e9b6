"""Pipelined BP over 2 processes == single-process BackpropRule, for both schedules and objectives.

The gradients are compared as well as the weights: AdamW divides a gradient by its own running
magnitude, so weights after AdamW barely move when every gradient is off by a constant factor
(the mistake a microbatch loss scaling makes) and would not catch it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import spawned
from sideways_cli.engine.backprop import BackpropRule
from sideways_cli.engine.losses import OBJECTIVES
from sideways_cli.models import FrameStack, build_model
from sideways_cli.parallel.pipelined_bp import PipelinedBackprop
from sideways_cli.parallel.stages import stage_ranges, stage_stack

pytestmark = [pytest.mark.multiprocess]

# objective -> (model, its first argument, modules per stage, the option that sizes it)
SETUPS = {"classify": ("c3d", 5, [2, 1], "depth"), "reconstruct": ("autoencoder", 3, [2, 2], "levels")}
CASES = [(schedule, objective) for schedule in ("gpipe", "1f1b") for objective in SETUPS]
BATCHES, MICROBATCHES = 3, 2


def make_model(objective: str) -> FrameStack:
    name, outputs, _, size = SETUPS[objective]
    torch.manual_seed(0)
    return build_model(name, outputs, width=4, temporal_kernel=3, **{size: 2})


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 6, 16, 16, generator=generator),
             torch.randint(0, 5, (4,), generator=generator)) for _ in range(BATCHES)]


def train(rule, params: list[torch.nn.Parameter], batches, first: bool, last: bool) -> dict:
    """Losses, each batch's gradients (before the step) and the final weights of ``params``."""
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    grads = []

    def apply_update() -> None:
        grads.append([p.grad.clone() for p in params])
        optimizer.step()
        optimizer.zero_grad()

    losses = []
    for clips, labels in batches:
        stats = rule.train_batch(clips if first or last else None, labels if last else None,
                                 apply_update)
        losses.append(stats.loss)
    return {"losses": losses, "grads": grads, "weights": [p.detach().clone() for p in params]}


def _worker(rank: int, batches, out: Path) -> None:
    torch.set_num_threads(1)  # two processes on a small machine: no oversubscription
    spawned.join(rank, 2, out / "rendezvous")
    results = {}
    for schedule, objective in CASES:
        model = make_model(objective)
        stack = stage_stack(model, stage_ranges(SETUPS[objective][2])[rank])
        rule = PipelinedBackprop(stack, rank, 2, schedule, MICROBATCHES, OBJECTIVES[objective],
                                 torch.device("cpu"))
        # the runtime sends the clips to the last stage when they are the targets
        last_gets_clips = objective == "reconstruct"
        results[schedule, objective] = train(rule, list(stack.parameters()), batches,
                                             rank == 0 or last_gets_clips, rank == 1)
    torch.save(results, out / f"rank{rank}.pt")
    spawned.leave()


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("pipelined_bp")
    mp.start_processes(_worker, args=(make_batches(), out), nprocs=2, start_method=spawned.START_METHOD)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return torch.allclose(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule,objective", CASES)
def test_pipelined_bp_equals_single_process_bp(pipelined, one_thread, schedule, objective):
    model = make_model(objective)
    single = BackpropRule(model, OBJECTIVES[objective])
    expected = train(single, list(model.parameters()), make_batches(), True, True)
    first, last = (pipelined[rank][schedule, objective] for rank in range(2))
    assert first["losses"] == [0.0] * BATCHES
    assert last["losses"] == pytest.approx(expected["losses"], rel=1e-5)
    # the stages' parameters, bottom first, are the model's
    grads = [a + b for a, b in zip(first["grads"], last["grads"])]
    for batch, (actual, wanted) in enumerate(zip(grads, expected["grads"])):
        assert len(actual) == len(wanted)
        assert all(close(a, e) for a, e in zip(actual, wanted)), f"gradients of batch {batch}"
    weights = first["weights"] + last["weights"]
    assert all(close(a, e) for a, e in zip(weights, expected["weights"]))
