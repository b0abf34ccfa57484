"""Deterministic answers: ties are broken by label, so the same query on the same data returns the same ids in the
same order whichever shards or replicas answer, and however the vectors were inserted."""

import itertools

import faiss
import numpy as np
import pytest

import lookalike.nearest
from lookalike.config import CollectionConfig
from lookalike.ids import buckets_and_labels
from control.local import LocalCluster
from lookalike.nearest import ivf_lists, max_norm, nearest, pair_distances, product_candidates
from lookalike.topk import merge_topk
from router.coarse import CoarseQuantizers, _Quantizer
from shard.cpu_index import VectorIndex
from shard.filtered import Matches, plan_and_search
from shard.index_lifecycle import train_template


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


# --- distances that do not depend on the batch (lookalike.nearest) ---------------------------------------------

def _far_from_origin(rng, n, d=128):
    """Vectors like image embeddings of one kind: far from the origin, close to each other (FAISS's kernels round
    their distances differently the most there)."""
    return rng.standard_normal((n, d), dtype=np.float32) * 10 + 50


@pytest.mark.parametrize("spec,metric", [("Flat", "l2"), ("Flat", "cosine"), ("Flat", "ip"), ("IVF64,PQ16", "l2")])
def test_a_query_gets_the_same_answer_alone_in_a_batch_and_on_fewer_threads(spec, metric):
    # FAISS picks its kernel by the batch: BLAS from about 1,000 queries at d=128, a database-parallel one for
    # fewer queries than threads. Each rounds otherwise: on the old code every one of these differed somewhere.
    rng = np.random.default_rng(3)
    coll = CollectionConfig(name="c", dim=128, metric=metric, index=spec, nprobe=4).validated()
    index = VectorIndex(coll)
    xb = _far_from_origin(rng, 30_000)
    if metric == "ip":
        xb[::7] *= 3  # norms of several sizes
    index.add(np.arange(30_000, dtype=np.int64), xb)
    index.train_if_ready()
    xq = _far_from_origin(rng, 1200)
    threads = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        D0, L0 = index.search(xq[:1], 10)
        for n_threads in (1, 2):
            faiss.omp_set_num_threads(n_threads)
            for nq in (1, 2, 100, 1200):
                D, L = index.search(xq[:nq], 10)
                assert L[0].tolist() == L0[0].tolist(), (n_threads, nq)
                assert D[0].tobytes() == D0[0].tobytes(), (n_threads, nq)
    finally:
        faiss.omp_set_num_threads(threads)


def test_a_vector_goes_to_the_same_ivf_list_whatever_the_batch_it_is_added_in():
    # On the old code 6 of 256 lists differed between one add of 20,000 and adds of 500 (BLAS for the large one).
    rng = np.random.default_rng(1)
    coll = CollectionConfig(name="c", dim=128, metric="l2", index="IVF256,Flat", trained_version=1).validated()
    x = _far_from_origin(rng, 20_000)
    template = train_template(coll, x[:10_000])

    def lists_of(index):
        ivf = faiss.extract_index_ivf(index._main)
        return [sorted(faiss.rev_swig_ptr(ivf.invlists.get_ids(no), ivf.invlists.list_size(no)).tolist())
                if ivf.invlists.list_size(no) else [] for no in range(ivf.nlist)]

    whole = VectorIndex(coll, template=faiss.clone_index(template))
    whole.add(np.arange(20_000, dtype=np.int64), x)
    parts = VectorIndex(coll, template=faiss.clone_index(template))
    for s in range(0, 20_000, 500):
        parts.add(np.arange(s, s + 500, dtype=np.int64), x[s:s + 500])
    assert lists_of(whole) == lists_of(parts)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_the_router_chooses_a_querys_lists_alone_as_in_a_batch_and_as_its_shards_do(metric):
    rng = np.random.default_rng(2)
    coll = CollectionConfig(name="c", dim=128, metric=metric, index="IVF1024,Flat", nprobe=12,
                            trained_version=1).validated()
    template = train_template(coll, _far_from_origin(rng, 40_000))
    shard_index = VectorIndex(coll, template=template)
    version, centroids = 1, faiss.downcast_index(shard_index._main.quantizer).reconstruct_n(0, 1024)
    flat = (faiss.IndexFlatIP if coll.larger_is_better else faiss.IndexFlatL2)(128)
    flat.add(centroids)
    q = _Quantizer(version, flat)
    xq = _far_from_origin(rng, 1200)  # 1200 x 128: FAISS's BLAS path on the old code
    alone = CoarseQuantizers.assign(q, coll, xq[:1], 12)
    batch = CoarseQuantizers.assign(q, coll, xq, 12)
    assert batch.lists[:len(alone.lists)] == alone.lists
    assert batch.distances[:len(alone.distances)] == alone.distances
    own = ivf_lists(shard_index._main, shard_index._prepare(xq), 12)  # a shard choosing its lists itself
    assert own[0].astype("<i8").tobytes() == batch.lists and own[1].astype("<f4").tobytes() == batch.distances


