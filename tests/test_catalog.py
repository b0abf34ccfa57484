"""Catalog jobs: near-duplicate groups, k-means labels in payloads, the map; through the gRPC API and the CLI."""

import csv
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from conftest import wait_for
from jobs import CANCELLED, SUCCEEDED, JobManager, cluster_space, set_payload_field
from jobs.base import plan_pages
from jobs.dedup import group_pairs
from lookalike.config import CollectionConfig
from control.local import LocalCluster
from protos import common_pb2


# --- pieces -----------------------------------------------------------------------------------------------------
def test_group_pairs_joins_chains_and_keeps_each_members_nearest_distance():
    groups = group_pairs(["a", "b", "d", "x"], ["b", "c", "e", "x2"], [0.1, 0.3, 0.2, 0.05], False)
    assert [g[0] for g in groups] == [["a", "b", "c"], ["d", "e"], ["x", "x2"]]
    assert [g[1] for g in groups] == [pytest.approx([0.1, 0.1, 0.3]), pytest.approx([0.2, 0.2]),
                                      pytest.approx([0.05, 0.05])]
    # similarities: a member's nearest is its largest
    assert group_pairs(["a", "b"], ["b", "c"], [0.9, 0.95], True)[0][1] == pytest.approx([0.9, 0.95, 0.95])
    assert group_pairs([], [], [], False) == []


def test_plan_pages_cover_every_bucket_once():
    counts = np.random.default_rng(0).integers(0, 50, 1024)
    pages = plan_pages(counts, 500)
    assert sorted(b for p in pages for b in p) == list(range(1024))
    assert all(counts[p].sum() <= 500 or len(p) == 1 for p in pages)


def test_payload_field_and_cluster_space():
    p = common_pb2.Payload(fields={"uri": "/a.jpg"}).SerializeToString()
    got = common_pb2.Payload.FromString(set_payload_field(p, "cluster", "3"))
    assert dict(got.fields) == {"uri": "/a.jpg", "cluster": "3"}
    assert dict(common_pb2.Payload.FromString(set_payload_field(None, "c", "1")).fields) == {"c": "1"}
    codes = np.array([[0b10000001, 0xFF]], dtype=np.uint8)
    assert cluster_space(codes, "hamming").tolist() == [[1, 0, 0, 0, 0, 0, 0, 1] + [1] * 8]
    x = cluster_space(np.array([[3.0, 4.0]]), "cosine")
    assert np.allclose(x, [[0.6, 0.8]])


