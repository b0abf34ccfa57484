"""Failures on a real Ray cluster: SIGKILL of a shard process under mixed load, with and without replicas, and a
rebalance onto new shard actors while serving."""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import MixedLoad, assert_holds_exactly, wait_for


def _wait(pred, timeout=90.0):
    return wait_for(pred, timeout)


def _all_serving(cluster) -> bool:
    return all(s.serving for s in cluster.client.status().shards)


@pytest.mark.parametrize("replication", [2, 1])
def test_sigkill_of_a_shard_under_mixed_load(ray_cluster_factory, replication):
    import ray

    cluster = ray_cluster_factory(3)
    router = cluster.router
    cluster.client.create_collection("k", dim=8, metric="l2", buckets=24, replication=replication)
    load = MixedLoad(router, "k", 8, searchers=2, min_coverage=0.01)
    load.preload(1500)
    pids = ray.get(cluster.handle.shard_pids.remote())
    with load:
        time.sleep(0.5)
        os.kill(pids["shard-0"], signal.SIGKILL)
        killed_at = len(load.coverages)
        assert _wait(lambda: ray.get(cluster.handle.shard_pids.remote())["shard-0"] != pids["shard-0"])
        assert _wait(lambda: _all_serving(cluster))
        time.sleep(1.0)
        after = len(load.coverages)
        time.sleep(1.0)
    assert not load.errors, load.errors[:5]
    assert load.writes > 5 and len(load.coverages) > after
    if replication == 2:
        assert min(load.coverages) == 1.0  # every search answered in full, from the other replica
    else:
        # answers said what was missing while the shard was down, and are complete again once it is back
        assert min(load.coverages[killed_at:after]) < 1.0
        assert min(load.coverages[after:]) == 1.0
    assert_holds_exactly(router, "k", load.acked, 8)


def test_rebalance_onto_new_shard_actors(ray_cluster_factory):
    cluster = ray_cluster_factory(1)
    client, router = cluster.client, cluster.router
    client.create_collection("r", dim=8, metric="l2", buckets=16)
    load = MixedLoad(router, "r", 8, searchers=1)
    load.preload(2000)
    with load:
        resp = client.rebalance("r", add_shards=1)
        assert resp.moves > 0 and resp.shards == 2
        assert _wait(lambda: not client.status().moves, timeout=120)
    assert not load.errors, load.errors[:5]
    st = client.status()
    assert st.moves_done == resp.moves and st.moves_failed == 0
    assert all(s.buckets > 0 and s.serving for s in st.shards)
    assert min(load.coverages) == 1.0
    assert_holds_exactly(router, "r", load.acked, 8)


def test_lost_node_shards_come_back_elsewhere(tmp_path):
    """Runs tests/node_loss.py in its own process: it needs a multi-node Ray cluster of its own."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(root / "tests" / "node_loss.py"), str(tmp_path / "data")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if not ln.lstrip().startswith("[")]
    assert proc.returncode == 0 and "PASS" in lines, "\n".join(lines[-20:] + proc.stderr.splitlines()[-30:])
