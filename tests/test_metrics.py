"""Prometheus metrics (lookalike.metrics, shard.metrics, router.metrics): /metrics of a real in-process cluster served
over gRPC moves with the calls made, by status code, on both hops; the collection gauges show what was written; the
router's service discovery lists the shards' endpoints; a metrics bind beyond loopback without TLS is refused."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from control.local import LocalCluster
from lookalike.client import Client
from lookalike.errors import InvalidArgument
from lookalike.metrics import serve_metrics
from lookalike.security import TLSConfig
from protos import shard_pb2, shard_pb2_grpc
from router.metrics import SD_PATH, serve_router_metrics
from router.server import create_router_server
from tools.cli import build_parser


def scrape(url: str, context=None) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} of a /metrics page."""
    text = urllib.request.urlopen(url, timeout=10, context=context).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels) -> float:
    """The sum of the samples ``name`` whose labels include ``labels``."""
    return sum(v for (n, lab), v in samples.items() if n == name and labels.items() <= dict(lab).items())


@pytest.fixture
def metered(tmp_path):
    """(cluster, client, router metrics URL) of an in-process cluster whose shards serve metrics too."""
    cluster = LocalCluster(tmp_path, shards=2, metrics=True)
    server, port, _ = create_router_server(cluster.router, "127.0.0.1:0")
    metrics = serve_router_metrics(cluster.router, "127.0.0.1", 0)
    client = Client(f"127.0.0.1:{port}", timeout=30)
    try:
        yield cluster, client, f"http://{metrics.address}"
    finally:
        client.close()
        metrics.close()
        server.stop(None)
        cluster.close()


