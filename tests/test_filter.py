"""Filtered search: typed payloads, filters on search and scans, payload indexes, and the exact top k under a
filter for every index type (shard.filtered), against a brute force over the matching items."""

import datetime as dt
import json

import grpc
import numpy as np
import pytest

from conftest import exact_knn, make_data, run_cli, served_local_cluster
from control.local import LocalCluster
from lookalike.config import CollectionConfig
from lookalike.errors import InvalidArgument
from lookalike.filters import parse_filter, to_filter
from lookalike.gpu import EmulatedGpuBackend
from lookalike.payloads import payload_to_dict, payload_to_proto, to_micros
from protos.common_pb2 import Payload
from shard import filtered
from shard.shard import Shard
from test_encoder import picture, to_bytes
from tools import cli

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


def test_a_graph_compares_the_matches_when_its_search_would_visit_more(tmp_path, monkeypatch):
    """HNSW under a selective filter: efSearch raised by 1/selectivity would visit more vectors than match (1M x 128
    on 4 shards, 1%: 32 QPS as selector-hnsw ef=4096, against 183 QPS comparing the 0.1%'s matches)."""
    n, dim = 20000, 16
    xb, xq = make_data("l2", n, dim, seed=5, nq=5)
    cl = LocalCluster(tmp_path, shards=1, transport="inprocess")
    try:
        cl.router.create_collection(CollectionConfig("g", dim, "l2", "HNSW32", buckets=4, ef_search=32,
                                                     filterable="sel:int").validated())
        _load(cl.router, "g", xb, payload=lambda i: {"sel": (i * 7919) % 1000}, batch=5000)
        sel = (np.arange(n) * 7919) % 1000
        # 2.5% (500 items): over EXACT_MAX_FRACTION; with EXACT_MAX_MATCHES off only the cost decides: efSearch
        # 32 / 0.025 = 1280 would visit about 1280 x 64 vectors, comparing the matches costs about 500 x 8
        monkeypatch.setattr(filtered, "EXACT_MAX_MATCHES", 0)
        res = cl.router.search("g", xq, 10, filt=parse_filter("sel<25"))
        assert res.plans[0].startswith("shard-0: exact"), res.plans
        want, _ = _brute("l2", xb, xq, 10, sel < 25)
        assert res.ids == want
        broad = cl.router.search("g", xq, 10, filt=parse_filter("sel<500"))
        assert "selector-hnsw" in broad.plans[0], broad.plans
    finally:
        cl.close()


def _recall(got, want):
    hits = sum(len(set(g) & set(w)) for g, w in zip(got, want))
    return hits / max(1, sum(len(w) for w in want))


@pytest.mark.parametrize("spec", ["IVF64,Flat", "HNSW32"])
@pytest.mark.parametrize("exact_max", [2048, 0])
def test_ivf_and_hnsw_reach_recall_under_selective_filters(tmp_path, monkeypatch, spec, exact_max):
    monkeypatch.setattr(filtered, "EXACT_MAX_MATCHES", exact_max)  # 0: the planner goes by selectivity only
    monkeypatch.setattr(filtered, "EXACT_BY_COST", exact_max > 0, raising=False)
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
    stored = [payload_to_dict(Payload.FromString(b)) for b in sc2.get(["5", "400"], False)[2]]
    assert stored == [{"category": "c1", "price": 5.0}, {"category": "c0", "price": 0.0}]  # types kept
    assert type(stored[0]["price"]) is float
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


