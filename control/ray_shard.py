"""ShardActor: a shard in a Ray actor (named, detached, ``max_restarts=-1``).

It runs the shard's gRPC server on its node, loads what the controller says it owns, then registers its address.
A restarted actor reloads from storage. Placed with ``num_gpus`` when the cluster has GPUs
(``ClusterConfig.shard_gpus``): a shard given a GPU searches there. ``control.ray_placer.RayPlacer`` starts it.

Uses ray, faiss, lookalike (config, gpu, net, security, tracing), shard (the Shard and its gRPC server) and
control.ray_common.
"""

from __future__ import annotations

import logging
import os
import threading

import faiss
import ray

from control.ray_common import actor_logging, controller_name, unwrap
from lookalike import tracing
from lookalike.config import CollectionConfig
from lookalike.errors import InvalidArgument
from lookalike.gpu import backend_for_shard
from lookalike.metrics import serve_metrics
from lookalike.net import set_serving
from lookalike.security import is_loopback
from shard.osutil import allocator_stats
from shard.shard import Shard
from shard.server import SERVICE_NAME, create_shard_server

log = logging.getLogger(__name__)


@ray.remote
class ShardActor:
    """One shard: its gRPC server on this node, and the placement calls of the controller (``control.ray_placer``)."""

    def __init__(self, shard_id: str, data_dir: str, cluster: str, namespace: str, threads: int, host: str,
                 segment_bytes: int, capacity_bytes: int = 0, gpus: float = 0.0, tls=None, metrics_port: int = -1):
        actor_logging()
        try:  # the OTEL_* environment the actor got (serve's, in the embedded cluster)
            tracing.setup("lookalike-shard")
        except ValueError as err:  # a node's own environment naming no installed exporter: serve without traces
            log.warning("tracing off: %s", err)
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
        self._metrics = self._serve_metrics(bind.rpartition(":")[0], ip, metrics_port, tls)
        self.node = ray.get_runtime_context().get_node_id()
        self._controller = ray.get_actor(controller_name(cluster), namespace=namespace)
        self._set_serving = lambda: set_serving(self._health, [SERVICE_NAME])
        self._set_not_serving = lambda: set_serving(self._health, [SERVICE_NAME], False)
        threading.Thread(target=self._load, daemon=True, name="shard-load").start()

    def _serve_metrics(self, bind: str, ip: str, port: int, tls):
        """Its Prometheus endpoint (the whole registry of this process: one shard); None when off or refused."""
        if port < 0:
            return None
        try:
            server = serve_metrics(bind, port, tls)
        except (InvalidArgument, OSError) as err:  # beyond loopback without TLS: the shard serves, unscraped
            log.warning("%s serves no metrics: %s", self.shard_id, err)
            return None
        self.shard.metrics_address = f"{ip}:{server.port}"
        return server

    def _load(self) -> None:
        try:
            # Requests routed with a map older than this load are refused as stale (a move may have ended while
            # this shard was down).
            epoch = unwrap(self._controller.call.remote("epoch"))
            for cfg, buckets in unwrap(self._controller.call.remote("assignments", self.shard_id)):
                self.open_collection(cfg, buckets, epoch)
            self.shard.serving = True
            self._set_serving()
            unwrap(self._controller.call.remote("register_shard", self.shard_id, self.address, self.node))
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
        tracing.flush()

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict:
        return {"shard_id": self.shard_id, "address": self.address, "serving": self.shard.serving, "pid": os.getpid(),
                "node": self.node, "gpu": getattr(self.shard.gpu, "name", ""), "allocator": allocator_stats()}

