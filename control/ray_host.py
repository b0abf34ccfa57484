"""ShardHostActor: several shards in one Ray actor, behind one gRPC server (``ClusterConfig.shards_per_process`` > 1).

What it is for and what stays each shard's own: shard.host. Which shards a process holds: control.placer
``process_of``. The actor is named, detached and restarted by Ray (``max_restarts=-1``) like a ShardActor; a
restarted one asks the controller which shards the cluster has, loads those that are its own from storage and
registers each at its address. The controller's calls name their shard. ``control.ray_placer.RayPlacer`` starts it.

Uses ray, faiss, lookalike (config, gpu, metrics, net, security, tracing), shard (the Shard, its servicer in a
host) and control (placer, ray_common).
"""

from __future__ import annotations

import logging
import os
import threading

import faiss
import ray

from control.placer import process_of
from control.ray_common import actor_logging, controller_name, unwrap
from lookalike import tracing
from lookalike.config import CollectionConfig
from lookalike.errors import InvalidArgument, Unavailable
from lookalike.gpu import backend_for_shard
from lookalike.metrics import serve_metrics
from lookalike.security import is_loopback
from shard.host import HostServicer, create_host_server, host_shard
from shard.osutil import allocator_stats
from shard.shard import Shard

log = logging.getLogger(__name__)


