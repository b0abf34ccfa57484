"""Ray at the edges: thin actor wrappers around the Controller and the Shard, and the control-plane client.

- ``ControllerActor``: named, detached, restarted on failure; it places one ``ShardActor`` per shard id.
- ``ShardActor``: named, detached, ``max_restarts=-1``; runs the shard's gRPC server on its node, loads what
  the controller says it owns, then registers its address. A restarted actor reloads from storage. Placed with
  ``num_gpus`` when the cluster has GPUs (``ClusterConfig.shard_gpus``): a shard given a GPU searches there.
- ``RayControlPlane``: what the router uses to reach the controller.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time

import ray

from lookalike.config import ClusterConfig, CollectionConfig
from control.controller import Controller, stored_shards
from lookalike.gpu import shard_num_gpus

log = logging.getLogger(__name__)

# A shard actor Ray has not placed for this long, while no node has the resources it needs free, is reported as
# one that cannot be placed. Longer than a worker process takes to start on a busy node (while it starts, the
# actor holds its resources but has no worker yet).
PLACEMENT_GRACE_S = 5.0


def _controller_name(cluster: str) -> str:
    return f"{cluster}-controller"


def _unwrap(ref, timeout: float | None = None):
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


@ray.remote
class ShardActor:
    def __init__(self, shard_id: str, data_dir: str, cluster: str, namespace: str, threads: int, host: str,
                 segment_bytes: int, capacity_bytes: int = 0, gpus: float = 0.0, tls=None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        import faiss

        from lookalike.gpu import backend_for_shard
        from lookalike.net import set_serving
        from lookalike.security import is_loopback
        from shard.shard import Shard
        from shard.server import SERVICE_NAME, create_shard_server

        faiss.omp_set_num_threads(max(1, threads))
        self.shard_id = shard_id
        # Ray gave this actor `gpus` GPUs (CUDA_VISIBLE_DEVICES names them): search there when faiss can.
        self.shard = Shard(shard_id, data_dir, segment_bytes=segment_bytes, capacity_bytes=capacity_bytes,
                           gpu=backend_for_shard(gpus))
        self._open_lock = threading.Lock()
        # A loopback shard (the embedded cluster) listens on loopback only; in a Ray cluster, on its node, with
        # mutual TLS when the cluster has certificates (tls: lookalike.security.TLSConfig).
        bind = f"{host}:0" if is_loopback(host) else "0.0.0.0:0"
        self.server, port, _servicer, self._health = create_shard_server(self.shard, bind, tls=tls)
        ip = ray.util.get_node_ip_address() if host in ("", "auto") else host
        self.address = f"{ip}:{port}"
        self.node = ray.get_runtime_context().get_node_id()
        self._controller = ray.get_actor(_controller_name(cluster), namespace=namespace)
        self._set_serving = lambda: set_serving(self._health, [SERVICE_NAME])
        self._set_not_serving = lambda: set_serving(self._health, [SERVICE_NAME], False)
        threading.Thread(target=self._load, daemon=True, name="shard-load").start()

    def _load(self) -> None:
        try:
            # Requests routed with a map older than this load are refused as stale (a move may have ended while
            # this shard was down).
            epoch = _unwrap(self._controller.call.remote("epoch"))
            for cfg, buckets in _unwrap(self._controller.call.remote("assignments", self.shard_id)):
                self.open_collection(cfg, buckets, epoch)
            self.shard.serving = True
            self._set_serving()
            _unwrap(self._controller.call.remote("register_shard", self.shard_id, self.address, self.node))
            log.info("%s serving at %s", self.shard_id, self.address)
        except Exception:
            log.exception("%s failed to load; exiting so that Ray restarts it", self.shard_id)
            os._exit(1)

    def open_collection(self, cfg: CollectionConfig, buckets: list[int], epoch: int = 0) -> int:
        with self._open_lock:
            return self.shard.open_collection(cfg, buckets, epoch)

    def drop_collection(self, name: str) -> None:
        with self._open_lock:
            self.shard.drop_collection(name)

    # bucket moves (see control.controller)
    def join_buckets(self, cfg: CollectionConfig, buckets: list[int], epoch: int) -> None:
        with self._open_lock:
            self.shard.join_buckets(cfg, buckets, epoch)

    def fence(self, name: str, epoch: int) -> None:
        self.shard.fence(name, epoch)

    def copy_in(self, name: str, buckets: list[int], source: str, rate_bytes_s: float = 0) -> int:
        return self.shard.copy_in(name, buckets, source, rate_bytes_s)

    def finish_join(self, name: str, buckets: list[int]) -> None:
        self.shard.finish_join(name, buckets)

    def drop_buckets(self, name: str, buckets: list[int], epoch: int) -> int:
        return self.shard.drop_buckets(name, buckets, epoch)

    def bucket_counts(self, name: str) -> list[int]:
        return self.shard.bucket_counts(name)

    def stats(self) -> dict:
        return self.shard.stats()

    # the collection's trained index (see control.controller, shard.trained)
    def train_collection(self, cfg: CollectionConfig, version: int, sources: list, sample: int) -> dict:
        return self.shard.train_collection(cfg, version, sources, sample)

    def use_trained(self, cfg: CollectionConfig) -> bool:
        return self.shard.use_trained(cfg)

    def close(self) -> None:
        """A graceful stop: NOT_SERVING, then each collection checkpoints its index and closes its storage."""
        self._set_not_serving()
        self.shard.serving = False
        self.shard.close()

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict:
        return {"shard_id": self.shard_id, "address": self.address, "serving": self.shard.serving, "pid": os.getpid(),
                "node": self.node, "gpu": getattr(self.shard.gpu, "name", "")}


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
        self._handles: dict[str, ray.actor.ActorHandle] = {}
        self._ready: dict[str, ray.ObjectRef] = {}       # shard id -> its actor's __ray_ready__
        self._waiting_since: dict[str, float] = {}       # shard id -> when it was first seen waiting for resources

    def actor_options(self, shard_id: str) -> dict:
        """Ray options of a shard's actor."""
        cfg = self.cfg
        return dict(
            name=f"{cfg.cluster_name}-{shard_id}", namespace=cfg.namespace, lifetime="detached",
            get_if_exists=True, max_restarts=-1, max_task_retries=3, max_concurrency=8,
            scheduling_strategy="SPREAD",  # shards on as many nodes as there are: a lost node costs few
            num_cpus=cfg.shard_num_cpus, num_gpus=self.num_gpus, memory=cfg.shard_memory or None,
            # Few malloc arenas: each gRPC thread would otherwise keep its own heap of freed request buffers.
            runtime_env={"env_vars": {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
                                      "OMP_NUM_THREADS": str(shard_threads(cfg))}},
        )

    def _handle(self, shard_id: str):
        h = self._handles.get(shard_id)
        if h is None:
            cfg = self.cfg
            h = ShardActor.options(**self.actor_options(shard_id)).remote(
                shard_id, os.path.abspath(cfg.data_dir), cfg.cluster_name, cfg.namespace,
                shard_threads(cfg), cfg.shard_host, self.segment_bytes, cfg.shard_memory,
                self.num_gpus, cfg.tls)
            self._handles[shard_id] = h
            self._ready[shard_id] = h.__ray_ready__.remote()
        return h

    def ensure_shard(self, shard_id: str) -> None:
        self._handle(shard_id)

    def open_collection(self, shard_id: str, cfg: CollectionConfig, buckets: list[int]) -> None:
        try:
            _unwrap(self._handle(shard_id).open_collection.remote(cfg, buckets), timeout=600)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
            # A shard that is down loads its assignments itself when it comes back.
            log.warning("could not reach %s to open %s: %s", shard_id, cfg.name, err)

    def drop_collection(self, shard_id: str, name: str) -> None:
        try:
            _unwrap(self._handle(shard_id).drop_collection.remote(name), timeout=120)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
            log.warning("could not reach %s to drop %s: %s", shard_id, name, err)

    # bucket moves: errors propagate (the controller rolls the move back)
    def join_buckets(self, shard_id, cfg, buckets, epoch):
        _unwrap(self._handle(shard_id).join_buckets.remote(cfg, buckets, epoch), timeout=120)

    def fence(self, shard_id, name, epoch):
        _unwrap(self._handle(shard_id).fence.remote(name, epoch), timeout=120)

    def copy_in(self, shard_id, name, buckets, source, rate_bytes_s=0):
        return _unwrap(self._handle(shard_id).copy_in.remote(name, buckets, source, rate_bytes_s), timeout=3600)

    def finish_join(self, shard_id, name, buckets):
        _unwrap(self._handle(shard_id).finish_join.remote(name, buckets), timeout=120)

    def drop_buckets(self, shard_id, name, buckets, epoch):
        return _unwrap(self._handle(shard_id).drop_buckets.remote(name, buckets, epoch), timeout=300)

    def bucket_counts(self, shard_id, name):
        return _unwrap(self._handle(shard_id).bucket_counts.remote(name), timeout=60)

    def stats(self, shard_id):
        return _unwrap(self._handle(shard_id).stats.remote(), timeout=30)

    # training: hours at most (a k-means over a large sample on a CPU node; encoding a shard's items)
    def train_collection(self, shard_id, cfg, version, sources, sample):
        return _unwrap(self._handle(shard_id).train_collection.remote(cfg, version, sources, sample), timeout=4 * 3600)

    def use_trained(self, shard_id, cfg):
        return _unwrap(self._handle(shard_id).use_trained.remote(cfg), timeout=4 * 3600)

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
        for h in self._handles.values():
            try:
                closing.append(h.close.remote())
            except Exception as err:  # noqa: BLE001: a dead actor: nothing to close
                log.info("shard not closed: %s", err)
        if closing:
            ready, pending = ray.wait(closing, num_returns=len(closing), timeout=close_timeout)
            if pending:
                log.warning("%d shard(s) did not finish their checkpoints in %.0fs; stopping them anyway (their next "
                            "start replays what the last checkpoint does not cover)", len(pending), close_timeout)
        for h in self._handles.values():
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


