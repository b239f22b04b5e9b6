"""Depth and data parallelism over torch.distributed: the job's shape and groups, the stack split
into contiguous stages (one process and device each, one activation up and one gradient message down
per tick), replicas that average their gradients, and checkpoints resharded between shapes."""
