"""Issue 16 point 7: the statuses a real cluster gave wrongly. Out-of-range search parameters are INVALID_ARGUMENT
(not UNAVAILABLE from an OverflowError on every shard); a search whose answer could pass the message limit is
refused before any work with a sentence (not RESOURCE_EXHAUSTED after it); a full disk is RESOURCE_EXHAUSTED
naming the path (not INTERNAL); the router's per-search failure warning does not flood the log."""

import errno
import logging
import os
import time

import grpc
import numpy as np
import pytest

from conftest import served_local_cluster
from lookalike.config import LIMITS, CollectionConfig, max_search_rows
from lookalike.errors import InvalidArgument, LookalikeError, ResourceExhausted
from control.local import LocalCluster
from protos import common_pb2, lookalike_pb2, shard_pb2
from shard import wal as shard_storage
from shard.server import ShardServicer


class _Aborted(Exception):
    def __init__(self, code, details):
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


class _Context:
    """What a servicer method needs of a grpc context: abort raises, as grpc's does."""

    def abort(self, code, details):
        raise _Aborted(code, details)

    def is_active(self):
        return True

    def time_remaining(self):
        return None


def _code(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with served_local_cluster(tmp_path_factory.mktemp("statuses"), shards=1, timeout=60) as served:
        yield served


# --- search parameters -------------------------------------------------------------------------------------------
def test_out_of_range_search_parameters_are_invalid_argument(served):
    cluster, client = served
    client.create_collection("params", dim=8, index="HNSW16", buckets=4)
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    client.upsert("params", [str(i) for i in range(50)], x)
    for kw, name in [({"ef_search": 2 ** 31}, "ef_search"), ({"ef_search": LIMITS.max_ef_search + 1}, "ef_search"),
                     ({"nprobe": 2 ** 31}, "nprobe"), ({"nprobe": LIMITS.max_nprobe + 1}, "nprobe"),
                     ({"nprobe": 2 ** 32 - 1, "ef_search": 5}, "nprobe")]:
        code, details = _code(lambda: client.search("params", x[:2], k=3, **kw))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (kw, code, details)
        assert name in details and "between" in details, details
    # the bounds themselves are fine
    res = client.search("params", x[:2], k=3, ef_search=LIMITS.max_ef_search, nprobe=LIMITS.max_nprobe)
    assert res.ids[0][0] == "0"
    # a collection's defaults are bounded the same way (1 and up: 0 means "the default" in a request)
    for kw in ({"ef_search": 2 ** 31}, {"nprobe": 2 ** 31}, {"ef_search": LIMITS.max_ef_search + 1}):
        code, details = _code(lambda: client.create_collection("params2", dim=8, buckets=4, **kw))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "between 1 and" in details, (kw, details)
    with pytest.raises(InvalidArgument, match="ef_search must be between 1 and"):
        CollectionConfig("p", 8, ef_search=2 ** 31).validated()
    # and again at the shard's own servicer
    servicer = ShardServicer(cluster.placer._shard("shard-0"))
    req = shard_pb2.ShardSearchRequest(collection="params", k=3, queries=common_pb2.Vectors(
        data=x[:1].tobytes(), rows=1, dim=8))
    req.params.ef_search = 2 ** 31
    with pytest.raises(_Aborted) as err:
        servicer.Search(req, _Context())
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "ef_search" in err.value.details


# --- the size of a search's answer -------------------------------------------------------------------------------
def _shard_answer(nq, k, payloads):
    pl = common_pb2.Payload(fields={"f": "v" * (LIMITS.max_payload_bytes - 9)})
    assert pl.ByteSize() == LIMITS.max_payload_bytes  # the largest payload a write takes
    return shard_pb2.ShardSearchResponse(
        distances=b"\xff" * (4 * nq * k), labels=b"\xff" * (8 * nq * k), ids=["i" * LIMITS.max_id_bytes] * (nq * k),
        payloads=[pl] * (nq * k) if payloads else [], nq=2 ** 32 - 1, k=2 ** 32 - 1)


def _router_answer(nq, k, payloads):
    pl = common_pb2.Payload(fields={"f": "v" * (LIMITS.max_payload_bytes - 9)})
    return lookalike_pb2.SearchResponse(results=[lookalike_pb2.Neighbors(
        ids=["i" * LIMITS.max_id_bytes] * k, distances=[1.5] * k, payloads=[pl] * k if payloads else [])
        for _ in range(nq)], coverage=0.5, epoch=2 ** 64 - 1)


@pytest.mark.parametrize("k,payloads", [(1, False), (10, False), (1024, False), (1, True), (10, True)])
def test_the_answer_size_bound_holds_for_the_longest_ids_and_payloads(k, payloads):
    rows = max_search_rows(k, payloads)
    # 64 MiB of 256-byte ids is about 250,000 slots (the old bound, 14 bytes a slot, allowed 4.8 million)
    assert 1 <= rows and rows * k <= 250_000, rows
    for build in (_shard_answer, _router_answer):  # built for real, every slot as long as it can be
        size = build(rows, k, payloads).ByteSize()
        assert size <= LIMITS.max_message_bytes, (build.__name__, rows, size)


def test_a_search_too_large_for_a_message_is_refused_before_any_work(served):
    """4,000 queries at k=1024 passed the old size check (14 bytes a slot) and failed 28 s later, when the shard
    sent an 81 MiB answer. With 256-byte ids: refused at once, saying how many queries fit; that many work."""
    cluster, client = served
    client.create_collection("longids", dim=8, buckets=4)
    n = LIMITS.max_k + 76
    x = np.random.default_rng(1).normal(size=(n, 8)).astype(np.float32)
    ids = [f"{i:06d}".ljust(LIMITS.max_id_bytes, "x") for i in range(n)]
    client.upsert("longids", ids, x)
    rows = max_search_rows(LIMITS.max_k)
    xq = np.random.default_rng(2).normal(size=(rows + 50, 8)).astype(np.float32)
    req = lookalike_pb2.SearchRequest(collection="longids", k=LIMITS.max_k,
                                      queries=common_pb2.Vectors(data=xq.tobytes(), rows=len(xq), dim=8))
    t0 = time.monotonic()
    code, details = _code(lambda: client.stub.Search(req, timeout=60))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert f"send at most {rows} queries" in details, details
    assert time.monotonic() - t0 < 3.0, "refused before the shards searched"
    # the shard's servicer refuses it the same way, before searching
    servicer = ShardServicer(cluster.placer._shard("shard-0"))
    req = shard_pb2.ShardSearchRequest(collection="longids", k=LIMITS.max_k, queries=common_pb2.Vectors(
        data=xq.tobytes(), rows=len(xq), dim=8))
    with pytest.raises(_Aborted) as err:
        servicer.Search(req, _Context())
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and f"at most {rows}" in err.value.details
    # as many as the sentence said: answered, every slot a 256-byte id (the worst case, and it fits)
    res = client.search("longids", xq[:rows], k=LIMITS.max_k)
    assert len(res.ids) == rows and all(len(r) == LIMITS.max_k for r in res.ids)
    assert len(res.ids[0][0]) == LIMITS.max_id_bytes
    # the Python client sends a larger batch as several requests, each within the bound: the same answers
    whole = client.search("longids", xq, k=LIMITS.max_k)
    assert len(whole.ids) == len(xq) and whole.ids[:rows] == res.ids and whole.D.shape == (len(xq), LIMITS.max_k)
    assert whole.ids[rows:] == client.search("longids", xq[rows:], k=LIMITS.max_k).ids and whole.coverage == 1.0


# --- a full disk -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("err_no", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_resource_exhausted_and_stores_nothing(served, monkeypatch, err_no):
    cluster, client = served
    name = f"full{err_no}"
    client.create_collection(name, dim=4, buckets=2)
    client.upsert(name, ["a"], np.ones((1, 4), dtype=np.float32))
    shard = cluster.placer._shard("shard-0")
    sc = shard.collection(name)
    fd = sc.store.wal.fd
    real_write = os.write

    def full(f, data):
        if f == fd:
            raise OSError(err_no, os.strerror(err_no))
        return real_write(f, data)

    monkeypatch.setattr(shard_storage.os, "write", full)
    # through the shard's servicer: RESOURCE_EXHAUSTED naming the storage path
    servicer = ShardServicer(shard)
    x = np.full((1, 4), 2.0, dtype=np.float32)
    req = shard_pb2.ShardUpsertRequest(collection=name, ids=["b"], vectors=common_pb2.Vectors(
        data=x.tobytes(), rows=1, dim=4))
    with pytest.raises(_Aborted) as err:
        servicer.Upsert(req, _Context())
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
    assert "is full" in err.value.details and str(sc.store.path) in err.value.details
    assert "not stored" in err.value.details
    # a delete too, as the typed error
    with pytest.raises(ResourceExhausted, match="storage at .* is full"):
        sc.delete(["a"], 0)
    # and through the router: the client sees RESOURCE_EXHAUSTED, not INTERNAL or UNAVAILABLE
    code, details = _code(lambda: client.upsert(name, ["c"], x))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "is full" in details, (code, details)
    monkeypatch.undo()
    # nothing of the refused writes was stored; the collection takes writes again
    assert client.get(name, ["a", "b", "c"])[0] == ["a"]
    client.upsert(name, ["d"], x)
    assert sorted(client.get(name, ["a", "b", "c", "d"])[0]) == ["a", "d"]


def test_other_os_errors_stay_what_they_were(served, monkeypatch):
    cluster, client = served
    client.create_collection("eio", dim=4, buckets=2)
    sc = cluster.placer._shard("shard-0").collection("eio")

    def broken(*a, **kw):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sc.store, "append", broken)
    with pytest.raises(OSError) as err:
        sc.upsert(["a"], np.ones((1, 4), dtype=np.float32), [None], 0)
    assert not isinstance(err.value, LookalikeError) and err.value.errno == errno.EIO