@ray.remote
class ControllerActor:
    def __init__(self, cfg: ClusterConfig, segment_bytes: int):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._placer = RayPlacer(cfg, segment_bytes)
        self._ctl = Controller(cfg.data_dir, cfg.shards, self._placer, cfg.policy)
        self._ctl.start()
        # After a restart of this actor the shards are still running and will not register again: ask them.
        threading.Thread(target=self._rediscover, daemon=True, name="rediscover").start()

    def _rediscover(self) -> None:
        for sid, handle in list(self._placer._handles.items()):
            try:
                info = ray.get(handle.info.remote(), timeout=60)
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
        return {sid: ray.get(h.pid.remote()) for sid, h in self._placer._handles.items()}

    def shutdown(self) -> None:
        self._ctl.stop()
        self._placer.kill_all()


@ray.remote
class EncoderActor:
    """Runs encoders (on a GPU when Ray gave it one); models load on first use of each spec."""

    def __init__(self):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from router.encoding import LocalEncoderPool

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
        return _unwrap(actor.encode_many.remote(spec, list(images)), timeout=600)

    def close(self) -> None:
        for actor in self._actors:
            ray.kill(actor)


class RayControlPlane:
    """The router's view of the controller actor (implements router.core.ControlPlane)."""

    def __init__(self, handle, timeout: float = 60.0):
        self.handle = handle
        self.timeout = timeout

    def _call(self, method, *args, timeout=None):
        return _unwrap(self.handle.call.remote(method, *args), timeout=timeout or self.timeout)

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

    def training_status(self, name):
        return self._call("training_status", name)

    def training_statuses(self):
        return self._call("training_statuses")

    def train(self, name):
        return self._call("train", name, timeout=120)


