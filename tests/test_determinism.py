"""Deterministic answers: ties are broken by label, so the same query on the same data returns the same ids in the
same order whichever shards or replicas answer, and however the vectors were inserted."""

import numpy as np

from lookalike.config import CollectionConfig
from lookalike.ids import buckets_and_labels
from control.local import LocalCluster
from lookalike.topk import merge_topk
from shard.cpu_index import VectorIndex


def test_merge_breaks_ties_by_label_whatever_the_shard_order():
    # Three shards, every distance equal: the answer is the k smallest labels, in label order, in any shard order.
    D = np.zeros((3, 1, 4), dtype=np.float32)
    L = np.array([[[50, 7, 90, 3]], [[11, 2, 70, 40]], [[8, 60, 1, 30]]], dtype=np.int64)
    answers = set()
    for perm in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        Dm, Im = merge_topk(D[perm], L[perm], larger_is_better=False)
        answers.add(tuple(L[perm].ravel()[Im[0]].tolist()))
    assert answers == {(1, 2, 3, 7)}


def test_merge_keeps_a_label_once_at_its_best_place():
    D = np.array([[[1.0, 2.0]], [[0.5, 2.0]]], dtype=np.float32)
    L = np.array([[[5, 9]], [[9, 4]]], dtype=np.int64)
    Dm, Im = merge_topk(D, L, larger_is_better=False)
    assert L.ravel()[Im[0]].tolist() == [9, 5]
    assert Dm[0].tolist() == [0.5, 1.0]


def _hamming_index(order):
    coll = CollectionConfig(name="h", dim=64, metric="hamming", index="BFlat").validated()
    index = VectorIndex(coll)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(200, 8), dtype=np.uint8)
    codes[:120] = codes[0]  # 120 exact duplicates: a tie group of 120 at distance 0 from codes[0]
    labels = np.arange(1000, 1200, dtype=np.int64)
    index.add(labels[order], codes[order])
    return index, codes


def test_a_shard_cuts_a_tie_group_at_its_smallest_labels_whatever_the_insertion_order():
    answers = set()
    for seed in range(4):
        order = np.random.default_rng(seed).permutation(200)
        index, codes = _hamming_index(order)
        D, L = index.search(codes[:1], 10)
        assert D[0].tolist() == [0.0] * 10
        answers.add(tuple(L[0].tolist()))
    assert answers == {tuple(range(1000, 1010))}


def test_the_same_query_through_replicas_gives_the_same_ids_every_time(tmp_path):
    cl = LocalCluster(tmp_path / "data", shards=3, transport="inprocess")
    try:
        cl.router.create_collection(CollectionConfig(name="p", dim=64, metric="hamming", index="BFlat",
                                                     buckets=16, replication=2))
        rng = np.random.default_rng(1)
        codes = rng.integers(0, 256, size=(300, 8), dtype=np.uint8)
        codes[:100] = codes[0]
        ids = [f"img-{i}" for i in range(300)]
        for s in range(0, 300, 50):  # in an order different from the labels'
            cl.router.upsert("p", ids[s:s + 50][::-1], codes[s:s + 50][::-1])
        seen = set()
        for _ in range(20):
            res = cl.router.search("p", codes[:1], k=10)
            seen.add(tuple(res.ids[0]))
        assert len(seen) == 1
        _, labels = buckets_and_labels(ids[:100], 16)
        smallest = sorted(zip(labels.tolist(), ids[:100]))[:10]
        assert list(seen.pop()) == [u for _, u in smallest]
    finally:
        cl.close()


def _shard_answer(D, L, ids, packed=True):
    from protos import shard_pb2

    nq, k = D.shape
    r = shard_pb2.ShardSearchResponse(distances=D.astype("<f4").tobytes(), labels=L.astype("<i8").tobytes(),
                                      nq=nq, k=k)
    if packed:
        raw = [u.encode("utf-8") for u in ids]
        r.id_bytes = b"".join(raw)
        r.id_lengths = np.array([len(b) for b in raw], dtype="<u2").tobytes()
    else:
        r.ids.extend(ids)
    return r


def test_the_router_decodes_the_ids_it_keeps_from_packed_shard_answers_and_reads_older_shards_too():
    """Shards answer with packed ids (ShardSearchResponse.id_bytes/id_lengths); the router keeps the merged top-k's
    ids, unicode and empty slots included, and still reads a shard that sends the repeated ``ids`` field."""
    import pytest

    from lookalike.errors import Unavailable
    from router.search import _merge_responses, answer_ids

    D0 = np.array([[0.1, 0.4, 9.0], [0.2, 0.0, 0.0]], dtype=np.float32)
    L0 = np.array([[5, 7, -1], [8, -1, -1]])
    D1 = np.array([[0.2, 0.3, 0.5], [0.1, 0.3, 0.0]], dtype=np.float32)
    L1 = np.array([[6, 9, 11], [12, 13, -1]])
    ids0 = ["a", "ü-ид", "", "画像", "", ""]
    ids1 = ["b", "c", "d", "e", "f", ""]
    want = [["a", "b", "c"], ["e", "画像", "f"]]
    for packed0, packed1 in ((True, True), (True, False), (False, True), (False, False)):
        rs = [_shard_answer(D0, L0, ids0, packed0), _shard_answer(D1, L1, ids1, packed1)]
        D, got, _ = _merge_responses(rs, 2, 3, False, False)
        assert got == want, (packed0, packed1)
        assert answer_ids(rs[0]) == ids0 and answer_ids(rs[1]) == ids1
    ascii_ids = ["a", "x", "", "q", "", ""]
    D, got, _ = _merge_responses([_shard_answer(D0, L0, ascii_ids), _shard_answer(D1, L1, ids1)], 2, 3, False, False)
    assert got == [["a", "b", "c"], ["e", "q", "f"]]

    bad = _shard_answer(D0, L0, ids0)
    bad.id_lengths = bad.id_lengths[:-2]  # one slot short
    with pytest.raises(Unavailable):
        _merge_responses([bad, _shard_answer(D1, L1, ids1)], 2, 3, False, False)
    bad = _shard_answer(D0, L0, ids0)
    bad.id_bytes = bad.id_bytes[:-1]  # lengths past the bytes
    with pytest.raises(Unavailable):
        _merge_responses([bad, _shard_answer(D1, L1, ids1)], 2, 3, False, False)
