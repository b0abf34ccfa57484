"""What the Ray side of the control plane shares: the names of the cluster's actors, ray.get that keeps the remote
error's type, the shard's thread count, the actors' logging.

Uses ray and lookalike (config, logs) only.
"""

from __future__ import annotations

import logging

import ray

from lookalike import logs
from lookalike.config import ClusterConfig


def controller_name(cluster: str) -> str:
    """The name of the cluster's controller actor."""
    return f"{cluster}-controller"


def jobs_name(cluster: str) -> str:
    """The name of the cluster's jobs actor."""
    return f"{cluster}-jobs"


def unwrap(ref, timeout: float | None = None):
    """ray.get that re-raises the remote exception itself (so typed errors keep their gRPC status)."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise


def shard_threads(cfg: ClusterConfig) -> int:
    """FAISS (OpenMP) threads of a shard: its whole Ray CPUs, at least one."""
    return max(1, int(cfg.shard_num_cpus))


def actor_logging() -> None:
    """Logging of an actor's process (an entry point of its own: Ray starts it), in the format LOOKALIKE_LOG_FORMAT
    names (`lookalike serve --log-format` sets it; text when it is unset or not a format)."""
    try:
        fmt = logs.log_format()
    except ValueError:
        fmt = "text"
    logs.configure(logging.INFO, fmt)
