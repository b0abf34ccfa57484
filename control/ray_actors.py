"""The controller and the catalog jobs in Ray actors, and the views routers use to reach them.

- ``ControllerActor``: the :class:`control.controller.Controller` in a named, detached actor (restarted on
  failure); it places one ``ShardActor`` per shard id through a ``RayPlacer``. ``RayControlPlane`` is the router's
  view of it.
- ``JobsActor``: the cluster's catalog jobs (``jobs.JobManager``) in one detached actor, so that every router sees
  the same jobs and a job outlives the router that started it; ``RayJobs`` is the router's view of it.

Uses ray, lookalike.config, jobs, router (Router, GrpcShardClient: the jobs' own router) and control (controller,
ray_common, ray_placer).
"""

from __future__ import annotations

import functools
import logging
import os
import threading

import ray

from control.controller import Controller
from control.ray_common import actor_logging, controller_name, unwrap
from control.ray_placer import RayPlacer
from jobs import JobManager
from lookalike.config import ClusterConfig
from router.core import Router
from router.shard_client import GrpcShardClient

log = logging.getLogger(__name__)


@ray.remote
class ControllerActor:
    """The controller, with a RayPlacer; after a restart it asks the running shards for their addresses."""

    def __init__(self, cfg: ClusterConfig, segment_bytes: int):
        actor_logging()
        self._placer = RayPlacer(cfg, segment_bytes)
        self._ctl = Controller(cfg.data_dir, cfg.shards, self._placer, cfg.policy)
        self._ctl.start()
        # After a restart of this actor the shards are still running and will not register again: ask them.
        threading.Thread(target=self._rediscover, daemon=True, name="rediscover").start()

    def _rediscover(self) -> None:
        for sid in self._placer.shard_ids():
            try:
                info = ray.get(self._placer.info(sid), timeout=60)
            except Exception as err:  # starting or dead: it registers itself once it serves
                log.info("shard %s not reachable yet: %s", sid, err)
                continue
            if info["serving"]:
                self._ctl.register_shard(sid, info["address"], info["node"])

    def call(self, method: str, *args):
        return getattr(self._ctl, method)(*args)

    def pid(self) -> int:
        return os.getpid()

    def shard_pids(self) -> dict[str, int]:
        return {sid: ray.get(self._placer.pid(sid)) for sid in self._placer.shard_ids()}

    def shard_allocators(self) -> dict[str, dict[str, int]]:
        """Each shard's process's allocator statistics (shard.osutil.allocator_stats), by shard."""
        return {sid: ray.get(self._placer.info(sid))["allocator"] for sid in self._placer.shard_ids()}

    def shutdown(self) -> None:
        self._ctl.stop()
        self._placer.kill_all()


class ActorView:
    """A caller's view of an actor whose ``call(method, *args)`` runs a method of the object it holds.

    Args:
        handle: the actor.
        timeout: seconds a call waits for its answer (unless it says otherwise).
    """

    def __init__(self, handle, timeout: float = 60.0):
        self.handle = handle
        self.timeout = timeout

    def _call(self, method, *args, timeout=None):
        return unwrap(self.handle.call.remote(method, *args), timeout=timeout or self.timeout)


class RayControlPlane(ActorView):
    """The router's view of the controller actor (implements router.core.ControlPlane)."""

    def create_collection(self, cfg):
        return self._call("create_collection", cfg, timeout=600)

    def drop_collection(self, name):
        return self._call("drop_collection", name, timeout=600)

    def list_collections(self):
        return self._call("list_collections")

    def shard_map(self, name):
        return self._call("shard_map", name)

    def shard_maps(self):
        return self._call("shard_maps")

    def epoch(self):
        return self._call("epoch", timeout=5)

    def shards(self):
        return self._call("shards")

    def rebalance(self, name, add_shards):
        return self._call("rebalance", name, add_shards, timeout=600)

    def moves(self):
        return self._call("moves")

    def move_counts(self):
        return self._call("move_counts")

    def move_metrics(self):
        return self._call("move_metrics", timeout=5)

    def training_status(self, name):
        return self._call("training_status", name)

    def training_statuses(self):
        return self._call("training_statuses")

    def train(self, name):
        return self._call("train", name, timeout=120)


@ray.remote
class JobsActor:
    """The cluster's catalog jobs (jobs.JobManager) in one detached actor, so that every router sees
    the same jobs and a job outlives the router that started it. Restarted by Ray, it resumes the jobs that were
    running from their checkpoints."""

    def __init__(self, cluster_name: str, namespace: str, data_dir: str, tls=None):
        actor_logging()
        controller = ray.get_actor(controller_name(cluster_name), namespace=namespace)
        self._router = Router(RayControlPlane(controller), connect=functools.partial(GrpcShardClient, tls=tls))
        self._jobs = JobManager(self._router, data_dir, resume=True)

    def call(self, method: str, *args):
        return getattr(self._jobs, method)(*args)

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self._jobs.close()
        self._router.close()


class RayJobs(ActorView):
    """The router's view of the jobs actor (the interface of jobs.JobManager)."""

    def start(self, kind: str, spec: dict, job_id: str = ""):
        return self._call("start", kind, spec, job_id)

    def get(self, job_id: str):
        return self._call("get", job_id)

    def list(self):
        return self._call("list")

    def cancel(self, job_id: str):
        return self._call("cancel", job_id)

    def groups(self, job_id: str, offset: int = 0, limit: int = 0):
        return self._call("groups", job_id, offset, limit)

