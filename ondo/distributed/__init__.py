"""Tensor parallelism: the process group, worker processes and collectives (see docs/distributed.md)."""