@ray.remote(num_cpus=0)
def _lookalike_location() -> str:
    import lookalike

    return os.path.dirname(lookalike.__file__)


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
    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.init(address=address, namespace=namespace, log_to_driver=log_to_driver)
            break
        except (ConnectionError, RuntimeError) as err:
            ray.shutdown()
            if time.monotonic() >= deadline:
                raise ConnectionError(f"could not join the Ray cluster at {address}: {err}") from err
            log.warning("Ray cluster at %s not ready (%s); retrying", address, str(err).splitlines()[0][:200])
            time.sleep(3)
    try:
        where = ray.get(_lookalike_location.remote(), timeout=timeout)
    except ray.exceptions.RayTaskError as err:
        raise RuntimeError(f"the Ray cluster at {address} cannot import lookalike: install it on every node "
                           f"(the images in docker/ have it) ({str(err.cause)[:200]})") from None
    log.info("joined Ray cluster at %s (lookalike on its nodes at %s)", address, where)


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
        name=_controller_name(cfg.cluster_name), namespace=cfg.namespace, lifetime="detached",
        get_if_exists=True, max_restarts=-1, max_task_retries=-1, max_concurrency=64, num_cpus=0,
    ).remote(cfg, segment_bytes)
    started = len(_unwrap(handle.call.remote("shards"), timeout=ready_timeout + 30))
    log.info("%s", startup_message(started, cfg.shards, stored, cfg.data_dir))
    deadline, told = time.monotonic() + ready_timeout, set()
    while not _unwrap(handle.call.remote("wait_ready", min(2.0, max(0.0, deadline - time.monotonic()))),
                      timeout=ready_timeout + 30):
        # Keep waiting while a shard cannot be placed (an autoscaler may add a node), but say why.
        problems = [f"shard {s.shard_id} {s.problem}" for s in _unwrap(handle.call.remote("shards"), timeout=60)
                    if s.problem]
        for p in set(problems) - told:
            log.warning("waiting for the shards to start: %s", p)
        told.update(problems)
        if time.monotonic() >= deadline:
            why = f": {'; '.join(problems)}" if problems else ""
            raise TimeoutError(f"the shards of {cfg.cluster_name!r} did not all start within {ready_timeout:.0f}s"
                               f"{why}")
    return handle, RayControlPlane(handle)


