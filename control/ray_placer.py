"""RayPlacer: places one ShardActor per shard id with Ray resources (or, with ``shards_per_process`` > 1, one
ShardHostActor per group of shards: control.ray_host), forwards the controller's calls to them, and says why Ray
cannot place one.

Uses ray, lookalike (config, gpu) and control (placer, ray_common, ray_host, ray_shard); implements
``control.placer.ShardPlacer``.
"""

from __future__ import annotations

import logging
import os
import time

import ray

from control.placer import process_of
from control.ray_common import shard_threads, unwrap
from control.ray_host import ShardHostActor
from control.ray_shard import ShardActor
from lookalike.config import ClusterConfig, CollectionConfig
from lookalike.gpu import shard_num_gpus
from shard.osutil import SHARD_PROCESS_ENV, host_process_env

log = logging.getLogger(__name__)

# A shard actor Ray has not placed for this long, while no node has the resources it needs free, is reported as
# one that cannot be placed. Longer than a worker process takes to start on a busy node (while it starts, the
# actor holds its resources but has no worker yet).
PLACEMENT_GRACE_S = 5.0


class RayPlacer:
    """Places ShardActors with Ray resources; one named actor per shard id.

    Args:
        cluster_gpus: GPUs of the Ray cluster (None: ``ray.cluster_resources()``), for ``cfg.shard_gpus="auto"``.
    """

    def __init__(self, cfg: ClusterConfig, segment_bytes: int, cluster_gpus: float | None = None):
        self.cfg = cfg
        self.segment_bytes = segment_bytes
        if cluster_gpus is None:
            cluster_gpus = ray.cluster_resources().get("GPU", 0)
        self.num_gpus = shard_num_gpus(cfg.shard_gpus, cluster_gpus, cfg.shards)
        if self.num_gpus:
            log.info("shards placed with %g GPU each (the cluster has %g GPUs)", self.num_gpus, cluster_gpus)
        self.per_process = max(1, int(cfg.shards_per_process))
        self._handles: dict[str, ray.actor.ActorHandle] = {}   # shard id -> its actor
        self._hosts: dict[int, ray.actor.ActorHandle] = {}     # process number -> its ShardHostActor
        self._ready: dict[str, ray.ObjectRef] = {}       # shard id -> its actor's __ray_ready__
        self._waiting_since: dict[str, float] = {}       # shard id -> when it was first seen waiting for resources

    def actor_options(self, shard_id: str) -> dict:
        """Ray options of a shard's actor (of its process's, holding ``shards_per_process`` shards: their
        resources together)."""
        cfg = self.cfg
        g = self.per_process
        name = shard_id if g == 1 else f"proc-{process_of(shard_id, g, cfg.shards)}" if shard_id else ""
        # A process of several shards runs FAISS calls of several at once: OpenMP threads that wait sleep rather
        # than spin on the cores. It allocates with jemalloc (shard.osutil.host_process_env).
        host = {"OMP_WAIT_POLICY": "PASSIVE", **host_process_env(os.environ.get("LD_PRELOAD", ""))} if g > 1 else {}
        return dict(
            name=f"{cfg.cluster_name}-{name}", namespace=cfg.namespace, lifetime="detached",
            get_if_exists=True, max_restarts=-1, max_task_retries=3, max_concurrency=8 * g,
            scheduling_strategy="SPREAD",  # shards on as many nodes as there are: a lost node costs few
            num_cpus=cfg.shard_num_cpus * g, num_gpus=self.num_gpus * g, memory=cfg.shard_memory * g or None,
            # the allocator settings of a shard's process (shard.osutil) and its FAISS threads
            runtime_env={"env_vars": {**SHARD_PROCESS_ENV, "OMP_NUM_THREADS": str(self._threads()), **host}},
        )

    def _handle(self, shard_id: str):
        h = self._handles.get(shard_id)
        if h is None:
            cfg = self.cfg
            args = (os.path.abspath(cfg.data_dir), cfg.cluster_name, cfg.namespace, self._threads(), cfg.shard_host,
                    self.segment_bytes, cfg.shard_memory, self.num_gpus, cfg.tls, cfg.shard_metrics_port)
            if self.per_process == 1:
                h = ShardActor.options(**self.actor_options(shard_id)).remote(shard_id, *args)
            else:
                number = process_of(shard_id, self.per_process, cfg.shards)
                h = self._hosts.get(number)
                if h is None:
                    h = self._hosts[number] = ShardHostActor.options(**self.actor_options(shard_id)).remote(
                        number, self.per_process, cfg.shards, *args)
                h.add_shard.remote(shard_id)
            self._handles[shard_id] = h
            self._ready[shard_id] = h.__ray_ready__.remote()
        return h

    def _threads(self) -> int:
        """FAISS threads of a shard's process: its Ray CPUs (those of its shards together), at least one."""
        g = self.per_process
        return shard_threads(self.cfg) if g == 1 else max(1, int(self.cfg.shard_num_cpus * g))

    def _call(self, shard_id: str, method: str, *args):
        """A call of the shard's actor (naming the shard to a process of several)."""
        m = getattr(self._handle(shard_id), method)
        return m.remote(*args) if self.per_process == 1 else m.remote(shard_id, *args)

    def ensure_shard(self, shard_id: str) -> None:
        self._handle(shard_id)

    def shard_ids(self) -> list[str]:
        """The shards this placer started (or found)."""
        return list(self._handles)

    def info(self, shard_id: str):
        """A ref to the shard's info (its address, whether it serves, its process's pid, ...)."""
        return self._call(shard_id, "info")

    def pid(self, shard_id: str):
        """A ref to the pid of the shard's process."""
        return self._call(shard_id, "pid")

    def open_collection(self, shard_id: str, cfg: CollectionConfig, buckets: list[int]) -> None:
        try:
            unwrap(self._call(shard_id, "open_collection", cfg, buckets), timeout=600)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
            # A shard that is down loads its assignments itself when it comes back.
            log.warning("could not reach %s to open %s: %s", shard_id, cfg.name, err)

    def drop_collection(self, shard_id: str, name: str) -> None:
        try:
            unwrap(self._call(shard_id, "drop_collection", name), timeout=120)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
            log.warning("could not reach %s to drop %s: %s", shard_id, name, err)

    # bucket moves: errors propagate (the controller rolls the move back)
    def join_buckets(self, shard_id, cfg, buckets, epoch):
        unwrap(self._call(shard_id, "join_buckets", cfg, buckets, epoch), timeout=120)

    def fence(self, shard_id, name, epoch):
        unwrap(self._call(shard_id, "fence", name, epoch), timeout=120)

    def copy_in(self, shard_id, name, buckets, source, rate_bytes_s=0):
        return unwrap(self._call(shard_id, "copy_in", name, buckets, source, rate_bytes_s), timeout=3600)

    def finish_join(self, shard_id, name, buckets):
        unwrap(self._call(shard_id, "finish_join", name, buckets), timeout=120)

    def drop_buckets(self, shard_id, name, buckets, epoch):
        return unwrap(self._call(shard_id, "drop_buckets", name, buckets, epoch), timeout=300)

    def bucket_counts(self, shard_id, name):
        return unwrap(self._call(shard_id, "bucket_counts", name), timeout=60)

    def stats(self, shard_id):
        return unwrap(self._call(shard_id, "stats"), timeout=30)

    # training: hours at most (a k-means over a large sample on a CPU node; encoding a shard's items)
    def train_collection(self, shard_id, cfg, version, sources, sample):
        return unwrap(self._call(shard_id, "train_collection", cfg, version, sources, sample),
                      timeout=4 * 3600)

    def use_trained(self, shard_id, cfg):
        return unwrap(self._call(shard_id, "use_trained", cfg), timeout=4 * 3600)

    def needs(self) -> dict[str, float]:
        """Ray resources one shard actor takes (those it asks for), e.g. {"CPU": 1.0}."""
        opts = self.actor_options("")
        return {r: float(opts[k]) for r, k in (("CPU", "num_cpus"), ("GPU", "num_gpus"), ("memory", "memory"))
                if opts[k]}

    def placement_problem(self, shard_id: str) -> str:
        """Why Ray does not place the shard's actor ("cannot be placed: it needs 1 CPU and 0.0 of 2.0 CPUs are
        free"), or "" when it is placed, starting, or this cannot tell.

        A shard counts as waiting for resources when its actor is pending creation (or restarting) with no worker
        yet and no alive node has what it needs free; it is reported once that has lasted PLACEMENT_GRACE_S, or at
        once when no node could ever hold it.
        """
        h = self._handles.get(shard_id)
        if h is None:
            return ""
        waiting = _waiting_for_worker(h)
        if waiting is None:  # no actor table: fall back on the actor not having started
            ready = self._ready.get(shard_id)
            waiting = ready is not None and not ray.wait([ready], timeout=0)[0]
        shortfall, never = _shortfall(self.needs()) if waiting else ("", False)
        if not shortfall:
            self._waiting_since.pop(shard_id, None)
            return ""
        since = self._waiting_since.setdefault(shard_id, time.monotonic())
        if never or time.monotonic() - since >= PLACEMENT_GRACE_S:
            return f"cannot be placed: {shortfall}"
        return ""

    def kill_all(self, close_timeout: float = 20.0) -> None:
        """Stops every shard: first a graceful close (each collection writes its index checkpoint, so the next
        start loads instead of rebuilding; at most ``close_timeout`` seconds for all of them together: a checkpoint
        cut short is never used), then kills the actors."""
        closing = []
        actors = list({id(h): h for h in self._handles.values()}.values())  # a process of several shards once
        for h in actors:
            try:
                closing.append(h.close.remote())
            except Exception as err:  # noqa: BLE001: a dead actor: nothing to close
                log.info("shard not closed: %s", err)
        if closing:
            ready, pending = ray.wait(closing, num_returns=len(closing), timeout=close_timeout)
            if pending:
                log.warning("%d shard(s) did not finish their checkpoints in %.0fs; stopping them anyway (their next "
                            "start replays what the last checkpoint does not cover)", len(pending), close_timeout)
        for h in actors:
            ray.kill(h, no_restart=True)


