"""`lookalike serve` as a person runs it (embedded local Ray, its own process), driven by the CLI."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import exact_knn, free_port, make_data, run_cli, stop_serve

pytestmark = pytest.mark.slow


def test_serve_and_cli_end_to_end(tmp_path):
    from lookalike.net import wait_for_serving

    port = free_port()
    target = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve", "--data", str(tmp_path / "data"),
                             "--port", str(port), "--host", "127.0.0.1", "--shards", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_for_serving(target, timeout=120)
        xb, xq = make_data("l2", 3000, 16)
        np.save(tmp_path / "xb.npy", xb)
        np.save(tmp_path / "xq.npy", xq[:3])
        (tmp_path / "ids.txt").write_text("\n".join(f"img-{i}" for i in range(3000)) + "\n")
        (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"uri": f"/img/{i}.jpg"}) for i in range(3000)))
        assert run_cli("collection", "create", "cats", "--dim", "16", "--metric", "l2", "--index", "Flat",
                    target=target).returncode == 0
        up = run_cli("upsert", "cats", str(tmp_path / "xb.npy"), "--ids", str(tmp_path / "ids.txt"), "--payload",
                  str(tmp_path / "p.jsonl"), target=target)
        assert up.returncode == 0 and "upserted 3000" in up.stdout, up.stderr
        res = run_cli("search", "cats", str(tmp_path / "xq.npy"), "-k", "4", "--json", "--payloads", target=target)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        _, I = exact_knn("l2", xb, xq[:3], 4)
        assert [r["ids"] for r in out["results"]] == [[f"img-{i}" for i in row] for row in I]
        assert out["results"][0]["payloads"][0] == {"uri": f"/img/{I[0][0]}.jpg"}
        st = json.loads(run_cli("status", "--json", target=target).stdout)
        assert sum(int(s["vectors"]) for s in st["shards"]) == 3000
        assert "cats" in run_cli("collection", "list", target=target).stdout
        # grow while serving: one more shard, buckets moved onto it, same answers
        rb = run_cli("rebalance", "cats", "--add-shards", "1", target=target)
        assert rb.returncode == 0 and "queued over 3 shard(s)" in rb.stdout, rb.stderr
        st = json.loads(run_cli("status", "--json", target=target).stdout)
        assert len(st["shards"]) == 3 and all(int(s["buckets"]) > 0 for s in st["shards"]) and not st["moves"]
        assert sum(int(s["vectors"]) for s in st["shards"]) == 3000
        assert "bucket moves:" in run_cli("status", target=target).stdout
        res = run_cli("search", "cats", str(tmp_path / "xq.npy"), "-k", "4", "--json", target=target)
        assert [r["ids"] for r in json.loads(res.stdout)["results"]] == [[f"img-{i}" for i in row] for row in I]
        bad = run_cli("collection", "create", "cats", "--dim", "16", target=target)
        assert bad.returncode == 1 and "ALREADY_EXISTS" in bad.stderr
    finally:
        # a second signal during shutdown must not hang it
        out = stop_serve(proc, signal.SIGTERM, signal.SIGINT)
    assert proc.returncode == 0, out[-3000:]
    assert "lookalike stopped" in out


def test_serve_joins_an_existing_ray_cluster(tmp_path):
    """`lookalike serve --address` joins a Ray cluster started apart (as on KubeRay) instead of starting one;
    stopping that router leaves the shards serving in the cluster. A second router joins as a Ray Client
    (`ray://`, as the router pods in k8s/ do) and serves the same collections from the same shards."""
    from lookalike.net import wait_for_serving
    from protos import shard_pb2
    from router.shard_client import GrpcShardClient

    ray_port, client_port, port, port2 = free_port(), free_port(), free_port(), free_port()
    # the nodes can import lookalike, as from the images (a Ray Client job does not carry the driver's directory)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={ray_port}", "--num-cpus=4",
                             f"--ray-client-server-port={client_port}", "--include-dashboard=false",
                             "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    proc = proc2 = None
    try:
        proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve", "--address",
                                 f"127.0.0.1:{ray_port}", "--data", str(tmp_path / "data"), "--port", str(port),
                                 "--host", "127.0.0.1", "--shards", "1", "--cluster", "joined", "--insecure"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        target = f"127.0.0.1:{port}"
        wait_for_serving(target, timeout=120)
        assert run_cli("collection", "create", "j", "--dim", "4", target=target).returncode == 0
        st = json.loads(run_cli("status", "--json", target=target).stdout)
        assert [s["serving"] for s in st["shards"]] == [True]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-3000:]
        shard = GrpcShardClient(st["shards"][0]["address"])
        assert shard.call("Stats", shard_pb2.ShardStatsRequest(), 10).result().serving
        shard.close()

        proc2 = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve", "--address",
                                  f"ray://127.0.0.1:{client_port}", "--data", str(tmp_path / "data"), "--port",
                                  str(port2), "--host", "127.0.0.1", "--shards", "1", "--cluster", "joined", "--insecure"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        target = f"127.0.0.1:{port2}"
        try:
            wait_for_serving(target, timeout=120)
        except TimeoutError:
            proc2.kill()
            raise AssertionError(proc2.communicate()[0][-3000:]) from None
        st2 = json.loads(run_cli("status", "--json", target=target).stdout)
        assert [s["address"] for s in st2["shards"]] == [st["shards"][0]["address"]]  # the same shard
        assert "j" in run_cli("collection", "list", target=target).stdout
        xb = np.random.default_rng(3).standard_normal((200, 4)).astype("float32")
        np.save(tmp_path / "j.npy", xb)
        up = run_cli("upsert", "j", str(tmp_path / "j.npy"), target=target)
        assert up.returncode == 0 and "upserted 200" in up.stdout, up.stderr
        res = run_cli("search", "j", str(tmp_path / "j.npy"), "-k", "3", "--json", target=target)
        _, I = exact_knn("l2", xb, xb, 3)
        assert [r["ids"] for r in json.loads(res.stdout)["results"]] == [[str(i) for i in row] for row in I]
        proc2.send_signal(signal.SIGTERM)
        out, _ = proc2.communicate(timeout=60)
        assert proc2.returncode == 0 and "lookalike stopped" in out, out[-3000:]
    finally:
        for p in (proc, proc2):
            if p is not None and p.poll() is None:
                p.kill()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:  # `ray start --block` takes half a minute to stop politely
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
