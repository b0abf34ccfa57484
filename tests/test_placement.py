"""Shards Ray cannot place: growth past the embedded Ray's first size, and a shard that cannot start reported in
status and by `lookalike rebalance` (which never waits forever) instead of moves that wait without a word."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import exact_knn, free_port, make_data, run_cli, stop_serve


# --- without Ray: the controller's placement check, status and the CLI's rebalance ---------------------------------
class _StuckPlacer:
    """A LocalPlacer that never starts the shards in ``stuck`` and says ``problem`` about them."""

    def __init__(self, data_dir, stuck: set[str], problem: str):
        from control.local import LocalPlacer

        self._local = LocalPlacer(data_dir)
        self.stuck, self.problem = stuck, problem

    def __getattr__(self, name):
        return getattr(self._local, name)

    def ensure_shard(self, shard_id: str) -> None:
        if shard_id not in self.stuck:
            self._local.ensure_shard(shard_id)

    def placement_problem(self, shard_id: str) -> str:
        return self.problem if shard_id in self.stuck else ""


@pytest.fixture
def stuck_cluster(tmp_path):
    """start(problem) -> (controller, target): one serving shard; shard-1, once added, never starts."""
    from lookalike.config import CollectionConfig, MovePolicy
    from control.controller import Controller
    from router.core import Router
    from router.server import create_router_server
    from router.shard_client import GrpcShardClient

    stop = []

    def start(problem: str):
        placer = _StuckPlacer(tmp_path, {"shard-1"}, problem)
        ctl = Controller(tmp_path, 1, placer, MovePolicy(grace_s=0.1))
        placer._local.controller = ctl
        ctl.start()
        router = Router(ctl, GrpcShardClient, refresh_interval=0.1)
        server, port, _ = create_router_server(router, "127.0.0.1:0")
        stop.append(lambda: (server.stop(None), router.close(), ctl.stop(), placer.stop()))
        router.create_collection(CollectionConfig("c", dim=4, buckets=16))
        return ctl, f"127.0.0.1:{port}"

    yield start
    for f in stop:
        f()


def test_a_shard_that_cannot_start_is_reported_and_ends_rebalance(stuck_cluster):
    ctl, target = stuck_cluster("cannot be placed: it needs 1 CPU and 0.0 of 2.0 CPUs are free")
    t0 = time.monotonic()
    rb = run_cli("rebalance", "c", "--add-shards", "1", target=target, timeout=60)
    assert rb.returncode == 1, rb.stdout + rb.stderr
    assert time.monotonic() - t0 < 30
    assert ("error: shard shard-1 cannot be placed: it needs 1 CPU and 0.0 of 2.0 CPUs are free; 8 bucket(s) wait "
            "for it") in rb.stderr, rb.stderr
    assert "Traceback" not in rb.stderr
    assert [s.problem for s in ctl.shards()] == ["", "cannot be placed: it needs 1 CPU and 0.0 of 2.0 CPUs are free"]
    st = run_cli("status", target=target)
    assert "  shard-1 cannot be placed: it needs 1 CPU" in st.stdout, st.stdout
    js = json.loads(run_cli("status", "--json", target=target).stdout)
    assert js["shards"][1]["problem"].startswith("cannot be placed") and not js["shards"][0]["problem"]
    assert ctl.check_growth() == 0  # no second shard while one cannot start


def test_rebalance_wait_is_bounded_and_ctrl_c_says_so(stuck_cluster):
    ctl, target = stuck_cluster("")  # shard-1 just never comes up, and nothing says why
    rb = run_cli("rebalance", "c", "--add-shards", "1", "--timeout", "2", target=target, timeout=60)
    assert rb.returncode == 1, rb.stdout + rb.stderr
    assert "error: stopped waiting after 2s: 8 bucket(s) still to move and shard(s) shard-1 not serving yet" \
        in rb.stderr, rb.stderr
    # a second rebalance queues nothing more, and follows the moves already queued
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "rebalance", "c", "--target", target],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert "queued" in proc.stdout.readline()
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "stopped following the rebalance: 8 bucket(s) still to move; the moves go on" in err, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


# --- on Ray ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_reports_a_shard_it_cannot_place(ray_session, tmp_path):
    """Shards so large that the session's Ray holds one but not two: the second is reported within seconds, with
    the CPUs it needs and those free, by the controller and by `lookalike rebalance`."""
    from lookalike.config import ClusterConfig
    from control.ray_cluster import start_cluster, stop_cluster
    from router.core import Router
    from router.server import create_router_server

    free = ray_session.available_resources().get("CPU", 0)
    cpus = int(free // 2) + 1
    cfg = ClusterConfig(data_dir=str(tmp_path), shards=1, cluster_name="unplaced", shard_num_cpus=cpus)
    handle, control = start_cluster(cfg, segment_bytes=1 << 20)
    router = Router(control, refresh_interval=0.2)
    server, port, _ = create_router_server(router, "127.0.0.1:0")
    target = f"127.0.0.1:{port}"
    try:
        assert run_cli("collection", "create", "c", "--dim", "4", "--buckets", "16", target=target).returncode == 0
        t0 = time.monotonic()
        rb = run_cli("rebalance", "c", "--add-shards", "1", target=target, timeout=90)
        assert rb.returncode == 1, rb.stdout + rb.stderr
        assert time.monotonic() - t0 < 30
        left = free - cpus
        assert f"error: shard shard-1 cannot be placed: it needs {cpus} CPUs and {left:.1f} of " in rb.stderr, rb.stderr
        assert "Traceback" not in rb.stderr
        problems = [s.problem for s in control.shards()]
        assert not problems[0] and problems[1].startswith(f"cannot be placed: it needs {cpus} CPUs")
        assert "shard-1 cannot be placed" in run_cli("status", target=target).stdout
    finally:
        server.stop(None)
        router.close()
        stop_cluster(handle)


@pytest.mark.slow
def test_serve_grows_past_its_first_cpus_and_restarts_on_more_shards(tmp_path):
    """`serve --shards 1` with shards as large as the machine (so that the embedded Ray sized from --shards alone
    holds one), grown twice to 4 shards: every move runs and searches stay exact; a restart that asks for fewer
    shards (the default 2) and growth to 2 serves the 4 in storage."""
    from lookalike.net import wait_for_serving

    cpus = str(os.cpu_count() or 1)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    def serve(*flags):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve", "--data", str(tmp_path / "data"),
                                 "--port", str(port), "--host", "127.0.0.1", "--shard-cpus", cpus, *flags],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            wait_for_serving(f"127.0.0.1:{port}", timeout=120)
        except TimeoutError:
            proc.kill()
            raise AssertionError(proc.communicate()[0][-3000:]) from None
        return proc, f"127.0.0.1:{port}"

    def stop(proc):
        out = stop_serve(proc)
        assert proc.returncode == 0, out[-3000:]

    xb, xq = make_data("l2", 2000, 8, seed=4)
    np.save(tmp_path / "xb.npy", xb)
    np.save(tmp_path / "xq.npy", xq[:5])
    _, I = exact_knn("l2", xb, xq[:5], 5)
    expected = [[str(i) for i in row] for row in I]

    def check(target, shards):
        st = json.loads(run_cli("status", "--json", target=target).stdout)
        assert len(st["shards"]) == shards and all(s["serving"] for s in st["shards"]) and not st["moves"], st
        assert all(int(s["buckets"]) > 0 for s in st["shards"])
        assert sum(int(s["vectors"]) for s in st["shards"]) == len(xb)
        res = run_cli("search", "g", str(tmp_path / "xq.npy"), "-k", "5", "--json", target=target)
        assert [r["ids"] for r in json.loads(res.stdout)["results"]] == expected

    proc, target = serve("--shards", "1", "--max-shards", "4")
    try:
        assert run_cli("collection", "create", "g", "--dim", "8", "--buckets", "32", target=target).returncode == 0
        assert run_cli("upsert", "g", str(tmp_path / "xb.npy"), target=target).returncode == 0
        for add in ("1", "2"):
            rb = run_cli("rebalance", "g", "--add-shards", add, "--timeout", "60", target=target, timeout=90)
            assert rb.returncode == 0, rb.stdout + rb.stderr
        check(target, 4)
    finally:
        stop(proc)
    proc, target = serve("--max-shards", "2")
    try:
        check(target, 4)
    finally:
        stop(proc)
