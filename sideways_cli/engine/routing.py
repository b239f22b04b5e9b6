"""The staleness dial's routing (``sideways.stash: full``): each window slot's gradient goes to
the frame it belongs to, instead of being summed into the newest frame's message.

Module g's window at frame f reads its inputs of frames f-k+1 ... f, so frame f's input gets a
gradient from each of the k windows that read it (f ... f+k-1). Summed, that is BP's gradient of
the input, and it is complete once the window of frame f+k-1 has met its message: only then is
frame f's message sent to the module below.
"""

from __future__ import annotations

from typing import Any

import torch


class RoutedMessages:
    """A module's window-slot gradients summed per frame of its input, until each is sent below."""

    def __init__(self) -> None:
        self.by_frame: dict[int, torch.Tensor] = {}

    def add(self, first: int, grads: torch.Tensor) -> None:
        """The gradients [B, C, n, ...] of the inputs of frames ``first`` ... ``first + n - 1``: a
        window's slots, or a time sequence's frames. Frames before the first (negative: the zero
        padding of a clip's first windows) have no message."""
        for i, grad in enumerate(grads.unbind(2)):
            frame = first + i
            if frame >= 0:
                self.by_frame[frame] = grad if frame not in self.by_frame else self.by_frame[frame] + grad

    def take(self, frame: int) -> torch.Tensor:
        """Frame ``frame``'s message: the schedule sends it once every window reading it has
        added its share (a missing one is a schedule bug)."""
        return self.by_frame.pop(frame)

    def clear(self) -> None:
        self.by_frame.clear()

    def state_dict(self) -> dict[int, torch.Tensor]:
        return {frame: grad.detach() for frame, grad in self.by_frame.items()}

    def load_state_dict(self, state: dict[int, Any]) -> None:
        self.by_frame = dict(state)