def test_metrics_move_with_calls_by_status_on_both_hops(metered):
    cluster, client, url = metered
    start = scrape(f"{url}/metrics")  # the process's registry may hold other tests' calls
    client.create_collection("m", dim=8, metric="l2", buckets=8)
    x = np.random.default_rng(0).random((40, 8), dtype=np.float32)
    client.upsert("m", [str(i) for i in range(40)], x)
    before = scrape(f"{url}/metrics")

    assert len(client.search("m", x[:3], k=5).ids) == 3  # OK
    with pytest.raises(Exception):  # INVALID_ARGUMENT: queries of the wrong dimension
        client.search("m", np.zeros((1, 5), np.float32), k=5)
    shard_addr = next(iter(cluster.controller.shards())).address
    with grpc.insecure_channel(shard_addr) as ch:  # INVALID_ARGUMENT on the internal hop: k = 0
        req = shard_pb2.ShardSearchRequest(collection="m", k=0)
        with pytest.raises(grpc.RpcError) as err:
            shard_pb2_grpc.ShardStub(ch).Search(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(f"{url}/metrics")

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    # the public hop, by status code, and its latency histogram
    assert delta("lookalike_router_requests_total", method="Search", code="OK") == 1
    assert delta("lookalike_router_requests_total", method="Search", code="INVALID_ARGUMENT") == 1
    assert delta("lookalike_router_request_seconds_count", method="Search") == 2
    assert delta("lookalike_router_request_seconds_bucket", method="Search", le="+Inf") == 2
    assert delta("lookalike_router_request_seconds_sum", method="Search") > 0
    assert (total(after, "lookalike_router_requests_total", method="Upsert", code="OK")
            - total(start, "lookalike_router_requests_total", method="Upsert", code="OK")) == 1
    # the internal hop: the OK search reached every shard (2), the bad one none; the direct call was refused
    assert delta("lookalike_shard_requests_total", method="Search", code="OK") == 2
    assert delta("lookalike_shard_requests_total", method="Search", code="INVALID_ARGUMENT") == 1
    assert delta("lookalike_shard_request_seconds_count", method="Search") == 3
    assert {dict(lab)["shard"] for (n, lab), v in after.items()  # the shards whose counts moved
            if n == "lookalike_shard_requests_total" and v != before.get((n, lab), 0)} == {
        info.shard_id for info in cluster.controller.shards()}
    # queries per request, fan-out width; the collection gauges show the vectors upserted
    assert delta("lookalike_router_search_queries_sum") == 3
    assert delta("lookalike_router_fanout_shards_sum") == 2
    assert delta("lookalike_router_batch_queries_sum") == 3  # the batcher sent them as one batch
    assert total(after, "lookalike_shard_vectors", collection="m") == 40
    assert total(after, "lookalike_shard_buckets", collection="m") == 8
    assert total(after, "lookalike_shard_index_bytes", collection="m") > 0
    assert total(after, "lookalike_shard_wal_bytes", collection="m") > 0
    assert total(after, "lookalike_shard_wal_fsync_seconds_count", collection="m") >= 1
    assert total(after, "lookalike_shard_serving") == 2
    # the process's allocator (glibc here): what its heap holds in use, once for the process, not per shard
    assert total(after, "lookalike_shard_process_allocator_bytes", stat="heap_in_use") > 0
    assert sum(1 for n, lab in after if n == "lookalike_shard_process_allocator_bytes"
               and dict(lab).get("stat") == "heap_in_use") == 1


def test_answers_with_partial_coverage_are_counted(metered):
    cluster, client, url = metered
    client.create_collection("m", dim=4, metric="l2", buckets=8)
    client.upsert("m", [str(i) for i in range(20)], np.random.default_rng(4).random((20, 4), dtype=np.float32))
    before = scrape(f"{url}/metrics")
    cluster.placer.stop_shard(cluster.controller.shards()[0].shard_id)  # half the buckets (replication 1)
    hits = client.search("m", np.ones((1, 4), np.float32), k=3, min_coverage=0.25)
    assert hits.coverage < 1
    after = scrape(f"{url}/metrics")
    assert total(after, "lookalike_router_partial_answers_total", collection="m") - total(
        before, "lookalike_router_partial_answers_total", collection="m") == 1


def test_bucket_moves_are_counted_and_timed(metered):
    cluster, client, url = metered
    client.create_collection("m", dim=4, metric="l2", buckets=8)
    client.upsert("m", [str(i) for i in range(50)], np.random.default_rng(2).random((50, 4), dtype=np.float32))
    before = scrape(f"{url}/metrics")
    assert before[("lookalike_moves_done_total", ())] == 0 and before[("lookalike_move_seconds_count", ())] == 0
    queued = client.rebalance("m", add_shards=1).moves
    assert queued > 0 and cluster.controller.wait_moves(60)
    after = scrape(f"{url}/metrics")
    assert after[("lookalike_moves_queued_total", ())] == queued
    assert after[("lookalike_moves_done_total", ())] == queued == after[("lookalike_move_seconds_count", ())]
    assert after[("lookalike_moves_failed_total", ())] == 0 and after[("lookalike_move_seconds_sum", ())] > 0
    assert total(after, "lookalike_shard_vectors", collection="m") == 50  # the new shard's too, none counted twice


def test_service_discovery_lists_each_shards_own_endpoint(metered):
    cluster, client, url = metered
    client.create_collection("m", dim=4, metric="l2", buckets=4)
    client.upsert("m", ["a", "b", "c"], np.eye(3, 4, dtype=np.float32))
    groups = json.loads(urllib.request.urlopen(f"{url}{SD_PATH}", timeout=10).read())
    shards = {info.shard_id for info in cluster.controller.shards()}
    assert {g["labels"]["lookalike_shard_id"] for g in groups} == shards
    assert all(g["labels"]["lookalike_role"] == "shard" and len(g["targets"]) == 1 for g in groups)
    assert {s.metrics_address for s in client.status().shards} == {g["targets"][0] for g in groups}
    seen = 0
    for g in groups:  # each target serves its own shard's samples only
        samples = scrape(f"http://{g['targets'][0]}/metrics")
        assert {dict(lab).get("shard") for (_n, lab) in samples} == {g["labels"]["lookalike_shard_id"]}
        seen += total(samples, "lookalike_shard_vectors", collection="m")
    assert seen == 3


def test_metrics_beyond_loopback_need_tls(tmp_path):
    with pytest.raises(InvalidArgument, match="refusing to serve metrics on 0.0.0.0 without TLS"):
        serve_metrics("0.0.0.0", 0)
    with pytest.raises(InvalidArgument, match="without TLS"):  # TLS without a client CA: anyone could scrape
        serve_metrics("0.0.0.0", 0, TLSConfig("cert.pem", "key.pem"))
    out = subprocess.run([sys.executable, "-m", "tools.cli", "serve", "--data", str(tmp_path / "d"),
                          "--metrics-port", "0", "--metrics-host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: refusing to serve metrics on 0.0.0.0 without TLS: give --tls-cert, --tls-key and --tls-ca "
        "(Prometheus then scrapes with a client certificate that CA signed), or bind metrics to 127.0.0.1"]


def test_metrics_over_mutual_tls(tmp_path):
    from lookalike.devcerts import write_pki  # deferred: the cryptography package (a dev dependency)

    tls = write_pki(tmp_path)
    server = serve_metrics("0.0.0.0", 0, tls)  # beyond loopback: HTTPS, client certificates required
    try:
        ctx = ssl.create_default_context(cafile=tls.ca)
        ctx.check_hostname = False
        url = f"https://127.0.0.1:{server.port}/metrics"
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):  # no client certificate
            scrape(url, ctx)
        ctx.load_cert_chain(tls.cert, tls.key)
        assert any(n == "python_gc_objects_collected_total" for n, _ in scrape(url, ctx))
    finally:
        server.close()


def test_quantile_from_buckets_as_prometheus_does():
    from bench.loadtest.server_side import quantile

    le = {0.1: 10.0, 0.2: 30.0, 0.4: 40.0, float("inf"): 40.0}
    assert quantile(0.25, le) == pytest.approx(0.1)  # rank 10: the top of the first bucket
    assert quantile(0.5, le) == pytest.approx(0.15)  # rank 20: halfway through (0.1, 0.2]
    assert quantile(0.875, le) == pytest.approx(0.3)  # rank 35: halfway through (0.2, 0.4]
    assert quantile(0.99, {0.1: 1.0, float("inf"): 100.0}) == pytest.approx(0.1)  # in +Inf: the last finite bound
    assert np.isnan(quantile(0.5, {0.1: 0.0, float("inf"): 0.0}))


def test_loadtest_reports_server_side_latency(metered, tmp_path, capsys):
    from tools import cli

    cluster, client, url = metered
    client.create_collection("m", dim=8, metric="l2", buckets=8)
    client.upsert("m", [str(i) for i in range(100)], np.random.default_rng(1).random((100, 8), dtype=np.float32))
    out = tmp_path / "lt.json"
    args = ["loadtest", "m", "--target", client.target, "--concurrency", "2", "--processes", "1", "--requests", "30",
            "--duration", "0", "--out", str(out), "--plot", "", "--quiet", "--metrics-url", f"{url}/metrics"]
    assert cli.main(args) == 0
    report = json.loads(out.read_text())
    server = report["server_latency_ms"]["search"]
    assert server["count"] == report["latency_ms"]["search"]["count"] == 30
    assert 0 < server["p50"] <= server["p99"] and server["mean"] > 0
    assert report["server_latency_ms"]["upsert"]["count"] == 0
    printed = capsys.readouterr().out
    assert "server ms" in printed and "lookalike_router_request_seconds" in printed
    # a URL that does not answer: one sentence, exit 2, before any load
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    assert cli.main([*args[:-1], f"http://127.0.0.1:{dead}/metrics"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot read the server's metrics at http://127.0.0.1:{dead}")


ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_grafana_dashboard_queries_only_metrics_lookalike_exports(metered):
    cluster, client, url = metered
    client.create_collection("m", dim=4, metric="l2", buckets=4)
    client.upsert("m", ["a"], np.ones((1, 4), np.float32))
    client.search("m", np.ones((1, 4), np.float32), k=1)
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    exported = set()
    for family in text_string_to_metric_families(text):  # families without samples yet (GPU counters) count too
        exported |= {family.name, *(family.name + s for s in ("_total", "_bucket", "_sum", "_count"))}
        exported |= {s.name for s in family.samples}
    dashboard = json.loads((ROOT / "k8s/base/grafana/lookalike.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 20
    used = {name for e in exprs for name in re.findall(r"\blookalike_[a-z_]+", e)}
    assert used and used <= exported, sorted(used - exported)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: the kustomize render is not "
                    "checked")
def test_prometheus_finds_the_router_and_the_shards_where_serve_listens():
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s/overlays/cpu")], capture_output=True, text=True,
                         timeout=60)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    router = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "lookalike-router")
    pod = router["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args = build_parser().parse_args(["serve", *(a for a in container["args"] if a.startswith("--metrics-"))])
    annotations = pod["metadata"]["annotations"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert args.metrics_port == port == int(annotations["prometheus.io/port"])
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/scheme"] == "https"
    env = {e["name"] for e in container["env"]}
    assert {"LOOKALIKE_TLS_CERT", "LOOKALIKE_TLS_KEY", "LOOKALIKE_TLS_CA"} <= env  # beyond loopback: TLS required
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "lookalike-router")
    assert {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"} in service["spec"]["ports"]
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "lookalike-prometheus")
    jobs = {j["job_name"]: j for j in yaml.safe_load(cm["data"]["scrape-configs.yaml"])}
    assert set(jobs) == {"lookalike-router", "lookalike-shards"}
    for job in jobs.values():
        assert job["scheme"] == "https" and {"cert_file", "key_file", "ca_file"} <= set(job["tls_config"])
    sd = urllib.parse.urlsplit(jobs["lookalike-shards"]["http_sd_configs"][0]["url"])
    assert (sd.scheme, sd.hostname.split(".")[0], sd.port, sd.path) == ("https", "lookalike-router", port, SD_PATH)
    dash = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "lookalike-grafana-dashboard")
    assert json.loads(dash["data"]["lookalike.json"])["uid"] == "lookalike"


def test_ray_shards_serve_their_metrics_and_the_router_lists_them(ray_session, tmp_path):
    """The shard actors of a Ray cluster (loopback, plaintext) each serve their process's metrics; the router's
    service discovery lists them and its own endpoint reads the moves from the controller actor."""
    import uuid

    from control.ray_cluster import start_cluster, stop_cluster
    from lookalike.config import ClusterConfig, CollectionConfig
    from router.core import Router

    cfg = ClusterConfig(data_dir=str(tmp_path), shards=2, cluster_name=f"t{uuid.uuid4().hex[:8]}",
                        shard_num_cpus=0.5, shard_metrics_port=0)
    handle, control = start_cluster(cfg, segment_bytes=1 << 20)
    router = Router(control, refresh_interval=0.2)
    metrics = serve_router_metrics(router, "127.0.0.1", 0)
    try:
        router.create_collection(CollectionConfig("r", 4, "l2", buckets=4))
        router.upsert("r", ["a", "b", "c", "d", "e"], np.eye(5, 4, dtype=np.float32))
        groups = json.loads(urllib.request.urlopen(f"http://{metrics.address}{SD_PATH}", timeout=30).read())
        assert {g["labels"]["lookalike_shard_id"] for g in groups} == {s.shard_id for s in control.shards()}
        vectors = 0
        for g in groups:
            samples = scrape(f"http://{g['targets'][0]}/metrics")
            assert total(samples, "lookalike_shard_requests_total", method="Upsert", code="OK") >= 1
            vectors += total(samples, "lookalike_shard_vectors", collection="r")
        assert vectors == 5
        assert scrape(f"http://{metrics.address}/metrics")[("lookalike_moves_queued_total", ())] == 0
    finally:
        metrics.close()
        router.close()
        stop_cluster(handle)


def test_gpu_searches_cpu_fallbacks_and_mirror_builds_are_counted():
    from prometheus_client import REGISTRY

    from lookalike.config import CollectionConfig
    from lookalike.gpu import EmulatedGpuBackend
    from shard.cpu_index import VectorIndex

    name = "gpu-metrics"
    index = VectorIndex(CollectionConfig(name, 8, "l2", "Flat").validated(), EmulatedGpuBackend())
    x = np.random.default_rng(3).random((100, 8), dtype=np.float32)
    index.add(np.arange(100, dtype=np.int64), x)

    def value(metric, **labels):
        return REGISTRY.get_sample_value(metric, {"collection": name, **labels}) or 0.0

    index.search(x[:2], 5)  # no mirror yet: the CPU answers
    assert value("lookalike_shard_cpu_fallbacks_total") == 1 and value("lookalike_shard_gpu_searches_total") == 0
    assert index.sync_gpu()
    assert value("lookalike_shard_gpu_mirror_builds_total", outcome="ok") == 1
    index.search(x[:2], 5)
    assert value("lookalike_shard_gpu_searches_total") == 1 and value("lookalike_shard_cpu_fallbacks_total") == 1


@pytest.mark.slow
def test_serve_metrics_port_serves_the_router_and_lists_its_shards(tmp_path):
    """`lookalike serve --metrics-port` with its embedded Ray: the router's /metrics, and /sd with the shard actor's
    own endpoint."""
    import os
    import signal

    import psutil

    from conftest import free_port
    from lookalike.net import wait_for_serving
    from test_serve_hardening import _stop

    port, mport = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # the session's setting; serve turns the token on itself
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve", "--data", str(tmp_path / "d"), "--port",
                             str(port), "--shards", "1", "--metrics-port", str(mport)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    started = []
    try:
        wait_for_serving(f"127.0.0.1:{port}", timeout=120)
        started += psutil.Process(proc.pid).children(recursive=True)
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            client.create_collection("s", dim=4, metric="l2", buckets=4)
            client.upsert("s", ["a", "b"], np.eye(2, 4, dtype=np.float32))
        router = scrape(f"http://127.0.0.1:{mport}/metrics")
        assert total(router, "lookalike_router_requests_total", method="Upsert", code="OK") == 1
        groups = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{mport}{SD_PATH}", timeout=30).read())
        assert len(groups) == 1 and groups[0]["targets"][0].startswith("127.0.0.1:")
        shard = scrape(f"http://{groups[0]['targets'][0]}/metrics")
        assert total(shard, "lookalike_shard_vectors", collection="s") == 2
        assert total(shard, "lookalike_shard_requests_total", method="Upsert", code="OK") == 1
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0 and f"Prometheus metrics on http://127.0.0.1:{mport}/metrics" in out, out
    finally:
        _stop([proc], started)


def test_the_allocators_statistics_are_read_at_most_every_30_s(monkeypatch):
    """shard.metrics ShardCollector._allocator: glibc's statistics walk its free lists under the arenas' locks, so
    scrapes in between reuse the last reading."""
    import shard.metrics as sm

    reads = []
    monkeypatch.setattr(sm, "allocator_stats", lambda: reads.append(1) or {"heap_in_use": len(reads)})
    now = [1000.0]
    monkeypatch.setattr(sm, "_clock", lambda: now[0])
    col = sm.ShardCollector()
    assert col._allocator() == {"heap_in_use": 1}
    now[0] += sm.ALLOCATOR_EVERY_S - 1
    assert col._allocator() == {"heap_in_use": 1} and len(reads) == 1
    now[0] += 1
    assert col._allocator() == {"heap_in_use": 2}
