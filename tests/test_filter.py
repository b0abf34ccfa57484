"""Filtered search: typed payloads, filters on search and scans, payload indexes, and the exact top k under a
filter for every index type (shard.filtered), against a brute force over the matching items."""

import datetime as dt

import grpc
import numpy as np
import pytest

from conftest import exact_knn, make_data, served_local_cluster
from control.local import LocalCluster
from lookalike.config import CollectionConfig
from lookalike.errors import InvalidArgument
from lookalike.filters import parse_filter, to_filter
from lookalike.payloads import payload_to_proto, to_micros
from shard import filtered

FIELDS = ("category:string,price:float,seller:string,rank:int,created:timestamp,on_sale:bool,tags:string_list,"
          "codes:int_list")
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _payload(i: int) -> dict:
    d = {"category": f"c{i % 10}", "price": float(i % 100) + 0.5, "rank": i % 7, "created": T0 + dt.timedelta(hours=i),
         "on_sale": i % 3 == 0, "tags": [f"t{i % 4}", f"t{i % 5}"], "codes": [i % 11], "uri": f"s3://{i}"}
    if i % 7:
        d["seller"] = f"s{i % 5}"
    return d


# (text form, the same condition in Python over an item's payload dict)
CASES = [
    ("category=c3", lambda p: p["category"] == "c3"),
    ("category in (c1, 'c2')", lambda p: p["category"] in ("c1", "c2")),
    ("seller not in (s1, s2)", lambda p: p.get("seller") not in ("s1", "s2")),
    ("seller!=s1", lambda p: p.get("seller") != "s1"),
    ("price>=20 and price<30.5", lambda p: 20 <= p["price"] < 30.5),
    ("price>98", lambda p: p["price"] > 98),
    ("rank<=2", lambda p: p["rank"] <= 2),
    ("rank=4", lambda p: p["rank"] == 4),
    ("created>2026-01-20T00:00:00Z", lambda p: p["created"] > dt.datetime(2026, 1, 20, tzinfo=dt.timezone.utc)),
    ("exists(seller)", lambda p: "seller" in p),
    ("not exists(seller)", lambda p: "seller" not in p),
    ("on_sale=true", lambda p: p["on_sale"]),
    ("tags=t3", lambda p: "t3" in p["tags"]),
    ("codes in (2, 5)", lambda p: bool({2, 5} & set(p["codes"]))),
    ("(category=c1 or price<5) and not on_sale=true", lambda p: (p["category"] == "c1" or p["price"] < 5)
     and not p["on_sale"]),
    ("category=c1 and rank=1 and price<3", lambda p: p["category"] == "c1" and p["rank"] == 1 and p["price"] < 3),
    ("category=nothing", lambda p: False),
]


def _load(router, name, xb, payload=_payload, batch=1000):
    ids = [str(i) for i in range(len(xb))]
    for s in range(0, len(xb), batch):
        router.upsert(name, ids[s:s + batch], xb[s:s + batch],
                      [payload_to_proto(payload(i)) for i in range(s, min(s + batch, len(xb)))])
    return ids


def _brute(metric, xb, xq, k, mask):
    """Ids (as strings) and distances of the exact top k among the items of ``mask``."""
    rows = np.flatnonzero(mask)
    if not len(rows):
        return [[] for _ in xq], None
    D, I = exact_knn(metric, xb[rows], xq, min(k, len(rows)))
    return [[str(rows[i]) for i in row if i >= 0] for row in I], D