# --- the router's warnings ---------------------------------------------------------------------------------------
def test_repeated_search_failures_log_one_line_then_a_count(tmp_path, caplog):
    cluster = LocalCluster(tmp_path, shards=2)
    try:
        x = np.random.default_rng(3).normal(size=(200, 8)).astype(np.float32)
        cluster.router.create_collection(CollectionConfig("warned", 8, buckets=16))
        cluster.router.upsert("warned", [str(i) for i in range(200)], x)
        cluster.placer.stop_shard("shard-1")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="router.search"):
            for _ in range(30):
                assert cluster.router.search("warned", x[:2], 3, min_coverage=0.1).coverage < 1.0
        lines = [r for r in caplog.records if "search on warned" in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert "shard-1" in lines[0].getMessage()
    finally:
        cluster.close()

    # the helper: one line per key per interval; the next line says how many were left out
    from router.search import RateLimitedLog

    log = logging.getLogger("test_statuses.rate")
    limited = RateLimitedLog(log, interval_s=0.2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="test_statuses.rate"):
        assert limited.warning("a", "failed %s", 1)
        assert not any(limited.warning("a", "failed %s", 1) for _ in range(9))
        assert limited.warning("b", "other %s", 2)  # another key is not held back
        time.sleep(0.25)
        assert limited.warning("a", "failed %s", 1)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["failed 1", "other 2", "failed 1 (and 9 more like it since the last such line, not logged)"]


# --- vectors too long for finite distances -----------------------------------------------------------------------
def test_vectors_whose_distances_would_overflow_are_refused(served):
    """Finite components whose squares overflow float32 (3e38, 1e30) gave inf distances, and FAISS's k-means (IVF
    training, `lookalike cluster`) aborted the whole process on them: such rows are INVALID_ARGUMENT, on writes and
    searches; the longest allowed vectors still give finite distances."""
    from lookalike.wire import MAX_SQUARED_NORM

    _, client = served
    client.create_collection("long", dim=8, buckets=4)
    ok = np.random.default_rng(3).normal(size=(20, 8)).astype(np.float32)
    client.upsert("long", [f"o{i}" for i in range(20)], ok)
    for value in (3e38, -3e38, 1e30, 1e19):
        bad = ok[:3].copy()
        bad[1, 2] = value
        code, details = _code(lambda: client.upsert("long", ["b0", "b1", "b2"], bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "row 1 is too long" in details, (value, details)
        code, details = _code(lambda: client.search("long", bad, k=3))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "row 1 is too long" in details, (value, details)
    assert client.get("long", ["b0", "b1", "b2"])[0] == []  # nothing of a refused write was stored
    edge = np.zeros((2, 8), dtype=np.float32)
    edge[0, 0], edge[1, 0] = np.sqrt(MAX_SQUARED_NORM) * 0.999, -np.sqrt(MAX_SQUARED_NORM) * 0.999
    client.upsert("long", ["e0", "e1"], edge)
    hits = client.search("long", edge[:1], k=2)
    assert hits.ids[0][0] == "e0" and np.isfinite(hits.D[0]).all(), hits