@ray.remote
class ShardHostActor:
    """The shards of process ``number`` (control.placer ``process_of(shard, per_process, initial)``).

    Args:
        gpus: GPUs of each shard (the actor has ``gpus`` x per_process of them).
    """

    def __init__(self, number: int, per_process: int, initial: int, data_dir: str, cluster: str, namespace: str,
                 threads: int, host: str, segment_bytes: int, capacity_bytes: int = 0, gpus: float = 0.0, tls=None,
                 metrics_port: int = -1):
        actor_logging()
        try:  # the OTEL_* environment the actor got (serve's, in the embedded cluster)
            tracing.setup("lookalike-shard")
        except ValueError as err:  # a node's own environment naming no installed exporter: serve without traces
            log.warning("tracing off: %s", err)
        # no more FAISS threads than the node has cores: Ray's CPUs may be more (the embedded cluster counts its
        # shards' CPUs whatever the machine), and OpenMP threads past the cores spin for the ones that work
        threads = max(1, min(threads, len(os.sched_getaffinity(0))))
        faiss.omp_set_num_threads(threads)
        self.number, self.per_process, self.initial = number, per_process, initial
        self.name = f"proc-{number}"
        self._shard_args = dict(storage_root=data_dir, segment_bytes=segment_bytes, capacity_bytes=capacity_bytes)
        self._gpus = gpus
        self.host = HostServicer(self.name, threads)
        self.shards: dict[str, Shard] = {}
        self._locks: dict[str, threading.Lock] = {}  # per shard: its collections open and drop one at a time
        self._lock = threading.Lock()
        bind = f"{host}:0" if is_loopback(host) else "0.0.0.0:0"
        self.server, port, self._health, self._checker = create_host_server(
            self.host, bind, max_workers=max(16, 4 * per_process), tls=tls)
        ip = ray.util.get_node_ip_address() if host in ("", "auto") else host
        self.address = f"{ip}:{port}"
        self._metrics = None  # its Prometheus endpoint, when it serves one
        self.metrics_address = self._serve_metrics(bind.rpartition(":")[0], ip, metrics_port, tls)
        self.node = ray.get_runtime_context().get_node_id()
        self._controller = ray.get_actor(controller_name(cluster), namespace=namespace)
        threading.Thread(target=self._load_mine, daemon=True, name="host-load").start()

    def _serve_metrics(self, bind: str, ip: str, port: int, tls) -> str:
        """Its Prometheus endpoint (the registry of this process: its shards, labelled); "" when off or refused."""
        if port < 0:
            return ""
        try:
            server = serve_metrics(bind, port, tls)
        except (InvalidArgument, OSError) as err:  # beyond loopback without TLS: the shards serve, unscraped
            log.warning("%s serves no metrics: %s", self.name, err)
            return ""
        self._metrics = server
        return f"{ip}:{server.port}"

    def _load_mine(self) -> None:
        """At start (and after a restart): the cluster's shards that are this process's."""
        try:
            infos = unwrap(self._controller.call.remote("shards"))
        except Exception:
            log.exception("%s could not ask the controller for its shards; exiting so that Ray restarts it",
                          self.name)
            os._exit(1)
        for info in infos:
            if process_of(info.shard_id, self.per_process, self.initial) == self.number:
                self.add_shard(info.shard_id)

    def add_shard(self, shard_id: str) -> None:
        """Starts serving a shard of this process (loading it in the background); nothing if it does already."""
        if process_of(shard_id, self.per_process, self.initial) != self.number:
            raise InvalidArgument(f"shard {shard_id} is not one of process {self.name}'s")
        with self._lock:
            if shard_id in self.shards:
                return
            shard = Shard(shard_id, gpu=backend_for_shard(self._gpus), **self._shard_args)
            shard.metrics_address = self.metrics_address
            self._locks[shard_id] = threading.Lock()
            self.shards[shard_id] = shard
        threading.Thread(target=self._load, args=(shard,), daemon=True, name=f"load-{shard_id}").start()

    def _load(self, shard: Shard) -> None:
        try:
            # Requests routed with a map older than this load are refused as stale (see ShardActor).
            epoch = unwrap(self._controller.call.remote("epoch"))
            for cfg, buckets in unwrap(self._controller.call.remote("assignments", shard.shard_id)):
                self.open_collection(shard.shard_id, cfg, buckets, epoch)
            host_shard(self.host, shard)
            shard.serving = True
            unwrap(self._controller.call.remote("register_shard", shard.shard_id, self.address, self.node))
            log.info("%s serving at %s (process %s)", shard.shard_id, self.address, self.name)
        except Exception:
            log.exception("%s failed to load; exiting so that Ray restarts process %s", shard.shard_id, self.name)
            os._exit(1)

    def _lock_of(self, shard_id: str) -> threading.Lock:
        """The shard's open lock, the shard started first: Ray runs the calls of a threaded actor in any order, so
        the controller's first call for a new shard may come before the placer's ``add_shard``."""
        self.add_shard(shard_id)
        return self._locks[shard_id]

    def _shard(self, shard_id: str) -> Shard:
        shard = self.shards.get(shard_id)
        if shard is None:
            raise Unavailable(f"shard {shard_id} is not running in process {self.name}")
        return shard

    def open_collection(self, shard_id: str, cfg: CollectionConfig, buckets: list[int], epoch: int = 0) -> int:
        with self._lock_of(shard_id):
            return self._shard(shard_id).open_collection(cfg, buckets, epoch)

    def drop_collection(self, shard_id: str, name: str) -> None:
        with self._lock_of(shard_id):
            self._shard(shard_id).drop_collection(name)

    # bucket moves (see control.controller)
    def join_buckets(self, shard_id: str, cfg: CollectionConfig, buckets: list[int], epoch: int) -> None:
        with self._lock_of(shard_id):
            self._shard(shard_id).join_buckets(cfg, buckets, epoch)

    def fence(self, shard_id: str, name: str, epoch: int) -> None:
        self._shard(shard_id).fence(name, epoch)

    def copy_in(self, shard_id: str, name: str, buckets: list[int], source: str, rate_bytes_s: float = 0) -> int:
        return self._shard(shard_id).copy_in(name, buckets, source, rate_bytes_s)

    def finish_join(self, shard_id: str, name: str, buckets: list[int]) -> None:
        self._shard(shard_id).finish_join(name, buckets)

    def drop_buckets(self, shard_id: str, name: str, buckets: list[int], epoch: int) -> int:
        return self._shard(shard_id).drop_buckets(name, buckets, epoch)

    def bucket_counts(self, shard_id: str, name: str) -> list[int]:
        return self._shard(shard_id).bucket_counts(name)

    def stats(self, shard_id: str) -> dict:
        return self._shard(shard_id).stats()

    # the collection's trained index (see control.controller, shard.trained)
    def train_collection(self, shard_id: str, cfg: CollectionConfig, version: int, sources: list, sample: int):
        return self._shard(shard_id).train_collection(cfg, version, sources, sample)

    def use_trained(self, shard_id: str, cfg: CollectionConfig) -> bool:
        return self._shard(shard_id).use_trained(cfg)

    def close(self) -> None:
        """A graceful stop: every shard stops serving, then checkpoints its indexes and closes its storage."""
        for shard in list(self.shards.values()):
            shard.serving = False
        for shard in list(self.shards.values()):
            shard.close()
        self._checker.stop()
        tracing.flush()

    def pid(self, shard_id: str = "") -> int:
        return os.getpid()

    def info(self, shard_id: str) -> dict:
        shard = self._shard(shard_id)
        return {"shard_id": shard_id, "address": self.address,
                "serving": shard.serving and shard_id in self.host.servicers(), "pid": os.getpid(),
                "node": self.node, "gpu": getattr(shard.gpu, "name", ""), "process": self.name,
                "allocator": allocator_stats()}
