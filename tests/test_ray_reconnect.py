"""A router joined to a real Ray cluster as a Ray Client (as on KubeRay) survives the head's restart: it reports
NOT_SERVING while the head is gone and logs it, connects again by itself when the head is back (the controller
reloads the cluster from storage), logs that, serves again, and answers with the data written before.

The Ray head is a `ray start --head --block` of its own (its process group is killed and started again on the same
ports, as a head pod is replaced); the router is `lookalike serve --address ray://...`, as router.yaml runs it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import free_port, make_data, stop_serve, wait_for

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start_head(ray_port: int, client_port: int, env: dict) -> subprocess.Popen:
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={ray_port}", "--num-cpus=2",
                             f"--ray-client-server-port={client_port}", "--include-dashboard=false",
                             "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)


def _kill_head(head: subprocess.Popen) -> None:
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=30)


def _status(channel):
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    except grpc.RpcError as err:
        return err.code()


def test_router_reconnects_after_the_ray_head_restarts(tmp_path):
    from lookalike.client import Client

    ray_port, client_port, port = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
           # Ray Client's wait for a server that went away (30 s by default), short here
           "RAY_CLIENT_RECONNECT_GRACE_PERIOD": "3"}
    head = _start_head(ray_port, client_port, env)
    router = None
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        router = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve", "--address",
                                   f"ray://127.0.0.1:{client_port}", "--data", str(tmp_path / "data"), "--port",
                                   str(port), "--host", "127.0.0.1", "--shards", "1", "--cluster", "rc",
                                   "--insecure"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        assert wait_for(lambda: _status(channel) == serving, 180), "the router never served"
        xb, xq = make_data("l2", 300, 8, seed=2, nq=3)
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            client.create_collection("items", dim=8, buckets=4)
            client.upsert("items", [str(i) for i in range(len(xb))], xb)
            before = client.search("items", xq, k=5).ids

        _kill_head(head)  # the head pod lost: GCS, Ray Client server, controller and (one node) the shard
        assert wait_for(lambda: _status(channel) == not_serving, 120), "health never said the head is gone"

        head = _start_head(ray_port, client_port, env)  # the head pod replaced, on the same address
        assert wait_for(lambda: _status(channel) == serving, 300), "the router never served again"
        with Client(f"127.0.0.1:{port}", timeout=120) as client:
            assert client.search("items", xq, k=5).ids == before  # reloaded from storage
            assert client.upsert("items", ["new"], np.ones((1, 8), np.float32)) == 1
        channel.close()
        out = stop_serve(router, signal.SIGTERM)
        assert "lost the control plane at the Ray cluster at ray://" in out, out[-4000:]
        assert "connected to the control plane at the Ray cluster at ray://" in out, out[-4000:]
        assert router.returncode == 0, out[-3000:]
    finally:
        if router is not None and router.poll() is None:
            router.kill()
            router.wait(timeout=30)
        _kill_head(head)
