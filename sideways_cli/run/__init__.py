"""One training run, on one process or every rank of a job: the network, optimizer and rule built
from the config, the loaders, the learner each process trains, the loop, the run directory and its
lock, resume, evaluation, and the launcher that starts a job of stages and replicas."""