def test_nearest_answers_as_every_pair_compared_alone_with_ties_in_position_order(monkeypatch):
    monkeypatch.setattr(lookalike.nearest, "_PRODUCT_ROWS", 700)  # the products' candidates merged over blocks
    rng = np.random.default_rng(4)
    xb = _far_from_origin(rng, 3000, 16)
    xb[1000:1100] = xb[5]  # 101 copies: a tie group far larger than the candidates FAISS is asked for
    for ip in (False, True):
        index = (faiss.IndexFlatIP if ip else faiss.IndexFlatL2)(16)
        index.add(xb)
        xq = np.concatenate([xb[5:6] + 0.01, _far_from_origin(rng, 20, 16)])
        ref = np.stack([pair_distances(index, xq[i:i + 1], np.arange(3000)[None])[0] for i in range(len(xq))])
        by_product = lambda q, kk: product_candidates(xb, q, kk, ip)  # noqa: E731
        for k, search in itertools.product((1, 10, 3000, 3005), (None, by_product)):
            D, I = nearest(index, xq, k, max_norm(index) if ip else None, search)
            for i in range(len(xq)):
                order = np.lexsort((np.arange(3000), -ref[i] if ip else ref[i]))[:k]
                assert I[i, :len(order)].tolist() == order.tolist()
                assert D[i, :len(order)].tobytes() == ref[i][order].tobytes()
                assert (I[i, len(order):] == -1).all()
        if not ip:  # the query's nearest are the copies, smallest positions first (a scan of every pair)
            assert nearest(index, xq[:1], 10)[1][0].tolist() == [5] + list(range(1000, 1009))
            assert nearest(index, xq[:1], 10, None, by_product)[1][0].tolist() == [5] + list(range(1000, 1009))


@pytest.mark.parametrize("spec,every,plan", [("Flat", 3, "selector"), ("Flat", 300, "exact"),
                                             ("IVF64,Flat", 3, "selector-ivf")])
def test_a_filtered_query_gets_the_same_answer_alone_and_in_a_batch(spec, every, plan):
    rng = np.random.default_rng(5)
    coll = CollectionConfig(name="c", dim=128, metric="l2", index=spec, nprobe=4).validated()
    index = VectorIndex(coll)
    index.add(np.arange(30_000, dtype=np.int64), _far_from_origin(rng, 30_000))
    index.train_if_ready()
    matches = Matches(np.arange(0, 30_000, every, dtype=np.int64))
    xq = _far_from_origin(rng, 1200)
    D0, L0, used = plan_and_search(index, xq[:1], 10, matches)
    assert used.startswith(plan)
    assert set(L0[0].tolist()) <= set(matches.labels.tolist())
    for nq in (2, 100, 1200):
        D, L, _ = plan_and_search(index, xq[:nq], 10, matches)
        assert L[0].tolist() == L0[0].tolist() and D[0].tobytes() == D0[0].tobytes(), nq


def test_a_cosine_collection_leaves_the_callers_vectors_as_they_were():
    # The old code normalized them in place: a caller searching the same array twice searched other queries.
    rng = np.random.default_rng(6)
    index = VectorIndex(CollectionConfig(name="c", dim=16, metric="cosine", index="Flat").validated())
    xb, xq = _far_from_origin(rng, 100, 16), _far_from_origin(rng, 3, 16)
    before_b, before_q = xb.copy(), xq.copy()
    index.add(np.arange(100, dtype=np.int64), xb)
    first = index.search(xq, 5)
    assert xb.tobytes() == before_b.tobytes() and xq.tobytes() == before_q.tobytes()
    again = index.search(xq, 5)
    assert first[0].tobytes() == again[0].tobytes() and first[1].tolist() == again[1].tolist()


@pytest.mark.parametrize("ip", [False, True])
def test_the_routers_matrix_product_finds_the_lists_a_faiss_search_finds(ip):
    # Batches of 8 queries and more take their candidate lists from one BLAS product (router.coarse); with copies
    # of a centroid around the queries (ties past the candidates: scanned pair by pair) and without.
    rng = np.random.default_rng(7)
    centroids = _far_from_origin(rng, 2048, 32)
    centroids[100:160] = centroids[3]
    flat = (faiss.IndexFlatIP if ip else faiss.IndexFlatL2)(32)
    flat.add(centroids)
    q = _Quantizer(1, flat)
    xq = np.concatenate([centroids[3:4] + 0.01, _far_from_origin(rng, 40, 32)])
    for nprobe in (1, 12, 2048):
        by_blas = nearest(flat, xq, nprobe, q.norm_bound, q.candidates)
        by_faiss = nearest(flat, xq, nprobe, q.norm_bound)
        assert by_blas[1].tolist() == by_faiss[1].tolist() and by_blas[0].tobytes() == by_faiss[0].tobytes()
    if not ip:
        assert nearest(flat, xq[:1], 12, None, q.candidates)[1][0].tolist() == [3] + list(range(100, 111))


@pytest.mark.parametrize("spec", ["Flat", "IVF32,Flat"])
def test_a_query_through_the_cluster_gets_the_same_answer_alone_and_in_a_batch(tmp_path, spec):
    # End to end: the router's lists (or the shards' own, before its quantizer arrives), each shard's search and
    # the merge. On the old code the Flat batch of 1,200 came back with other distances.
    cl = LocalCluster(tmp_path / "data", shards=3, transport="inprocess")
    try:
        cl.router.create_collection(CollectionConfig(name="c", dim=128, index=spec, buckets=16, nprobe=4))
        rng = np.random.default_rng(8)
        xb = _far_from_origin(rng, 6000)
        cl.router.upsert("c", [f"v{i}" for i in range(6000)], xb)
        if spec != "Flat":
            assert cl.controller._wait_trained("c", 60)
        xq = _far_from_origin(rng, 1200)
        alone = cl.router.search("c", xq[:1], k=10)
        for nq in (2, 100, 1200):
            res = cl.router.search("c", xq[:nq], k=10)
            assert res.ids[0] == alone.ids[0] and res.D[0].tobytes() == alone.D[0].tobytes(), nq
    finally:
        cl.close()
