"""Depth parallelism over torch.distributed: the module stack split into contiguous stages, one
process (and device) each, exchanging one activation up and one gradient message down per tick."""