def _hamming(xb, q, ids):
    return np.unpackbits(np.bitwise_xor(xb[[int(i) for i in ids]], q), axis=1).sum(axis=1)


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine", "hamming"])
@pytest.mark.parametrize("shards", [1, 2, 4])
def test_a_flat_collection_filtered_by_each_operator_answers_as_a_brute_force(tmp_path, shards, metric):
    n, dim, k = 1500, 64 if metric == "hamming" else 16, 10
    xb, xq = make_data(metric, n, dim, seed=shards, nq=4)
    cl = LocalCluster(tmp_path, shards=shards, transport="inprocess")
    try:
        cl.router.create_collection(CollectionConfig("f", dim, metric, buckets=16, filterable=FIELDS).validated())
        _load(cl.router, "f", xb)
        payloads = [_payload(i) for i in range(n)]
        schema = cl.router.shard_map("f").collection.schema
        for text, pred in CASES:
            mask = np.array([pred(p) for p in payloads])
            res = cl.router.search("f", xq, k, filt=parse_filter(text, schema), include_payloads=True)
            want, D = _brute(metric, xb, xq, k, mask)
            assert res.plans, text
            for q in range(len(xq)):
                got = res.ids[q]
                assert len(got) == len(want[q]), (text, q)
                assert all(mask[int(i)] for i in got), text
                if not got:
                    continue
                np.testing.assert_allclose(res.D[q, :len(got)], D[q, :len(got)], rtol=1e-4, atol=1e-4)
                if metric == "hamming":  # equal distances may hold other ids; each has its reported distance
                    np.testing.assert_array_equal(_hamming(xb, xq[q], got), D[q, :len(got)])
                else:
                    assert got == want[q], (text, q)
        nothing = cl.router.search("f", xq, k, filt=parse_filter("category=nothing"))
        assert nothing.ids == [[]] * len(xq) and all("empty" in p for p in nothing.plans)
    finally:
        cl.close()


def _recall(got, want):
    hits = sum(len(set(g) & set(w)) for g, w in zip(got, want))
    return hits / max(1, sum(len(w) for w in want))


@pytest.mark.parametrize("spec", ["IVF64,Flat", "HNSW32"])
@pytest.mark.parametrize("exact_max", [2048, 0])
def test_ivf_and_hnsw_reach_recall_under_selective_filters(tmp_path, monkeypatch, spec, exact_max):
    monkeypatch.setattr(filtered, "EXACT_MAX_MATCHES", exact_max)  # 0: the planner goes by selectivity only
    n, dim, k = 20000, 16, 10
    xb, xq = make_data("l2", n, dim, seed=3, nq=20)
    cl = LocalCluster(tmp_path, shards=2, transport="inprocess")
    try:
        cl.router.create_collection(CollectionConfig("r", dim, "l2", spec, buckets=16, nprobe=4, ef_search=32,
                                                     filterable="sel:int").validated())
        _load(cl.router, "r", xb, payload=lambda i: {"sel": (i * 7919) % 1000}, batch=5000)
        if spec.startswith("IVF"):
            assert cl.controller._wait_trained("r", 60), cl.router.training_status("r")
        sel = (np.arange(n) * 7919) % 1000
        plans = []
        for below in (500, 100, 10, 1):  # 50%, 10%, 1%, 0.1% of the items
            res = cl.router.search("r", xq, k, filt=parse_filter(f"sel<{below}"))
            want, _ = _brute("l2", xb, xq, k, sel < below)
            assert all(sel[int(i)] < below for row in res.ids for i in row)
            assert _recall(res.ids, want) >= 0.95, (spec, below, res.plans)
            plans.append(res.plans[0])
        assert any("selector" in p for p in plans) and any("exact" in p or "all lists" in p for p in plans), plans
    finally:
        cl.close()


def test_typed_payloads_round_trip_and_wrong_types_are_refused(tmp_path):
    with served_local_cluster(tmp_path, shards=2) as (_cl, client):
        client.create_collection("t", dim=4, filterable="price:float,created:timestamp,tags:string_list")
        info = client.describe_collection("t")
        assert [(f.name, f.type) for f in info.spec.filterable] == [("price", 3), ("created", 5), ("tags", 6)]
        x = np.eye(4, dtype=np.float32)
        p0 = {"price": 9.5, "created": T0, "tags": ["a", "b"], "n": 3, "ok": True, "codes": [1, 2], "s": "x"}
        p1 = {"price": 3, "created": "2026-02-01T00:00:00Z", "tags": [], "n": 4}  # int for float, ISO timestamp
        assert client.upsert("t", ["a", "b"], x[:2], [p0, p1]) == 2
        ids, _, payloads = client.get("t", ["a", "b"], include_vectors=False)
        assert payloads[0] == p0
        assert payloads[1] == {"price": 3.0, "created": dt.datetime(2026, 2, 1, tzinfo=dt.timezone.utc),
                               "tags": [], "n": 4}
        assert type(payloads[0]["n"]) is int and type(payloads[1]["price"]) is float
        hits = client.search("t", x[:1], k=2, include_payloads=True, filter={"price": {"gt": 5}})
        assert hits.ids == [["a"]] and hits.payloads[0][0]["created"] == T0
        # Wrong types: declared ones, and an undeclared field whose type its first value fixed (on the same shard)
        for bad, words in [({"price": "cheap"}, "'price'"), ({"created": "yesterday"}, "'created'"),
                           ({"tags": [1, 2]}, "'tags'"), ({"n": "four"}, "'n'")]:
            with pytest.raises(grpc.RpcError) as err:
                client.upsert("t", ["a"], x[:1], [bad])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
            assert "'a'" in err.value.details() and words in err.value.details(), err.value.details()
        # old-style string payloads still work
        assert client.upsert("t", ["c"], x[2:3], [{"uri": "s3://c"}]) == 1
        assert client.get("t", ["c"], include_vectors=False)[2] == [{"uri": "s3://c"}]


