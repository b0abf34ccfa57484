"""`lookalike size`: the per-vector estimate against real shards, the plan's arithmetic, the kustomize overlay."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from shard.osutil import SHARD_PROCESS_ENV
from tools import sizing

_MEASURE = """
import json, sys
from tools.sizing import measure_shard
print(json.dumps(measure_shard(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])))
"""


def _measure(n: int, dim: int, index: str) -> dict:
    """A real shard in a fresh process, with the allocator settings shard actors run with (control/ray_placer.py)."""
    env = dict(os.environ, **SHARD_PROCESS_ENV, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(n), str(dim), index], env=env, capture_output=True,
                         text=True, timeout=240, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("index,n", [("Flat", 200_000), ("IVF256,PQ16", 300_000)])
def test_estimate_is_within_15_percent_of_a_real_shard(index, n):
    m = _measure(n, 64, index)
    assert m["trained"]
    # what the items add: the collection's fixed part and buffers (COLLECTION_OVERHEAD) came with its opening,
    # before the shard's memory was first read
    est = n * sizing.per_vector(64, index, id_bytes=len(str(n // 2))).resident
    assert abs(est - m["grew"]) / m["grew"] < 0.15, (index, m, est)
    assert m["opened"] <= sizing.COLLECTION_OVERHEAD + sizing.fixed_bytes(64, index) * 1.1 + 256 * 1024, m


def test_per_vector_parts():
    flat = sizing.per_vector(128, "Flat", id_bytes=10)
    assert (flat.code, flat.index, flat.ids, flat.payload) == (512, 8, 22, 0)
    pq = sizing.per_vector(128, "IVF1024,PQ16", id_bytes=10, payload_bytes=100)
    assert pq.code == 18 and pq.index > 8 and pq.payload == 141  # PQ16 + the 2-byte list number FAISS counts
    assert sizing.per_vector(256, "Flat", metric="hamming").code == 32
    hnsw = sizing.per_vector(64, "HNSW32")
    assert hnsw.code == 256 and hnsw.index >= 2 * 32 * 4


def test_plan_arithmetic():
    p = sizing.plan(10_000_000, 128, "Flat", replicas=2, node_memory=16 * sizing.GiB, shards_per_node=2,
                    headroom=0.25, reserve=2 * sizing.GiB, allocatable=17 * sizing.GiB)
    assert p.node_memory_request == 16 * sizing.GiB  # allocatable less 1Gi of DaemonSets
    assert p.shard_memory == 7 * sizing.GiB
    fill = 7 * sizing.GiB * 0.8 * 0.75 - sizing.SHARD_OVERHEAD - sizing.COLLECTION_OVERHEAD
    assert p.shards == -(-int(10_000_000 * 2 * p.per_vector.resident) // int(fill))
    assert p.nodes == -(-p.shards // 2)
    assert p.data_bytes / p.shards <= fill  # every shard below the growth threshold with the headroom left
    small = sizing.plan(1000, 16, "Flat", replicas=3)
    assert small.shards == 3  # at least one shard per copy
    g = sizing.plan(100_000_000, 128, "Flat", gpu_memory=24 * sizing.GiB, gpu_float16=True)
    assert g.gpu["bytes_per_vector"] == 256 + 8 and g.shards >= g.gpu["shards_for_gpu_memory"] > 1
    with pytest.raises(ValueError, match="no room"):
        sizing.plan(10, 16, "Flat", node_memory=1 * sizing.GiB, reserve=1 * sizing.GiB - 1)


def test_size_command_and_overlay(tmp_path, capsys):
    from tools import cli

    out = tmp_path / "sized"
    assert cli.main(["size", "--vectors", "40000000", "--dim", "128", "--index", "Flat", "--replicas", "2",
                     "--node-memory", "64Gi", "--kustomize", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bytes per vector: 512 code" in text and "lookalike serve --shards" in text
    assert cli.main(["size", "--vectors", "10", "--dim", "0"]) == 2
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the overlay is not rendered")
    import yaml

    rendered = subprocess.run(["kubectl", "kustomize", str(out)], capture_output=True, text=True, check=True).stdout
    all_docs = [d for d in yaml.safe_load_all(rendered) if d]
    docs = {d["kind"]: d for d in all_docs}
    p = sizing.plan(40_000_000, 128, "Flat", replicas=2)
    group = docs["RayCluster"]["spec"]["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == p.nodes and group["maxReplicas"] >= p.nodes
    res = group["template"]["spec"]["containers"][0]["resources"]
    # a 64 GiB node: 58.4 GiB allocatable, less 1 GiB of DaemonSets, rounded down
    assert res["requests"]["memory"] == res["limits"]["memory"] == "57Gi"
    cfg = next(d for d in all_docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "lookalike-config")["data"]
    assert cfg["LOOKALIKE_SHARDS"] == str(p.shards) and cfg["LOOKALIKE_SHARD_MEMORY"] == "55Gi"
