"""Search batching (router/batcher.py): concurrent single-query searches go out as batches and each caller gets
exactly what the same search alone returns."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import make_data
from lookalike.config import CollectionConfig
from lookalike.errors import Unavailable
from lookalike.local import LocalCluster
from protos import common_pb2
from router.batcher import SearchBatcher
from router.core import SearchResult


@pytest.mark.parametrize("metric,index", [("l2", "Flat"), ("cosine", "IVF16,Flat"), ("hamming", "BFlat")])
def test_batched_equals_unbatched(tmp_path, metric, index):
    dim = 64 if metric == "hamming" else 16
    xb, xq = make_data(metric, 4000, dim, seed=3, nq=200)
    cluster = LocalCluster(tmp_path, shards=3, transport="inprocess")
    try:
        router = cluster.router
        router.create_collection(CollectionConfig("c", dim, metric, index=index if metric != "hamming" else "BFlat",
                                                  buckets=32, nprobe=4))
        router.upsert("c", [str(i) for i in range(len(xb))], xb,
                      [common_pb2.Payload(fields={"row": str(i)}) for i in range(len(xb))])
        alone = [router.search_now("c", xq[q:q + 1], 10, include_payloads=True) for q in range(len(xq))]
        start = router.batcher.batches
        with ThreadPoolExecutor(64) as pool:
            batched = list(pool.map(lambda q: router.search("c", xq[q:q + 1], 10, include_payloads=True),
                                    range(len(xq))))
        sent = router.batcher.batches - start
        assert sent < len(xq), "64 concurrent callers should have shared batches"
        for q, (a, b) in enumerate(zip(alone, batched)):
            np.testing.assert_allclose(b.D, a.D, rtol=1e-5, atol=1e-5)
            if metric == "hamming":  # integer distances tie: equal ids up to order within a distance
                last = a.D[0, -1]
                assert ({i for i, d in zip(b.ids[0], b.D[0]) if d < last}
                        == {i for i, d in zip(a.ids[0], a.D[0]) if d < last}), f"query {q}"
            else:
                assert b.ids == a.ids, f"query {q}"
            assert [[p.fields["row"] for p in row] for row in b.payloads] == b.ids
            assert b.coverage == 1.0
    finally:
        cluster.close()


def _fake_search(calls, delay=0.02, fail_when=None):
    def search(name, xq, k, nprobe, ef_search, min_coverage, include_payloads, timeout):
        calls.append(len(xq))
        time.sleep(delay)
        if fail_when is not None and fail_when(xq):
            raise Unavailable("shards down")
        # each row's "result" is its own query value, so a caller can check it got its own rows
        return SearchResult(D=xq[:, :1].astype(np.float32).repeat(k, 1), ids=[[str(int(v))] for v in xq[:, 0]],
                            payloads=None, coverage=1.0, epoch=7)
    return search


def test_lone_search_goes_at_once_and_busy_ones_gather():
    calls = []
    batcher = SearchBatcher(_fake_search(calls), max_wait_s=0.05, max_batch=1000, max_inflight=1)
    t = time.monotonic()
    res = batcher.search("c", np.array([[5.0]], np.float32), 3)
    assert time.monotonic() - t < 0.045  # no 50 ms gathering when nothing else runs
    assert res.ids == [["5"]] and calls == [1]
    calls.clear()
    with ThreadPoolExecutor(40) as pool:
        out = list(pool.map(lambda v: batcher.search("c", np.array([[float(v)]], np.float32), 3), range(40)))
    assert [r.ids for r in out] == [[[str(v)]] for v in range(40)]
    assert [r.D[0, 0] for r in out] == list(range(40))
    assert sum(calls) == 40 and len(calls) < 10, calls


def test_groups_do_not_mix_and_max_batch_is_kept():
    calls = []
    batcher = SearchBatcher(_fake_search(calls), max_wait_s=0.01, max_batch=8, max_inflight=1)
    with ThreadPoolExecutor(32) as pool:
        out = list(pool.map(lambda v: batcher.search("c", np.array([[float(v)]], np.float32), 2 + v % 2),
                            range(64)))
    for v, r in enumerate(out):
        assert r.ids == [[str(v)]] and r.D.shape == (1, 2 + v % 2)
    # a batch may pass max_batch by the queries that arrived while its leader waited for a free slot, never by
    # more than one gathering round
    assert sum(calls) == 64 and len(calls) < 64


def test_a_failed_batch_fails_each_caller_and_the_next_batch_works():
    calls = []
    batcher = SearchBatcher(_fake_search(calls, fail_when=lambda xq: (xq < 0).any()), max_wait_s=0.02,
                            max_inflight=1)
    blocker = threading.Thread(target=batcher.search, args=("c", np.array([[1.0]], np.float32), 1))
    blocker.start()
    time.sleep(0.005)
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(batcher.search, "c", np.array([[v]], np.float32), 1) for v in (-1.0, 2.0)]
        errors = [f.exception() for f in futs]
    blocker.join()
    assert all(isinstance(e, Unavailable) for e in errors), errors  # the two shared one batch, which failed
    assert batcher.search("c", np.array([[3.0]], np.float32), 1).ids == [["3"]]
