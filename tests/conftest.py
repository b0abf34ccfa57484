"""Shared fixtures: one Ray instance per test session (each ray.init costs seconds), data helpers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import random
import socket
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def wait_for(pred, timeout: float = 60.0) -> bool:
    """Polls ``pred`` every 0.2 s until it is true (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return False


def make_data(metric: str, n: int, dim: int, seed: int = 0, nq: int = 20):
    """(xb, xq) for a metric: uint8 codes (dim bits) for hamming, clustered float32 otherwise."""
    rng = np.random.default_rng(seed)
    if metric == "hamming":
        return rng.integers(0, 256, (n, dim // 8), dtype=np.uint8), rng.integers(0, 256, (nq, dim // 8), dtype=np.uint8)
    centers = rng.normal(size=(max(4, n // 100), dim)).astype(np.float32)
    xb = centers[rng.integers(0, len(centers), n)] + 0.3 * rng.normal(size=(n, dim)).astype(np.float32)
    xq = centers[rng.integers(0, len(centers), nq)] + 0.3 * rng.normal(size=(nq, dim)).astype(np.float32)
    return xb.astype(np.float32), xq.astype(np.float32)


def exact_knn(metric: str, xb, xq, k: int):
    """Ground truth (D, I) from one exact FAISS index over all the data."""
    from bench.loadtest import exact_knn as exact

    return exact(metric, xb, xq, k)


def assert_same_as_exact(metric, ids, D, xb, xq, k):
    """Sharded answers equal the exact index: same ids (float metrics), same distances (all metrics; hamming
    ties may order equal-distance ids differently, so there each returned id must have the reported distance)."""
    D_ref, I_ref = exact_knn(metric, xb, xq, k)
    for q in range(len(xq)):
        np.testing.assert_allclose(D[q, :len(ids[q])], D_ref[q], rtol=1e-4, atol=1e-4)
        if metric == "hamming":
            dist = np.unpackbits(np.bitwise_xor(xb[[int(i) for i in ids[q]]], xq[q]), axis=1).sum(axis=1)
            np.testing.assert_array_equal(dist, D_ref[q])
        else:
            assert ids[q] == [str(i) for i in I_ref[q]], f"query {q}"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server that cannot be told to bind port 0 (a `lookalike serve`).

    Drawn below the kernel's ephemeral range (ip_local_port_range) and above Ray's worker ports (10002-19999): a
    port of the ephemeral range, free now, could be taken by any socket bound to port 0 before the server binds it
    (the serve's own shards and Ray's processes bind many), and the server then fails to start."""
    try:
        low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, max(20001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args, target: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs ``lookalike ARGS --target TARGET`` in a process of its own; its output captured as text."""
    return subprocess.run([sys.executable, "-m", "tools.cli", *args, "--target", target],
                          capture_output=True, text=True, timeout=timeout)


def stop_serve(proc: subprocess.Popen, *signals: int, timeout: float = 90) -> str:
    """Sends ``signals`` (default SIGINT) to a `lookalike serve` process and waits for it to end (killing it after
    ``timeout`` seconds); returns its output. The caller checks ``proc.returncode``."""
    import signal

    for sig in signals or (signal.SIGINT,):
        proc.send_signal(sig)
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0]


@contextlib.contextmanager
def served_local_cluster(data_dir, shards: int, timeout: float = 30, jobs: bool = False):
    """(LocalCluster, Client) of an in-process cluster (no Ray) behind a router gRPC server on 127.0.0.1; ``jobs``:
    it serves the catalog jobs too (the cluster's JobManager)."""
    from control.local import LocalCluster
    from lookalike.client import Client
    from router.server import create_router_server

    cluster = LocalCluster(data_dir, shards=shards)
    server, port, _ = create_router_server(cluster.router, "127.0.0.1:0", jobs=cluster.jobs if jobs else None)
    client = Client(f"127.0.0.1:{port}", timeout=timeout)
    try:
        yield cluster, client
    finally:
        client.close()
        server.stop(None)
        cluster.close()


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    # address="local": always a fresh private instance, even if a `ray start` cluster is (or was) on this machine
    ray.init(address="local", num_cpus=8, namespace="lookalike", include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


class RayTestCluster:
    """A lookalike cluster on the session's Ray: controller, shard actors, a router and its gRPC server."""

    def __init__(self, data_dir, shards: int, name: str | None = None, jobs: bool = False, per_process: int = 1):
        from lookalike.config import ClusterConfig
        from control.ray_cluster import start_cluster, start_jobs
        from lookalike.client import Client
        from router.core import Router
        from router.server import create_router_server

        self.cfg = ClusterConfig(data_dir=str(data_dir), shards=shards,
                                 cluster_name=name or f"t{uuid.uuid4().hex[:8]}", shard_num_cpus=0.5,
                                 shards_per_process=per_process)
        self.handle, self.control = start_cluster(self.cfg, segment_bytes=1 << 20)
        self.router = Router(self.control, refresh_interval=0.2)
        self.jobs = start_jobs(self.cfg) if jobs else None
        self.server, self.port, _ = create_router_server(self.router, "127.0.0.1:0", jobs=self.jobs)
        self.client = Client(f"127.0.0.1:{self.port}", timeout=60)

    def stop(self):
        from control.ray_cluster import stop_cluster, stop_jobs

        self.client.close()
        self.server.stop(None)
        self.router.close()
        if self.jobs is not None:
            stop_jobs(self.jobs)
        stop_cluster(self.handle)


@pytest.fixture
def ray_cluster_factory(ray_session, tmp_path):
    started = []

    def start(shards: int = 2, data_dir=None, name=None, jobs: bool = False, per_process: int = 1):
        c = RayTestCluster(data_dir or tmp_path / f"data{len(started)}", shards, name, jobs, per_process)
        started.append(c)
        return c

    yield start
    for c in started:
        try:
            c.stop()
        except Exception:
            pass


class MixedLoad:
    """Upserts of new items and searches in background threads (l2), each search checked against exact search
    over the writes acknowledged before it started: no id twice, none missing that ranks better than the last one
    returned (when the answer reports full coverage), and each returned id one that was written. Searchers take
    turns between the two drivers of the router's search: the first (and every second one) runs
    ``Router.search_async`` (what the router's gRPC server runs) on an event loop of its own, the others
    ``Router.search``."""

    def __init__(self, router, name: str, dim: int, seed: int = 0, batch: int = 40, searchers: int = 2,
                 min_coverage: float = 1.0):
        self.router, self.name, self.dim = router, name, dim
        self.min_coverage = min_coverage
        self.rng = np.random.default_rng(seed)
        self.acked: dict[str, np.ndarray] = {}
        self.sent: set[str] = set()
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.searches = self.writes = 0
        self.coverages: list[float] = []
        self.stop = threading.Event()
        self.batch = batch
        self.threads = [threading.Thread(target=self._writer, daemon=True)]
        self.threads += [threading.Thread(target=self._searcher, args=(i,), daemon=True) for i in range(searchers)]
        self.next_id = 0

    def preload(self, n: int) -> None:
        for _ in range(0, n, 500):
            self._write(500)

    def _write(self, n: int) -> None:
        with self.lock:
            ids = [f"i{self.next_id + j}" for j in range(n)]
            self.next_id += n
            self.sent.update(ids)
        x = self.rng.normal(size=(n, self.dim)).astype(np.float32)
        self.router.upsert(self.name, ids, x, timeout=30)
        with self.lock:
            self.acked.update(zip(ids, x))
            self.writes += 1

    def _writer(self) -> None:
        while not self.stop.is_set():
            try:
                self._write(self.batch)
            except Exception as err:  # every failure is a test failure
                self.errors.append(f"upsert: {err!r}")
            time.sleep(0.005)

    def _searcher(self, seed: int) -> None:
        if seed % 2 == 1 or not hasattr(self.router, "search_async"):
            return self._search_loop(seed, self.router.search)
        loop = asyncio.new_event_loop()
        try:
            self._search_loop(seed, lambda *a, **kw: loop.run_until_complete(self.router.search_async(*a, **kw)))
        finally:
            loop.close()

    def _search_loop(self, seed: int, search) -> None:
        rng = np.random.default_rng(100 + seed)
        k = 10
        while not self.stop.is_set():
            with self.lock:
                before = dict(self.acked)
            q = rng.normal(size=(1, self.dim)).astype(np.float32)
            try:
                res = search(self.name, q, k, min_coverage=self.min_coverage, timeout=30)
            except Exception as err:
                self.errors.append(f"search: {err!r}")
                continue
            self.searches += 1
            self.coverages.append(res.coverage)
            ids = res.ids[0]
            if len(set(ids)) != len(ids):
                self.errors.append(f"an id twice: {ids}")
            with self.lock:
                unknown = [u for u in ids if u not in self.sent]
            if unknown:
                self.errors.append(f"ids never written: {unknown}")
            if res.coverage < 1.0:
                continue  # some buckets did not answer (and the answer says so): nothing more to check
            keys = list(before)
            xb = np.stack([before[u] for u in keys])
            d = ((xb - q) ** 2).sum(axis=1)
            worst = float(res.D[0, len(ids) - 1]) if len(ids) == k else np.inf
            must = {keys[i] for i in np.flatnonzero(d < worst - 1e-3)}
            missing = must - set(ids)
            if missing:
                self.errors.append(f"missing {sorted(missing)[:5]} (coverage {res.coverage})")

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def assert_holds_exactly(router, name, acked, dim, seed=5):
    """Every acknowledged item is there, and search equals one exact index over them."""
    assert router.count(name) == len(acked)
    got_ids, _, _ = router.get(name, list(acked))
    assert set(got_ids) == set(acked)
    keys = list(acked)
    xb = np.stack([acked[u] for u in keys])
    xq = np.random.default_rng(seed).normal(size=(10, dim)).astype(np.float32)
    res = router.search(name, xq, 10)
    for q in range(len(xq)):
        d = ((xb - xq[q]) ** 2).sum(axis=1)
        ref = [keys[i] for i in np.argsort(d, kind="stable")[:10]]
        assert res.ids[q] == ref
    assert res.coverage == 1.0


def trained_config(root, cfg, xb):
    """``cfg`` with a trained version made from ``xb`` under storage ``root`` first, as the controller does for a
    cluster (shard.trained); ``cfg`` as it is for a spec that needs no training. For tests of a Shard without a
    controller."""
    import dataclasses

    # here, as in served_local_cluster: FAISS and the shard code load only for the tests that use them
    from lookalike.indexspec import training_points
    from shard.cpu_index import VectorIndex
    from shard.trained import write_template

    if not training_points(cfg.index)[0]:
        return cfg
    write_template(root, cfg, 1, VectorIndex(cfg).train_template(xb), len(xb), 0.0)
    return dataclasses.replace(cfg, trained_version=1)


def cli_shim(bin_dir: pathlib.Path) -> None:
    """A `lookalike` on PATH (put ``bin_dir`` first) that runs this checkout's CLI, not whatever an earlier pip
    install put there."""
    bin_dir.mkdir()
    exe = bin_dir / "lookalike"
    repo = pathlib.Path(__file__).resolve().parent.parent
    exe.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(repo)!r})\n"
                   "from tools.cli import main\nif __name__ == '__main__':\n    sys.exit(main())\n")
    exe.chmod(0o755)
