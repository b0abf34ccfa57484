"""A write that one replica refuses because its write gate is full (shard/admission.py) while another replica stored
it: the router sends it again to the busy one within the write's deadline, so the replicas never answer differently
because of it; when the shard stays busy past the deadline, the caller gets RESOURCE_EXHAUSTED with a retry hint and
a sentence saying how many holders have it."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from control.local import LocalCluster
from lookalike.config import CollectionConfig
from lookalike.errors import Busy, ResourceExhausted
from lookalike.wire import vectors_to_proto
from protos import shard_pb2
from shard.admission import WriteGate

DIM = 8


@pytest.fixture
def replicated(tmp_path):
    cluster = LocalCluster(tmp_path, shards=2)
    cluster.router.create_collection(CollectionConfig("c", DIM, "l2", buckets=4, replication=2))
    try:
        yield cluster
    finally:
        cluster.close()


def _hold_gate(cluster, shard_id):
    """Gives ``shard_id`` a write gate of one slot and no queue, and holds its slot: its next write is refused as
    busy. Returns the event that frees the slot."""
    servicer = cluster.placer.servers[shard_id][2]
    servicer.writes = WriteGate(1, 0, f"shard {shard_id}")
    held, release = threading.Event(), threading.Event()

    def hold():
        with servicer.writes.admit():
            held.set()
            release.wait(30)

    threading.Thread(target=hold, daemon=True).start()
    assert held.wait(10)
    return release


def _holdings(cluster, ids):
    """For each shard: the ids of ``ids`` its collection holds."""
    out = {}
    for sid, (_server, _port, servicer, _health) in cluster.placer.servers.items():
        found, _x, _p = servicer.shard.collection("c").get(ids, include_vectors=False)
        out[sid] = sorted(found)
    return out


def test_a_busy_replica_is_sent_the_write_again_until_it_stores_it(replicated):
    cluster = replicated
    busy = sorted(cluster.placer.servers)[1]
    release = _hold_gate(cluster, busy)
    ids = [f"i{i}" for i in range(20)]
    x = np.random.default_rng(0).standard_normal((len(ids), DIM)).astype(np.float32)
    threading.Timer(0.5, release.set).start()   # the shard's storage catches up while the router retries
    assert cluster.router.upsert("c", ids, x, timeout=30) == len(ids)
    held = _holdings(cluster, ids)
    assert all(got == sorted(ids) for got in held.values()), held


def test_a_replica_busy_past_the_deadline_gives_a_retry_hint_and_a_sentence(replicated):
    cluster = replicated
    busy = sorted(cluster.placer.servers)[1]
    release = _hold_gate(cluster, busy)
    try:
        x = np.ones((3, DIM), np.float32)
        with pytest.raises(Busy) as err:
            cluster.router.upsert("c", ["a", "b", "c"], x, timeout=1.0)
        assert isinstance(err.value, ResourceExhausted) and err.value.retry_after_s > 0
        assert "stored by 1 of the 2 shards" in str(err.value) and "Send it again" in str(err.value)
    finally:
        release.set()
    # Sent again once the shard is free: both replicas hold the items.
    assert cluster.router.upsert("c", ["a", "b", "c"], np.ones((3, DIM), np.float32), timeout=30) == 3
    assert all(got == ["a", "b", "c"] for got in _holdings(cluster, ["a", "b", "c"]).values())


def test_the_shard_marks_a_full_gate_with_a_retry_hint_over_grpc(replicated):
    cluster = replicated
    busy = sorted(cluster.placer.servers)[0]
    release = _hold_gate(cluster, busy)
    port = cluster.placer.servers[busy][1]
    req = shard_pb2.ShardUpsertRequest(collection="c", ids=["z"])
    req.vectors.CopyFrom(vectors_to_proto(np.ones((1, DIM), np.float32)))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/lookalike.v1.Shard/Upsert", request_serializer=lambda m: m.SerializeToString(),
                                  response_deserializer=shard_pb2.ShardWriteResponse.FromString)
            with pytest.raises(grpc.RpcError) as err:
                call(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry with backoff" in err.value.details()
        assert int(dict(err.value.trailing_metadata())["retry-after-ms"]) > 0
    finally:
        release.set()
