"""``train.clip_grad_norm``: clipping by the global norm, as ``torch.nn.utils.clip_grad_norm_``
does it (the same epsilon), over gradients that may be spread over several processes: each sums
the squares of its own (:func:`squared_norm`), the job adds those up, and every process scales its
own by the one coefficient (:func:`clip_to`)."""

from __future__ import annotations

import torch

EPSILON = 1e-6  # clip_grad_norm_'s: max_norm / (norm + 1e-6)


def squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The sum of the squares of every element of ``grads``, in float64 (a 0-dim tensor on
    ``device``, 0 for none): what the processes holding parts of one gradient add up."""
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = torch._foreach_norm(grads)
    return torch.stack(norms).double().square().sum()


def clip_to(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale ``grads`` in place so that, with ``norm`` their global norm, it is at most
    ``max_norm``; no host sync (the coefficient stays a device tensor, clamped at 1)."""
    if not grads:
        return
    coefficient = (max_norm / (norm + EPSILON)).clamp(max=1.0)
    torch._foreach_mul_(grads, coefficient.to(grads[0].dtype))
