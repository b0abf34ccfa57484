"""A whole cluster in this process, without Ray: controller, shards (real gRPC servers, or in-process) and a
router. For tests and benchmarks that need no Ray; `lookalike serve` uses control.ray_cluster instead."""

from __future__ import annotations

import functools
import pathlib

from jobs import JobManager
from lookalike.config import CollectionConfig, MovePolicy
from control.controller import Controller
from lookalike.errors import Unavailable
from lookalike.metrics import serve_metrics, shard_registry
from lookalike.net import set_serving
from router.core import Router
from router.shard_client import GrpcShardClient, InProcessShardClient
from control.placer import process_of
from shard.host import HostServicer, create_host_server, host_shard
from shard.shard import Shard
from shard.server import SERVICE_NAME, create_shard_server


class LocalPlacer:
    """Runs each shard in this process with its own gRPC server on 127.0.0.1 (port 0).

    Args:
        gpu: a GPU backend (``lookalike.gpu``) every shard uses, or None: CPU shards.
        metrics: each shard also serves its own metrics over HTTP on 127.0.0.1 (a free port; the samples of the
            process registry labelled with its id).
        tls: the internal hop's mutual TLS (lookalike.security.TLSConfig) the shards serve with; None: plaintext.
        per_process: shards per gRPC server (shard.host), as processes would hold them (control.placer
            ``process_of``; ``initial`` shards to start with); 1: a server each.
    """

    def __init__(self, data_dir: pathlib.Path, segment_bytes: int = 64 << 20, capacity_bytes: int = 0, gpu=None,
                 metrics: bool = False, tls=None, per_process: int = 1, initial: int = 1):
        self.data_dir = pathlib.Path(data_dir)
        self.segment_bytes = segment_bytes
        self.capacity_bytes = capacity_bytes
        self.gpu = gpu
        self.tls = tls
        self.shards: dict[str, Shard] = {}
        self.servers: dict[str, tuple] = {}
        self.metrics = {} if metrics else None  # shard id -> lookalike.metrics.MetricsServer
        self.controller: Controller | None = None
        self.per_process = per_process
        self.initial = initial
        self.hosts: dict[int, tuple] = {}  # process number -> (HostServicer, server, port, health checker)

    def ensure_shard(self, shard_id: str) -> None:
        if shard_id in self.shards:
            return
        shard = Shard(shard_id, self.data_dir, segment_bytes=self.segment_bytes, capacity_bytes=self.capacity_bytes,
                      gpu=self.gpu)
        if self.per_process > 1:
            server, port, servicer, health = self._host_shard(shard)
        else:
            server, port, servicer, health = create_shard_server(shard, "127.0.0.1:0", max_workers=8, tls=self.tls)
        self.shards[shard_id] = shard
        self.servers[shard_id] = (server, port, servicer, health)
        if self.metrics is not None:
            self.metrics[shard_id] = serve_metrics("127.0.0.1", 0, registry=shard_registry(shard_id))
            shard.metrics_address = self.metrics[shard_id].address
        epoch = self.controller.epoch()
        for cfg, buckets in self.controller.assignments(shard_id):
            shard.open_collection(cfg, buckets, epoch)
        shard.serving = True
        set_serving(health, [SERVICE_NAME])
        self.controller.register_shard(shard_id, f"127.0.0.1:{port}", "local")

    def _host_shard(self, shard: Shard) -> tuple:
        """Serves ``shard`` from the server of its process's number (started with its first shard)."""
        number = process_of(shard.shard_id, self.per_process, self.initial)
        if number not in self.hosts:
            host = HostServicer(f"proc-{number}")
            server, port, health, checker = create_host_server(host, "127.0.0.1:0", max_workers=8, tls=self.tls)
            self.hosts[number] = (host, server, port, health, checker)
        host, server, port, health, _checker = self.hosts[number]
        return server, port, host_shard(host, shard), health

    def open_collection(self, shard_id: str, cfg: CollectionConfig, buckets: list[int]) -> None:
        self.shards[shard_id].open_collection(cfg, buckets)

    def drop_collection(self, shard_id: str, name: str) -> None:
        self.shards[shard_id].drop_collection(name)

    def _shard(self, shard_id: str) -> Shard:
        shard = self.shards.get(shard_id)
        if shard is None:
            raise Unavailable(f"shard {shard_id} is not running")
        return shard

    def join_buckets(self, shard_id, cfg, buckets, epoch):
        self._shard(shard_id).join_buckets(cfg, buckets, epoch)

    def fence(self, shard_id, name, epoch):
        self._shard(shard_id).fence(name, epoch)

    def copy_in(self, shard_id, name, buckets, source, rate_bytes_s=0):
        return self._shard(shard_id).copy_in(name, buckets, source, rate_bytes_s)

    def finish_join(self, shard_id, name, buckets):
        self._shard(shard_id).finish_join(name, buckets)

    def drop_buckets(self, shard_id, name, buckets, epoch):
        return self._shard(shard_id).drop_buckets(name, buckets, epoch)

    def bucket_counts(self, shard_id, name):
        return self._shard(shard_id).bucket_counts(name)

    def train_collection(self, shard_id, cfg, version, sources, sample):
        return self._shard(shard_id).train_collection(cfg, version, sources, sample)

    def use_trained(self, shard_id, cfg):
        return self._shard(shard_id).use_trained(cfg)

    def stats(self, shard_id):
        return self._shard(shard_id).stats()

    def stop_shard(self, shard_id: str) -> None:
        """Stops a shard as a crash would (no flush beyond what was acknowledged); a shard sharing a server with
        others leaves it (calls for it are then UNAVAILABLE), and the server stops with its last shard."""
        server, _port, servicer, _health = self.servers.pop(shard_id)
        if self.per_process > 1:
            number = process_of(shard_id, self.per_process, self.initial)
            host, _server, _port, _health, checker = self.hosts[number]
            host.remove(shard_id)
            if not host.servicers():
                checker.stop()
                server.stop(None)
                del self.hosts[number]
        else:
            servicer.health_checker.stop()
            server.stop(None)
        if self.metrics and shard_id in self.metrics:
            self.metrics.pop(shard_id).close()
        self.shards.pop(shard_id).close()
        self.controller.unregister_shard(shard_id)

    def stop(self) -> None:
        for sid in list(self.servers):
            self.stop_shard(sid)