def test_bad_filters_get_invalid_argument_with_a_sentence(tmp_path):
    with served_local_cluster(tmp_path, shards=1) as (_cl, client):
        client.create_collection("b", dim=4, filterable="category:string,price:float")
        client.upsert("b", ["a"], np.ones((1, 4), np.float32), [{"category": "x", "price": 1.0}])
        deep = {"category": "x"}
        for _ in range(9):
            deep = {"$not": deep}
        cases = [({"color": "red"}, "not a filterable field"), ({"price": "cheap"}, "compares field 'price'"),
                 ({"category": {"gt": 3}}, "ranges apply to numbers"), (deep, "nested more than 8"),
                 ({"category": [f"v{i}" for i in range(1025)]}, "more than 1024 values")]
        for spec, words in cases:
            with pytest.raises(grpc.RpcError) as err:
                client.search("b", np.ones((1, 4), np.float32), k=1, filter=spec)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details(), \
                err.value.details()
    with pytest.raises(InvalidArgument, match="ends where a value belongs"):
        parse_filter("category = ")
    with pytest.raises(InvalidArgument, match="left over"):
        parse_filter("a=1 b=2")


def test_payload_indexes_survive_a_crash_and_a_restart(tmp_path):
    from shard.shard import Shard

    cfg = CollectionConfig("c", 8, "l2", buckets=8, filterable="category:string,price:float").validated()
    xb, xq = make_data("l2", 600, 8, nq=3)
    ids = [str(i) for i in range(600)]

    def payload(i, j=0):
        return payload_to_proto({"category": f"c{(i + j) % 5}", "price": float(i % 50)}).SerializeToString()

    def answers(sc):
        D, L, got, _, _ = sc.reads.search_filtered(xq, 10, parse_filter("category=c1 and price<20"))
        return got

    shard = Shard("s", tmp_path)
    shard.open_collection(cfg, range(8))
    sc = shard.collection("c")
    sc.upsert(ids[:300], xb[:300], [payload(i) for i in range(300)])
    shard.close()  # a checkpoint
    shard = Shard("s", tmp_path)
    shard.open_collection(cfg, range(8))
    sc = shard.collection("c")
    assert sc.loaded_from_checkpoint
    sc.upsert(ids[300:], xb[300:], [payload(i) for i in range(300, 600)])
    sc.upsert(ids[:100], xb[:100], [payload(i, 1) for i in range(100)])  # changes their category
    sc.delete(ids[100:150])
    want = answers(sc)
    assert all(w for w in want)
    sc.store.close()  # killed: no checkpoint of the writes above; the restart replays them on top of the first one
    again = Shard("s", tmp_path)
    again.open_collection(cfg, range(8))
    sc2 = again.collection("c")
    assert sc2.loaded_from_checkpoint and sc2.replayed_records == 3
    assert answers(sc2) == want
    cat = {i: (i + (1 if i < 100 else 0)) % 5 for i in range(600)}
    live = [i for i in range(600) if not 100 <= i < 150]
    assert all(cat[int(u)] == 1 and int(u) % 50 < 20 and int(u) in live for u in want)
    again.close()


def test_the_client_builds_filters_from_dicts_and_text():
    f = to_filter({"category": "shoes", "price": {"lt": 100}, "seller": {"ne": "s1"}})
    g = parse_filter("category=shoes and price<100 and seller!=s1")
    assert f == g
    ts = parse_filter("created>=2026-01-01")
    assert ts.condition.range.gte.timestamp_micros == to_micros(T0)
    assert parse_filter("sku=123", {"sku": "string"}).condition.eq.string_value == "123"
