"""Encoders in Ray actors: ``EncoderActor`` runs encoders (on a GPU when Ray gave it one), and
``RayEncoderPool`` is the router's pool of them (router.encoding.EncoderPool).

Uses ray, router.encoding and control.ray_common.
"""

from __future__ import annotations

import itertools
import math

import ray

from control.ray_common import actor_logging, unwrap
from router.encoding import LocalEncoderPool


@ray.remote
class EncoderActor:
    """Runs encoders (on a GPU when Ray gave it one); models load on first use of each spec."""

    def __init__(self):
        actor_logging()
        self._pool = LocalEncoderPool()

    def encode_many(self, spec: str, images: list[bytes]):
        return self._pool.encode_many(spec, images)


class RayEncoderPool:
    """The router's encoder pool on a cluster: ``n`` EncoderActors, called round robin (implements
    router.encoding.EncoderPool).

    Args:
        n: actors.
        num_gpus: GPUs per actor (None: 1 when the Ray cluster has a free GPU per actor, else what GPU shards left
            free shared among them, else 0: an actor asking for a GPU that GPU shards hold would never start).
        num_cpus: CPUs per actor.
    """

    def __init__(self, n: int = 1, num_gpus: float | None = None, num_cpus: float = 1.0):
        if n < 1:
            raise ValueError(f"an encoder pool needs at least one actor, got {n}")
        if num_gpus is None:
            free = ray.available_resources().get("GPU", 0)
            num_gpus = 1 if free >= n else math.floor(10_000 * min(1.0, free) / n) / 10_000
        self._actors = [EncoderActor.options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1,
                                             max_task_retries=3).remote() for _ in range(n)]
        self._turn = itertools.count()

    def encode_many(self, spec: str, images):
        actor = self._actors[next(self._turn) % len(self._actors)]
        return unwrap(actor.encode_many.remote(spec, list(images)), timeout=600)

    def close(self) -> None:
        for actor in self._actors:
            ray.kill(actor)