@ray.remote
class JobsActor:
    """The cluster's catalog jobs (jobs.catalog.JobManager) in one detached actor, so that every router sees
    the same jobs and a job outlives the router that started it. Restarted by Ray, it resumes the jobs that were
    running from their checkpoints."""

    def __init__(self, cluster_name: str, namespace: str, data_dir: str, tls=None):
        import functools

        from jobs.catalog import JobManager
        from router.core import Router
        from router.shard_client import GrpcShardClient

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        controller = ray.get_actor(_controller_name(cluster_name), namespace=namespace)
        self._router = Router(RayControlPlane(controller), connect=functools.partial(GrpcShardClient, tls=tls))
        self._jobs = JobManager(self._router, data_dir, resume=True)

    def call(self, method: str, *args):
        return getattr(self._jobs, method)(*args)

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self._jobs.close()
        self._router.close()


class RayJobs:
    """The router's view of the jobs actor (the interface of jobs.catalog.JobManager)."""

    def __init__(self, handle, timeout: float = 60.0):
        self.handle = handle
        self.timeout = timeout

    def _call(self, method, *args):
        return _unwrap(self.handle.call.remote(method, *args), timeout=self.timeout)

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


def _jobs_name(cluster: str) -> str:
    return f"{cluster}-jobs"


def start_jobs(cfg: ClusterConfig) -> RayJobs:
    """Gets (or creates) the cluster's jobs actor; call after :func:`start_cluster`."""
    handle = JobsActor.options(
        name=_jobs_name(cfg.cluster_name), namespace=cfg.namespace, lifetime="detached", get_if_exists=True,
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
