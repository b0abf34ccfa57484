"""A whole Ray node is lost: its shards come back on another node and serve all their data.

Run by tests/test_failover.py in its own process (it needs its own multi-node Ray cluster, built with
``ray.cluster_utils.Cluster``: a head without CPUs and two worker nodes). Prints PASS on success.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main(data_dir: str) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from lookalike.config import ClusterConfig, CollectionConfig
    from control.ray_cluster import start_cluster, stop_cluster
    from router.core import Router

    # Quick failure detection: a node is declared dead after about 1.5 s without heartbeats.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.10",
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                           "health_check_initial_delay_ms": 0}})
    workers = [cluster.add_node(num_cpus=2, node_ip_address=f"127.0.0.{11 + i}") for i in range(2)]
    ray.init(address=cluster.address, namespace="lookalike", log_to_driver=False)
    cfg = ClusterConfig(data_dir=data_dir, shards=2, cluster_name="nodeloss", shard_num_cpus=1)
    handle, control = start_cluster(cfg, segment_bytes=1 << 20, ready_timeout=120)
    router = Router(control, refresh_interval=0.2)
    try:
        nodes = {s.shard_id: s.node for s in control.shards()}
        assert len(set(nodes.values())) == 2, f"shards not spread over the two workers: {nodes}"
        router.create_collection(CollectionConfig("n", dim=8, buckets=16))
        rng = np.random.default_rng(0)
        xb = rng.normal(size=(3000, 8)).astype(np.float32)
        ids = [f"v{i}" for i in range(len(xb))]
        for s in range(0, len(xb), 500):
            router.upsert("n", ids[s:s + 500], xb[s:s + 500])
        victim = next((w for w in workers if w.node_id == nodes["shard-0"]), None)
        assert victim is not None, (nodes, [w.node_id for w in workers])
        print(f"removing node {victim.node_id[:8]} (shard-0)", flush=True)
        cluster.remove_node(victim, allow_graceful=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            info = {s.shard_id: s for s in control.shards()}
            if info["shard-0"].serving and info["shard-0"].node != nodes["shard-0"]:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"shard-0 did not come back on another node: {control.shards()}")
        print(f"shard-0 serves again on node {info['shard-0'].node[:8]}", flush=True)
        assert router.count("n") == len(xb)
        xq = rng.normal(size=(10, 8)).astype(np.float32)
        res = router.search("n", xq, 10, timeout=30)
        assert res.coverage == 1.0
        for q in range(len(xq)):
            ref = np.argsort(((xb - xq[q]) ** 2).sum(axis=1), kind="stable")[:10]
            assert res.ids[q] == [ids[i] for i in ref], q
        print("PASS", flush=True)
        return 0
    finally:
        router.close()
        try:
            stop_cluster(handle)
        finally:
            ray.shutdown()
            cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()))