# --- data with planted duplicate groups ---------------------------------------------------------------------------
def planted(metric: str, n: int = 2500, dim: int = 32, groups: int = 40, seed: int = 0):
    """(ids, vectors, planted groups as sorted id lists): random items plus groups of 2-5 near-copies."""
    rng = np.random.default_rng(seed)
    if metric == "hamming":
        x = rng.integers(0, 256, (n, dim // 8), dtype=np.uint8)
    else:
        x = rng.standard_normal((n, dim)).astype(np.float32)
    ids = [f"item-{i}" for i in range(n)]
    out_groups, extra_ids, extra = [], [], []
    for g in range(groups):
        base = int(rng.integers(n))
        while any(f"item-{base}" in og for og in out_groups):
            base = int(rng.integers(n))
        members = [f"item-{base}"]
        for j in range(1 + g % 4):
            if metric == "hamming":
                v = x[base].copy()
                bit = int(rng.integers(dim))
                v[bit // 8] ^= np.uint8(1 << (bit % 8))  # one bit flipped
            else:
                v = x[base] + 0.01 * rng.standard_normal(dim).astype(np.float32)
            extra_ids.append(f"dup-{g}-{j}")
            extra.append(v)
            members.append(extra_ids[-1])
        out_groups.append(sorted(members))
    return ids + extra_ids, np.concatenate([x, np.array(extra)]), sorted(out_groups)


THRESHOLDS = {"l2": 0.05, "cosine": 0.999, "hamming": 2}


def brute_force_groups(metric: str, ids, x) -> list[list[str]]:
    """The exact self-join: every pair within the threshold, by full distance matrix."""
    if metric == "hamming":
        bits = np.unpackbits(x, axis=1).astype(np.int32)
        D = bits.sum(1)[:, None] + bits.sum(1)[None, :] - 2 * bits @ bits.T
        hit = D <= THRESHOLDS[metric]
    elif metric == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        hit = xn @ xn.T >= THRESHOLDS[metric]
    else:
        sq = (x ** 2).sum(1)
        hit = sq[:, None] + sq[None, :] - 2 * x @ x.T <= THRESHOLDS[metric]
    a, b = np.nonzero(np.triu(hit, 1))
    return sorted(sorted(g) for g, _ in group_pairs([ids[i] for i in a], [ids[i] for i in b], np.zeros(len(a)),
                                                     False))


@pytest.fixture
def cluster(tmp_path):
    from lookalike.client import Client
    from router.server import create_router_server

    cl = LocalCluster(tmp_path / "data", shards=2)
    server, port, _ = create_router_server(cl.router, "127.0.0.1:0", jobs=cl.jobs)
    cl.client = Client(f"127.0.0.1:{port}", timeout=60)
    cl.target = f"127.0.0.1:{port}"
    yield cl
    cl.client.close()
    server.stop(None)
    cl.close()


@pytest.mark.parametrize("metric,index", [("l2", "Flat"), ("cosine", "IVF16,Flat"), ("hamming", "BFlat")])
def test_dedup_finds_exactly_the_planted_groups(cluster, metric, index):
    ids, x, groups = planted(metric, dim=128 if metric == "hamming" else 32)  # 32 random bits collide
    c = cluster.client
    dim = x.shape[1] * 8 if metric == "hamming" else x.shape[1]
    c.create_collection("cat", dim, metric, index, buckets=64, nprobe=16)
    c.upsert("cat", ids, x)
    assert brute_force_groups(metric, ids, x) == groups  # the data is what the test says it is
    job = c.start_dedup("cat", THRESHOLDS[metric], k=8, batch=500)
    seen = []
    job = c.wait_job(job.id, poll_s=0.05, on_progress=lambda j: seen.append(j.done), timeout=120)
    assert job.state == job.SUCCEEDED, job.message
    assert job.done == job.total == len(ids)
    got = [list(g.ids) for g in c.dedup_groups(job.id)]
    assert sorted(sorted(g) for g in got) == groups
    assert [len(g) for g in got] == sorted((len(g) for g in groups), reverse=True)  # largest first
    summary = json.loads(job.summary_json)
    assert summary["groups"] == len(groups) and summary["grouped_items"] == sum(len(g) for g in groups)
    # the same request returns the same finished job; a page of groups
    assert c.start_dedup("cat", THRESHOLDS[metric], k=8, batch=500).id == job.id
    assert [list(g.ids) for g in c.dedup_groups(job.id, offset=1, limit=2)] == got[1:3]


def test_dedup_errors_are_clear(cluster):
    import grpc

    c = cluster.client
    c.create_collection("e", 8, "l2", "Flat", buckets=16)
    with pytest.raises(grpc.RpcError) as err:
        c.start_dedup("nope", 0.1)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        c.start_dedup("e", float("nan"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "threshold" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        c.get_job("no-such-job")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        c.start_dedup("e", 0.1, job_id="bad id!")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    job = c.wait_job(c.start_cluster("e", k=2).id, timeout=30)  # an empty collection
    assert job.state == job.FAILED and "too few" in job.message
    with pytest.raises(grpc.RpcError) as err:
        list(c.dedup_groups(job.id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no duplicate groups" in err.value.details()


def test_dedup_resumes_where_it_stopped(tmp_path):
    ids, x, groups = planted("l2", n=3000)
    cl = LocalCluster(tmp_path / "data", shards=2)
    try:
        cl.router.create_collection(CollectionConfig(name="r", dim=32, metric="l2", index="Flat", buckets=64))
        cl.router.upsert("r", ids, x)
        scans = []
        real_scan = cl.router.scan
        cl.router.scan = lambda *a, **kw: scans.append(a[1]) or (time.sleep(0.1), real_scan(*a, **kw))[1]
        spec = {"collection": "r", "threshold": 0.05, "k": 8, "batch": 100}  # pages of about 400 items
        st = cl.jobs.start("dedup", spec)
        pages_dir = tmp_path / "data" / "jobs" / st.id / "pages"
        assert wait_for(lambda: len(list(pages_dir.glob("0*.npz"))) >= 2, 60)
        st = cl.jobs.cancel(st.id)
        assert st.state == CANCELLED and "resume" in st.message
        done_pages = len(list(pages_dir.glob("0*.npz")))
        n_pages = len(json.loads((pages_dir.parent / "plan.json").read_text()))
        assert 2 <= done_pages < n_pages
        # the process dies: a new manager over the same storage picks the job up only when asked (it was cancelled)
        cl.jobs.close()
        scans.clear()
        cl.jobs = JobManager(cl.router, tmp_path / "data", resume=True)
        assert cl.jobs.get(st.id).state == CANCELLED
        st = cl.jobs.start("dedup", spec)
        assert wait_for(lambda: cl.jobs.get(st.id).state != "RUNNING", 60)
        st = cl.jobs.get(st.id)
        assert st.state == SUCCEEDED and st.done == len(ids)
        assert len(scans) == n_pages - done_pages  # the finished pages were not read again
        assert sorted(sorted(g["ids"]) for g in cl.jobs.groups(st.id)) == groups

        # a job that was running when its process stopped starts again by itself
        spec2 = dict(spec, k=5)
        st2 = cl.jobs.start("dedup", spec2)
        assert wait_for(lambda: len(list((tmp_path / "data" / "jobs" / st2.id / "pages").glob("0*.npz"))) >= 1, 60)
        cl.jobs.close()  # not a cancel: as if the process died
        cl.jobs = JobManager(cl.router, tmp_path / "data", resume=True)
        assert wait_for(lambda: cl.jobs.get(st2.id).state == SUCCEEDED, 60)
        assert sorted(sorted(g["ids"]) for g in cl.jobs.groups(st2.id)) == groups
    finally:
        cl.close()


def blobs(n_per: int = 300, k: int = 4, dim: int = 16, seed: int = 1):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, dim)).astype(np.float32) * 20
    x = np.concatenate([c + rng.standard_normal((n_per, dim)).astype(np.float32) for c in centers])
    return [f"b{i // n_per}-{i}" for i in range(len(x))], x


@pytest.mark.parametrize("replication", [1, 2])
def test_cluster_labels_are_stored_and_consistent(tmp_path, replication):
    ids, x = blobs()
    cl = LocalCluster(tmp_path / "data", shards=3)
    try:
        cl.router.create_collection(CollectionConfig(name="c", dim=16, metric="l2", index="Flat", buckets=64,
                                                     replication=replication))
        payloads = [common_pb2.Payload(fields={"uri": f"/img/{i}.jpg"}) for i in ids]
        cl.router.upsert("c", ids, x, payloads)
        st = cl.jobs.start("cluster", {"collection": "c", "k": 4})
        assert wait_for(lambda: cl.jobs.get(st.id).state != "RUNNING", 60)
        st = cl.jobs.get(st.id)
        assert st.state == SUCCEEDED, st.message
        sizes = st.summary["sizes"]
        assert sorted(sizes) == [300] * 4  # each bucket counted once, replicas or not

        def labels():
            found, _, pls = cl.router.get("c", ids)
            assert found == ids
            fields = [dict(p.fields) for p in pls]
            assert all(f["uri"] == f"/img/{i}.jpg" for f, i in zip(fields, ids))  # other fields kept
            return [f["cluster"] for f in fields]

        got = labels()
        by_blob = {}
        for uid, lab in zip(ids, got):
            by_blob.setdefault(uid.split("-")[0], set()).add(lab)
        assert all(len(v) == 1 for v in by_blob.values())               # one label per blob
        assert len({next(iter(v)) for v in by_blob.values()}) == 4       # different blobs, different labels
        assert [got.count(str(c)) for c in range(4)] == sizes
        centroids = np.load(tmp_path / "data" / "jobs" / st.id / "centroids.npy")
        nearest = ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
        assert [int(v) for v in got] == nearest.tolist()                 # each item's nearest centroid
        if replication == 2:  # every replica holds the labels: ask each owner of an item's bucket
            smap = cl.router.shard_map("c")
            from lookalike.ids import buckets_of

            b = int(buckets_of([ids[0]], 64)[0])
            for sid in smap.owners[b]:
                shard = cl.placer._shard(sid)
                _, _, pls = shard.collection("c").get([ids[0]], False)
                assert dict(common_pb2.Payload.FromString(pls[0]).fields)["cluster"] == got[0]
        # the vectors did not change, searches still find each item first
        res = cl.router.search("c", x[:50], 1)
        assert [r[0] for r in res.ids] == ids[:50]
        cl.close()
        cl = LocalCluster(tmp_path / "data", shards=3)  # the labels are durable
        assert labels() == got
    finally:
        cl.close()


def test_cli_dedup_cluster_map_write_their_files(cluster, tmp_path):
    from tools.cli import main

    ids, x, groups = planted("l2", n=1500, dim=16, groups=10)
    c = cluster.client
    c.create_collection("m", 16, "l2", "Flat", buckets=32)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(photo)
    c.upsert("m", ids, x, [{"uri": str(photo)} for _ in ids])
    t = ["--target", cluster.target]
    out = tmp_path / "dups"
    assert main(["dedup", "m", "--threshold", "0.05", "--out", str(out), "--quiet", *t]) == 0
    rows = list(csv.DictReader(open(f"{out}.csv")))
    assert sorted(sorted(r["id"] for r in rows if r["group"] == g) for g in {r["group"] for r in rows}) == groups
    lines = [json.loads(line) for line in open(f"{out}.jsonl")]
    assert sorted(sorted(g["ids"]) for g in lines) == groups
    assert all(len(g["distances"]) == len(g["ids"]) for g in lines)
    sheet = Image.open(f"{out}.png")
    assert sheet.format == "PNG" and sheet.height >= 10 * 160  # one row per group
    assert main(["cluster", "m", "-k", "3", "--quiet", *t]) == 0
    _, _, payloads = c.get("m", ids[:20], include_vectors=False)
    assert all(p["cluster"] in {"0", "1", "2"} and p["uri"] == str(photo) for p in payloads)
    png = tmp_path / "map.png"
    assert main(["map", "m", "--out", str(png), "--width", "640", "--height", "480", "--sample", "300",
                 "--thumbnails", *t]) == 0
    im = Image.open(png)
    assert im.format == "PNG" and im.size == (640, 480)
    im.load()  # a complete, decodable file
    png2 = tmp_path / "map-pca.png"
    assert main(["map", "m", "--out", str(png2), "--method", "pca", "--width", "300", "--height", "200", *t]) == 0
    assert Image.open(png2).size == (300, 200)


def test_sample_is_seeded_and_bounded(cluster):
    import grpc

    c = cluster.client
    ids, x = blobs(n_per=250)
    c.create_collection("s", 16, "l2", "Flat", buckets=64)
    c.upsert("s", ids, x)
    a, xa, _ = c.sample("s", 200, seed=3)
    b, _, _ = c.sample("s", 200, seed=3)
    assert a == b and len(a) == 200 and len(set(a)) == 200
    assert np.allclose(xa, x[[ids.index(i) for i in a]])
    assert c.sample("s", 200, seed=4)[0] != a
    assert len(c.sample("s", 10000)[0]) == len(ids)
    with pytest.raises(grpc.RpcError) as err:
        c.sample("s", 0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.slow
def test_ray_jobs_actor_resumes_a_job_after_it_is_killed(ray_cluster_factory):
    import ray

    ids, x, groups = planted("l2", n=6000, dim=16, groups=20)
    cl = ray_cluster_factory(shards=2, jobs=True)
    c = cl.client
    c.create_collection("k", 16, "l2", "Flat", buckets=64)
    c.upsert("k", ids, x)
    job = c.start_dedup("k", 0.05, k=8, batch=100)
    assert wait_for(lambda: json.loads(c.get_job(job.id).summary_json or "{}").get("pages", "0/").split("/")[0]
                    not in ("", "0", "1"), 60)
    pid = ray.get(cl.jobs.handle.pid.remote())
    ray.kill(cl.jobs.handle, no_restart=False)  # the actor dies; Ray restarts it and it resumes the job
    job = c.wait_job(job.id, poll_s=0.2, timeout=120)
    assert ray.get(cl.jobs.handle.pid.remote()) != pid
    assert job.state == job.SUCCEEDED, job.message
    assert sorted(sorted(g.ids) for g in c.dedup_groups(job.id)) == groups
    assert [j.id for j in c.list_jobs()] == [job.id]


def test_contact_sheet_of_groups_has_a_row_per_group(tmp_path):
    from tools.catalog_report import groups_sheet

    photo = tmp_path / "p.jpg"
    Image.new("RGB", (64, 48), (10, 120, 10)).save(photo)
    png = groups_sheet([(["a", "b", "c"], [0.1, 0.1, 0.2]), (["d", "e"], [0.3, 0.3])],
                       lambda ids: [{"uri": str(photo)} if i != "e" else {} for i in ids])
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.height > 2 * 160
