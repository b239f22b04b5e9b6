"""The commands that study runs rather than make one: compare (runs side by side), check (the
frame-step contract on a network), fidelity (pseudo-gradients against gradients) and stream (online
learning, one frame per tick)."""