def _waiting_for_worker(handle) -> bool | None:
    """Whether an actor waits for a worker (pending creation or restarting, and no worker leased to it: in Ray's
    actor table its address has no port until a node grants it one). None: the table cannot be read (it is
    Ray's internal API, read without the dashboard that ``ray.util.state`` needs)."""
    try:
        from ray._private import state

        row = state.actors(actor_id=handle._actor_id.hex())
        pending = row["State"] in ("PENDING_CREATION", "RESTARTING")
        return pending and not int((row.get("Address") or {}).get("Port") or 0)
    except Exception as err:
        log.debug("no actor table: %s", err)
        return None


def _amount(resource: str, x: float) -> str:
    if resource == "memory":
        return f"{x / 2**30:.1f} GiB of memory"
    return f"{x:g} {resource}{'' if x == 1 else 's'}"


def _shortfall(needs: dict[str, float]) -> tuple[str, bool]:
    """("it needs 1 CPU and 0.0 of 2.0 CPUs are free", never) when no alive Ray node has ``needs`` free, ("",
    False) when one has; ``never``: no node has that much at all (adding nodes like these would not help)."""
    nodes = {n["NodeID"]: n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")}
    try:
        from ray._private import state

        free = state.available_resources_per_node()
    except Exception:  # internal API gone: the whole cluster as one node (can only miss fragmentation)
        free = {"all": ray.available_resources()}
        nodes = {"all": ray.cluster_resources()}
    if any(all(f.get(r, 0.0) >= x for r, x in needs.items()) for nid, f in free.items() if nid in nodes):
        return "", False
    totals = {r: sum(t.get(r, 0.0) for t in nodes.values()) for r in needs}
    frees = {r: sum(free.get(nid, {}).get(r, 0.0) for nid in nodes) for r in needs}
    need = " and ".join(_amount(r, x) for r, x in needs.items())
    if not any(all(t.get(r, 0.0) >= x for r, x in needs.items()) for t in nodes.values()):
        most = ", ".join(_amount(r, max((t.get(r, 0.0) for t in nodes.values()), default=0.0)) for r in needs)
        return f"it needs {need} and no Ray node has that much (the largest has {most})", True
    short = [r for r in needs if frees[r] < needs[r]] or list(needs)
    have = "; ".join(f"{_of(r, frees[r], totals[r])} are free" for r in short)
    if not [r for r in needs if frees[r] < needs[r]]:
        have += f", but not on one node of {len(nodes)}"
    return f"it needs {need} and {have}", False


def _of(resource: str, free: float, total: float) -> str:
    """ "0.0 of 2.0 CPUs", "1.5 of 8.0 GiB of memory"."""
    if resource == "memory":
        return f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB of memory"
    return f"{free:.1f} of {total:.1f} {resource}s"