def test_the_cli_creates_filterable_collections_and_searches_with_a_filter(tmp_path):
    xb, xq = make_data("l2", 300, 8, nq=2)
    np.save(tmp_path / "xb.npy", xb)
    np.save(tmp_path / "xq.npy", xq)
    rows = [{"category": ["shoes", "hats", "bags"][i % 3], "price": i % 150, "seller": f"s{i % 4}",
             "added": f"2026-01-{1 + i % 28:02d}", "sku": str(1000 + i)} for i in range(300)]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with served_local_cluster(tmp_path / "data", shards=2) as (_cl, client):
        target = client.target
        create = run_cli("collection", "create", "cat", "--dim", "8", "--filterable",
                         "category:string,price:float,seller:string,added:timestamp,sku:string", target=target)
        assert create.returncode == 0, create.stderr
        desc = json.loads(run_cli("collection", "describe", "cat", target=target).stdout)
        assert {"name": "price", "type": "TYPE_FLOAT"} in desc["filterable"]
        up = run_cli("upsert", "cat", str(tmp_path / "xb.npy"), "--payload", str(tmp_path / "p.jsonl"), target=target)
        assert up.returncode == 0, up.stderr
        res = run_cli("search", "cat", str(tmp_path / "xq.npy"), "-k", "5", "--json", "--payloads", "--filter",
                      "category=shoes and price<100 and seller!=s1 and added>=2026-01-10", target=target)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        mask = np.array([r["category"] == "shoes" and r["price"] < 100 and r["seller"] != "s1"
                         and r["added"] >= "2026-01-10" for r in rows])
        want, _ = _brute("l2", xb, xq, 5, mask)
        assert [r["ids"] for r in out["results"]] == want and out["plans"]
        assert out["results"][0]["payloads"][0]["category"] == "shoes"
        one = run_cli("search", "cat", str(tmp_path / "xq.npy"), "-k", "3", "--json", "--filter", "sku=1003",
                      target=target)
        assert json.loads(one.stdout)["results"][0]["ids"] == ["3"], one.stdout + one.stderr
        for flags, words in [(["--filter", "colour=red"], "not a filterable field"),
                             (["--filter", "price <"], "--filter: the filter ends")]:
            bad = run_cli("search", "cat", str(tmp_path / "xq.npy"), *flags, target=target)
            assert bad.returncode != 0 and words in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        bad = run_cli("collection", "create", "x", "--dim", "4", "--filterable", "price:money", target=target)
        assert bad.returncode != 0 and "unknown type 'money'" in bad.stderr, bad.stderr