class LocalCluster:
    """Controller + shards + router in this process.

    Args:
        data_dir: storage root.
        shards: number of shards (when the storage holds no cluster yet).
        transport: "grpc" (real gRPC to each shard) or "inprocess" (direct calls through the same servicers).
        gpu: a GPU backend the shards share (``lookalike.gpu.GpuBackend``, or ``EmulatedGpuBackend`` in tests);
            None: CPU shards.
        metrics: each shard serves its metrics on a port of its own (:class:`LocalPlacer`).
        tls: the internal hop's mutual TLS (lookalike.security.TLSConfig, e.g. ``TLSConfig.internal()``): the shards
            serve with it and the router connects with it (transport "grpc"); None: plaintext on loopback.
        shards_per_process: shards sharing one gRPC server (shard.host; transport "grpc"), as ``lookalike serve
            --shards-per-process`` puts them in one process.
    """

    def __init__(self, data_dir, shards: int = 2, transport: str = "grpc", segment_bytes: int = 64 << 20,
                 refresh_interval: float = 0.1, policy: MovePolicy = MovePolicy(grace_s=0.3),
                 capacity_bytes: int = 0, gpu=None, metrics: bool = False, tls=None, shards_per_process: int = 1):
        if shards_per_process > 1 and transport != "grpc":
            raise ValueError("shards share a process's server over gRPC only (transport 'grpc')")
        self.placer = LocalPlacer(data_dir, segment_bytes, capacity_bytes, gpu, metrics, tls, shards_per_process,
                                  shards)
        self.controller = Controller(data_dir, shards, self.placer, policy)
        self.placer.controller = self.controller
        self.controller.start()
        if transport == "inprocess":
            def connect(address: str):
                for _server, port, servicer, _health in self.placer.servers.values():
                    if f"127.0.0.1:{port}" == address:
                        return InProcessShardClient(servicer)
                raise Unavailable(f"no shard listens at {address}")
        else:
            connect = functools.partial(GrpcShardClient, tls=tls)
        self.router = Router(self.controller, connect, refresh_interval=refresh_interval)
        self.jobs = JobManager(self.router, data_dir)

    def close(self) -> None:
        self.jobs.close()
        self.controller.stop()
        self.router.close()
        self.placer.stop()
