"""Search batching (router/batcher.py): concurrent single-query searches go out as batches and each caller gets
exactly what the same search alone returns."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import make_data
from lookalike.config import CollectionConfig
from lookalike.errors import DeadlineExceeded, Unavailable
from control.local import LocalCluster
from protos import common_pb2
from router.batcher import SearchBatcher
from lookalike.client import Client
from router.search import SearchResult
from router.server import create_router_server


@pytest.mark.parametrize("metric,index", [("l2", "Flat"), ("cosine", "IVF16,Flat"), ("hamming", "BFlat")])
def test_batched_equals_unbatched(tmp_path, metric, index):
    dim = 64 if metric == "hamming" else 16
    xb, xq = make_data(metric, 4000, dim, seed=3, nq=200)
    cluster = LocalCluster(tmp_path, shards=3, transport="inprocess")
    server, port, _ = create_router_server(cluster.router, "127.0.0.1:0")
    try:
        router = cluster.router
        router.create_collection(CollectionConfig("c", dim, metric, index=index, buckets=32, nprobe=4))
        router.upsert("c", [str(i) for i in range(len(xb))], xb,
                      [common_pb2.Payload(fields={"row": str(i)}) for i in range(len(xb))])
        alone = [router.search("c", xq[q:q + 1], 10, include_payloads=True) for q in range(len(xq))]
        batcher = server.servicer.batcher
        start = batcher.batches
        with Client(f"127.0.0.1:{port}") as client, ThreadPoolExecutor(64) as pool:
            batched = list(pool.map(lambda q: client.search("c", xq[q:q + 1], 10, include_payloads=True),
                                    range(len(xq))))
        sent = batcher.batches - start
        assert sent < len(xq), "64 concurrent callers should have shared batches"
        for q, (a, b) in enumerate(zip(alone, batched)):
            np.testing.assert_allclose(b.D, a.D, rtol=1e-5, atol=1e-5)
            if metric == "hamming":  # integer distances tie: equal ids up to order within a distance
                last = a.D[0, -1]
                assert ({i for i, d in zip(b.ids[0], b.D[0]) if d < last}
                        == {i for i, d in zip(a.ids[0], a.D[0]) if d < last}), f"query {q}"
            else:
                assert b.ids == a.ids, f"query {q}"
            assert [p["row"] for p in b.payloads[0]] == b.ids[0]
            assert b.coverage == 1.0
    finally:
        server.stop(None).wait()
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


def _q(v: float) -> np.ndarray:
    return np.array([[v]], np.float32)


def _run(batcher_args, coros_of):
    """Runs coroutines made by ``coros_of(batcher)`` together on a fresh loop; returns their results/errors."""
    calls = []
    pool = ThreadPoolExecutor(4)

    async def main():
        batcher = SearchBatcher(_fake_search(calls, **batcher_args.pop("fake", {})), pool, **batcher_args)
        return await asyncio.gather(*coros_of(batcher), return_exceptions=True)

    try:
        return asyncio.run(main()), calls
    finally:
        pool.shutdown()


def test_lone_search_goes_at_once_and_busy_ones_gather():
    t = time.monotonic()
    (res,), calls = _run({"max_wait_s": 0.05}, lambda b: [b.search("c", _q(5), 3)])
    assert time.monotonic() - t < 0.045  # no 50 ms gathering when nothing else runs
    assert res.ids == [["5"]] and calls == [1]

    async def staggered(b, v):
        await asyncio.sleep(0.001 * v)
        return await b.search("c", _q(v), 3)

    out, calls = _run({"max_wait_s": 0.005, "max_inflight": 1}, lambda b: [staggered(b, v) for v in range(40)])
    assert [r.ids for r in out] == [[[str(v)]] for v in range(40)]
    assert [r.D[0, 0] for r in out] == list(range(40))
    # 40 arrivals over 40 ms, batches of 20 ms one at a time: the first goes alone, the rest gather
    assert sum(calls) == 40 and calls[0] == 1 and len(calls) <= 5, calls


def test_groups_do_not_mix_and_max_batch_sends_at_once():
    out, calls = _run({"max_wait_s": 10.0, "max_batch": 8, "max_inflight": 2},
                      lambda b: [b.search("c", _q(v), 2 + v % 2) for v in range(64)])
    for v, r in enumerate(out):
        assert r.ids == [[str(v)]] and r.D.shape == (1, 2 + v % 2)
    # with a 10 s wait only full batches (8) or a free slot (none running) send: nothing waits 10 s
    assert sum(calls) == 64 and max(calls) <= 32


def test_a_failed_batch_fails_each_caller_and_the_next_batch_works():
    async def scenario(b):
        first = asyncio.ensure_future(b.search("c", _q(1), 1))  # runs alone, 20 ms
        await asyncio.sleep(0.005)
        pair = [asyncio.ensure_future(b.search("c", _q(v), 1)) for v in (-1.0, 2.0)]  # gather into one batch
        await asyncio.gather(first, *pair, return_exceptions=True)
        after = await b.search("c", _q(3), 1)
        return [first.result(), *[p.exception() for p in pair], after]

    (result,), calls = _run({"max_wait_s": 0.05, "max_inflight": 1, "fake": {"fail_when": lambda xq: (xq < 0).any()}},
                            lambda b: [scenario(b)])
    first, e1, e2, after = result
    assert first.ids == [["1"]] and after.ids == [["3"]]
    assert isinstance(e1, Unavailable) and isinstance(e2, Unavailable)  # the two shared one batch, which failed
    assert calls == [1, 2, 1]


def test_a_caller_past_its_deadline_gives_up_and_the_batch_goes_on():
    async def scenario(b):
        slow = asyncio.ensure_future(b.search("c", _q(1), 1))  # runs alone, 100 ms
        await asyncio.sleep(0.005)
        late = asyncio.ensure_future(b.search("c", _q(2), 1, timeout=0.02))  # waits behind it, gives up
        other = asyncio.ensure_future(b.search("c", _q(3), 1))
        await asyncio.gather(slow, late, other, return_exceptions=True)
        return slow.result(), late.exception(), other.result()

    (result,), _ = _run({"max_wait_s": 0.001, "max_inflight": 1, "fake": {"delay": 0.1}}, lambda b: [scenario(b)])
    slow, late, other = result
    assert slow.ids == [["1"]] and other.ids == [["3"]]
    assert isinstance(late, DeadlineExceeded)
