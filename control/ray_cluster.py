"""Ray at the edges: starting, joining and stopping a cluster, and the start-up messages.

- :func:`start_cluster` starts (or finds) the controller actor (``control.ray_actors.ControllerActor``), which
  places one ``ShardActor`` per shard (``control.ray_shard``, ``control.ray_placer``), and waits until they serve;
  :func:`start_jobs` the jobs actor. The router reaches them through ``RayControlPlane`` and ``RayJobs``.
- :func:`join_ray` connects a process to a running Ray cluster; :func:`connect_router` (again and again, through
  control.link.ControlPlaneLink) joins it and gets what a router needs there.

Uses ray, lookalike (the package itself, to check that the cluster's nodes have it; config) and control
(link, ray_actors, ray_common, ray_encoders, state).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import ray
from ray._private import auto_init_hook

import lookalike
from control.link import Connection
from control.ray_actors import ControllerActor, JobsActor, RayControlPlane, RayJobs
from control.ray_common import controller_name, jobs_name, unwrap
from control.ray_encoders import RayEncoderPool
from control.state import stored_shards
from lookalike.config import ClusterConfig
from lookalike.retry import Retry

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
def _lookalike_location() -> str:
    return os.path.dirname(lookalike.__file__)


def no_implicit_connect() -> None:
    """Keeps Ray from connecting this process to a cluster by itself. A Ray call made while the process is not
    connected runs ``ray.init()`` with no address (Ray's auto-init), which starts a local Ray or joins whichever
    instance it finds on the machine. Called after the process's own ``ray.init``: when a stop signal had taken the
    embedded GCS down, a call in serve's shutdown joined another instance on the machine and aborted. A call made
    while not connected now fails instead (the callers handle a control plane that does not answer)."""
    auto_init_hook.enable_auto_connect = False


def join_ray(address: str, namespace: str, log_to_driver: bool = False, timeout: float = 120.0) -> None:
    """Connects this process to the Ray cluster at ``address`` (``host:port`` of the GCS, or ``ray://host:port``
    for Ray Client), retrying until ``timeout``: in Kubernetes the router pod often starts before the head, and
    Ray Client's per-client server can fail its first start while the head is still coming up.

    Then checks that the cluster's nodes can import lookalike (the image must have it installed): without it a
    Ray Client router would fail later with a confusing signature error.

    Raises:
        ConnectionError: the cluster did not answer within ``timeout``.
        RuntimeError: lookalike is not installed on the cluster's nodes.
    """
    retry = Retry(timeout=timeout, delay=3.0, factor=1.0)
    for _attempt in retry:
        try:
            ray.init(address=address, namespace=namespace, log_to_driver=log_to_driver)
            no_implicit_connect()
            break
        except (ConnectionError, RuntimeError) as err:
            ray.shutdown()
            if retry.expired():
                raise ConnectionError(f"could not join the Ray cluster at {address}: {err}") from err
            log.warning("Ray cluster at %s not ready (%s); retrying", address, str(err).splitlines()[0][:200])
            retry.pause()
    try:
        where = ray.get(_lookalike_location.remote(), timeout=timeout)
    except ray.exceptions.RayTaskError as err:
        raise RuntimeError(f"the Ray cluster at {address} cannot import lookalike: install it on every node "
                           f"(the images in docker/ have it) ({str(err.cause)[:200]})") from None
    log.info("joined Ray cluster at %s (lookalike on its nodes at %s)", address, where)


def _shutdown_within(timeout: float = 15.0) -> None:
    """ray.shutdown, abandoned after ``timeout`` seconds: a Ray Client whose server is gone can wait on it."""
    done = threading.Thread(target=ray.shutdown, daemon=True, name="ray-shutdown")
    done.start()
    done.join(timeout)


def connect_router(address: str, cfg: ClusterConfig, encoders: int = 0, log_to_driver: bool = False,
                   timeout: float = 120.0) -> Connection:
    """Joins the Ray cluster at ``address`` (after shutting down what is left of an earlier connection: a Ray Client
    session whose head restarted), gets the cluster's controller (or starts it again: it reloads the cluster from
    storage) and jobs actor, waits for the shards, and starts ``encoders`` encoder actors: a router's
    control.link.Connection.

    Raises:
        ConnectionError, RuntimeError: as :func:`join_ray`.
        TimeoutError: as :func:`start_cluster`.
    """
    if ray.is_initialized():
        _shutdown_within()
    join_ray(address, cfg.namespace, log_to_driver=log_to_driver, timeout=timeout)
    _handle, control = start_cluster(cfg)
    jobs = start_jobs(cfg)
    return Connection(control, jobs, RayEncoderPool(encoders) if encoders else None, close=_shutdown_within)


def shards_phrase(shards) -> str:
    """The shards of a cluster for a person: "1 shard", "3 shards", "3 shards (1 not serving yet)".

    Args:
        shards: their ShardInfo (lookalike.shardmap), or a number of shards.
    """
    n = shards if isinstance(shards, int) else len(shards)
    waiting = 0 if isinstance(shards, int) else sum(not s.serving for s in shards)
    return f"{n} shard{'' if n == 1 else 's'}" + (f" ({waiting} not serving yet)" if waiting else "")


def startup_message(started: int, asked: int, stored: int | None, data_dir: str) -> str:
    """The start-up log line of a cluster: the shards it starts, counted from what storage holds.

    Args:
        started: shards the controller runs (those of the cluster in storage, else ``asked``).
        asked: shards asked for (``ClusterConfig.shards``, ``serve --shards``): what new storage gets.
        stored: shards of the cluster found in storage before the controller started (0: new storage; None: the
            storage is not readable from here).
        data_dir: the storage.
    """
    if stored == 0 and started == asked:
        return f"starting {shards_phrase(started)} on new storage {data_dir}"
    msg = f"starting the {shards_phrase(started)} of the cluster in storage {data_dir}"
    if asked != started:
        msg += (f" (not the {asked} asked for: that number only applies to new storage; `lookalike rebalance NAME "
                f"--add-shards N` adds shards)")
    return msg


def start_cluster(cfg: ClusterConfig, segment_bytes: int = 64 << 20, ready_timeout: float = 180.0):
    """Starts (or joins) the controller of ``cfg.cluster_name`` on the connected Ray cluster and waits until
    every shard serves. Logs how many shards start (those of the cluster in storage, on a restart; see
    :func:`startup_message`). Returns (controller handle, RayControlPlane).

    Raises:
        TimeoutError: the shards did not all come up in time.
    """
    cfg = ClusterConfig(**{**cfg.__dict__, "data_dir": os.path.abspath(cfg.data_dir)})
    try:
        stored = stored_shards(cfg.data_dir)
    except (OSError, ValueError, KeyError):  # not readable from here (a router joining a remote cluster)
        stored = None
    handle = ControllerActor.options(
        name=controller_name(cfg.cluster_name), namespace=cfg.namespace, lifetime="detached",
        get_if_exists=True, max_restarts=-1, max_task_retries=-1, max_concurrency=64, num_cpus=0,
    ).remote(cfg, segment_bytes)
    started = len(unwrap(handle.call.remote("shards"), timeout=ready_timeout + 30))
    log.info("%s", startup_message(started, cfg.shards, stored, cfg.data_dir))
    deadline, told = time.monotonic() + ready_timeout, set()
    while not unwrap(handle.call.remote("wait_ready", min(2.0, max(0.0, deadline - time.monotonic()))),
                      timeout=ready_timeout + 30):
        # Keep waiting while a shard cannot be placed (an autoscaler may add a node), but say why.
        problems = [f"shard {s.shard_id} {s.problem}" for s in unwrap(handle.call.remote("shards"), timeout=60)
                    if s.problem]
        for p in set(problems) - told:
            log.warning("waiting for the shards to start: %s", p)
        told.update(problems)
        if time.monotonic() >= deadline:
            why = f": {'; '.join(problems)}" if problems else ""
            raise TimeoutError(f"the shards of {cfg.cluster_name!r} did not all start within {ready_timeout:.0f}s"
                               f"{why}")
    return handle, RayControlPlane(handle)


def start_jobs(cfg: ClusterConfig) -> RayJobs:
    """Gets (or creates) the cluster's jobs actor; call after :func:`start_cluster`."""
    handle = JobsActor.options(
        name=jobs_name(cfg.cluster_name), namespace=cfg.namespace, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, max_concurrency=16, num_cpus=0,
    ).remote(cfg.cluster_name, cfg.namespace, os.path.abspath(cfg.data_dir), cfg.tls)
    return RayJobs(handle)


def stop_jobs(jobs: RayJobs) -> None:
    """Stops the jobs actor (running jobs stop at a checkpoint and resume when it starts again)."""
    try:
        ray.get(jobs.handle.close.remote(), timeout=60)
    finally:
        ray.kill(jobs.handle, no_restart=True)


def stop_cluster(handle) -> None:
    """Kills the shards and the controller (their storage stays)."""
    try:
        ray.get(handle.shutdown.remote(), timeout=60)
    finally:
        ray.kill(handle, no_restart=True)