def test_dedup_within_a_category_and_a_filtered_sample(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    ids = [f"i{i}" for i in range(400)]
    cats = ["shoes" if i % 2 else "hats" for i in range(400)]
    # planted near-copies: i0 ~ i1 cross categories (hats, shoes); i3 ~ i5 both shoes
    x[1] = x[0] + 0.001
    x[5] = x[3] + 0.001
    with served_local_cluster(tmp_path, shards=2, jobs=True) as (_cl, client):
        client.create_collection("d", dim=16, buckets=16, filterable="category:string")
        client.upsert("d", ids, x, [{"category": c} for c in cats])
        every = client.wait_job(client.start_dedup("d", 0.01, k=4).id, poll_s=0.05, timeout=120)
        assert sorted(sorted(g.ids) for g in client.dedup_groups(every.id)) == [["i0", "i1"], ["i3", "i5"]]
        job = client.start_dedup("d", 0.01, k=4, filter="category=shoes")
        assert job.id != every.id
        job = client.wait_job(job.id, poll_s=0.05, timeout=120)
        assert job.state == job.SUCCEEDED and job.total == 200, job.message
        assert [sorted(g.ids) for g in client.dedup_groups(job.id)] == [["i3", "i5"]]
        got, vecs, payloads = client.sample("d", 50, seed=3, filter={"category": "hats"})
        assert len(got) == 50 and all(p["category"] == "hats" for p in payloads) and vecs.shape == (50, 16)
        with pytest.raises(grpc.RpcError) as err:
            client.start_dedup("d", 0.01, filter="colour=red")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_loadtest_sends_filtered_searches(tmp_path):
    xb, _ = make_data("l2", 500, 8, seed=4)
    np.save(tmp_path / "xb.npy", xb)
    with served_local_cluster(tmp_path / "data", shards=2) as (cl, client):
        client.create_collection("c", dim=8, buckets=16, filterable="category:string")
        client.upsert("c", [str(i) for i in range(500)], xb, [{"category": f"c{i % 4}"} for i in range(500)])
        out = tmp_path / "lt.json"
        rc = cli.main(["loadtest", "c", "--target", client.target, "--rate", "40", "--processes", "1", "--duration",
                       "1", "--data", str(tmp_path / "xb.npy"), "--filter", "category=c1", "--out", str(out),
                       "--plot", "", "--quiet"])
        report = json.loads(out.read_text())
        assert rc == 0 and report["ok"] == report["requests"] == 40 and report["errors"] == {}
        assert report["recall"]["recall_at_k"] is None and "--filter" in report["recall"]["why"]
        assert cli.main(["loadtest", "c", "--target", client.target, "--filter", "colour=red", "--duration",
                         "1", "--out", str(out), "--plot", ""]) == 2


def test_a_write_changes_what_a_repeated_filter_matches(tmp_path):
    cfg = CollectionConfig("c", 4, "l2", buckets=4, filterable="category:string").validated()
    shard = Shard("s", tmp_path)
    shard.open_collection(cfg, range(4))
    sc = shard.collection("c")
    x = np.eye(4, dtype=np.float32)
    sc.upsert(["a", "b"], x[:2], [payload_to_proto({"category": c}).SerializeToString() for c in ("x", "y")])
    f = parse_filter("category=x")
    assert sc.reads.search_filtered(x[:1], 2, f)[2] == ["a", ""]
    sc.upsert(["b"], x[1:2], [payload_to_proto({"category": "x"}).SerializeToString()])
    assert sc.reads.search_filtered(x[:1], 2, f)[2] == ["a", "b"]
    sc.delete(["a"])
    assert sc.reads.search_filtered(x[:1], 2, f)[2] == ["b", ""]
    shard.close()


def test_search_by_image_takes_a_filter(tmp_path):
    images = [to_bytes(picture(i), "PNG") for i in range(8)]
    with served_local_cluster(tmp_path, shards=2) as (_cl, client):
        client.create_collection("p", encoder="phash", buckets=8, filterable="shop:string")
        count, failed = client.upsert_images("p", [(f"img{i}", b, {"shop": f"s{i % 2}"})
                                                   for i, b in enumerate(images)])
        assert count == 8 and not failed
        hits = client.search_by_image("p", [images[2]], k=8, include_payloads=True, filter="shop=s1")
        assert len(hits.ids[0]) == 4 and all(p["shop"] == "s1" for p in hits.payloads[0]) and hits.plans
        assert "img2" not in hits.ids[0]
        assert client.search_by_image("p", [images[2]], k=1, filter="shop=s0").ids == [["img2"]]


def test_filtered_searches_on_a_gpu_shard_run_on_its_cpu_index(tmp_path):
    xb, xq = make_data("l2", 3000, 16, seed=5, nq=4)
    cl = LocalCluster(tmp_path, shards=2, transport="inprocess", gpu=EmulatedGpuBackend())
    try:
        cl.router.create_collection(CollectionConfig("g", 16, "l2", buckets=8, filterable=FIELDS).validated())
        _load(cl.router, "g", xb)
        payloads = [_payload(i) for i in range(len(xb))]
        for text, pred in CASES[:6]:
            mask = np.array([pred(p) for p in payloads])
            res = cl.router.search("g", xq, 10, filt=parse_filter(text))
            assert res.ids == _brute("l2", xb, xq, 10, mask)[0], text
    finally:
        cl.close()


def test_the_filter_benchmark_counts_what_post_filtering_misses():
    from bench.filter_bench import FILTERS, payloads_of, post_filter, report  # here: it imports Ray

    cat, price = payloads_of(20000, 0)
    shares = [pred(cat, price).mean() for _, _, pred in FILTERS]
    assert np.allclose(shares, [0.5, 0.1, 0.01, 0.001], rtol=0.25)  # the four selectivities
    mask = np.array([True, False, True, False, True, True])
    got, short = post_filter(np.array([[0, 1, 2, 3], [1, 3, 5, -1]]), mask, 2)
    assert got.tolist() == [[0, 2], [5, -1]] and short == 1
    out = {"config": {"k": 10, "n": 100, "dim": 8, "shards": 2, "batch": 1, "command": "x"},
           "results": [{"index": "Flat", "selectivity": "none", "qps": 10.0, "p50_ms": 1.0, "p99_ms": 2.0,
                        "recall": 1.0},
                       {"index": "Flat", "selectivity": "1%", "filter": "category=c0", "qps": 5.0, "p50_ms": 1.0,
                        "p99_ms": 2.0, "recall": 1.0, "qps_vs_unfiltered": 0.5, "post_filter_recall": 0.1,
                        "post_filter_short": 1.0, "post_filter_10x_recall": 0.2, "post_filter_10x_short": 0.9,
                        "plans": ["shard-0: exact (1/50 match)"]}]}
    assert "| Flat | 1% | `category=c0` | 5 | 0.50 |" in report(out)
