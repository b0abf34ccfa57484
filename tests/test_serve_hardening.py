"""`lookalike serve` against what a real local cluster showed (docs/SECURITY.md, "What listens where"): Ray's
ports take no call without the embedded cluster's token, one storage has one server, a stop signal to the whole
process group ends serve in seconds, and TLS files that do not pair are named at start."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import free_port

# Calls an outsider would make on Ray's ports: list the actors (and their PIDs), read Ray's KV store, the raylet's
# node stats, a worker's tasks, the object manager. Empty requests: the token is checked before the request is read.
RAY_CALLS = ["/ray.rpc.ActorInfoGcsService/GetAllActorInfo", "/ray.rpc.InternalKVGcsService/InternalKVGet",
             "/ray.rpc.NodeManagerService/GetNodeStats", "/ray.rpc.CoreWorkerService/NumPendingTasks",
             "/ray.rpc.ObjectManagerService/Pull"]


def _serve(data, port, env):
    # its own session: the test sends signals to serve's process group, as a terminal or systemd does
    return subprocess.Popen([sys.executable, "-m", "tools.cli", "serve", "--data", str(data), "--port", str(port),
                             "--host", "127.0.0.1", "--shards", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def _listening(pid):
    """{(process name, ip, port)} of every TCP port the process tree of ``pid`` listens on."""
    import psutil

    root = psutil.Process(pid)
    found = set()
    for p in [root, *root.children(recursive=True)]:
        try:
            name = p.name()
            found |= {(name, c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # a worker that ended meanwhile
            pass
    return found


def _dial(ip: str) -> str:
    ip = "127.0.0.1" if ip in ("0.0.0.0", "::", "::ffff:0.0.0.0") else ip.removeprefix("::ffff:")
    return f"[{ip}]" if ":" in ip else ip


def _ray_call_codes(host: str, port: int) -> dict[str, str]:
    """What each of RAY_CALLS gets on host:port without a credential: a status code's name, or OK."""
    import grpc

    codes = {}
    with grpc.insecure_channel(f"{host}:{port}") as ch:
        for method in RAY_CALLS:
            call = ch.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            try:
                call(b"", timeout=5)
                codes[method] = "OK"
            except grpc.RpcError as err:
                codes[method] = err.code().name
    return codes


def _http_status(host: str, port: int) -> int | None:
    """The HTTP status of a POST to Ray's runtime-env agent API without a token; None: not HTTP."""
    req = urllib.request.Request(f"http://{host}:{port}/get_or_create_runtime_env", data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return None


def _stop(procs, started):
    """Kills the serve processes left and what they started (psutil processes: a PID since reused is left alone).
    After a kill -9 of serve, Ray's agents linger for about a minute (they report the raylet's death to a GCS that
    is gone)."""
    import psutil

    for p in procs:
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    for p in started:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.mark.slow
def test_ray_needs_the_token_one_server_per_storage_and_a_group_signal_stops_serve(tmp_path):
    """Two serve starts: the first is scanned, refuses a second server on its storage and is killed with SIGKILL;
    the second starts on the same storage (the kernel dropped the lock) and stops on SIGTERM to its process group."""
    import psutil

    from lookalike.net import wait_for_serving

    data = tmp_path / "data"
    # the test session's Ray runs without auth (conftest) and this is inherited: serve turns it on regardless
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = free_port()
    first = second = third = None
    started = []  # what the serve processes started, for the cleanup
    try:
        first = _serve(data, port, env)
        wait_for_serving(f"127.0.0.1:{port}", timeout=120)
        started += psutil.Process(first.pid).children(recursive=True)

        token = data / "ray-auth-token"
        assert oct(token.stat().st_mode & 0o777) == "0o600"
        secret = token.read_text()
        assert len(secret) == 64

        listening = _listening(first.pid)
        assert any(name == "gcs_server" for name, _, _ in listening), listening
        report, bad = [], []
        for name, ip, p in sorted(listening):
            codes = _ray_call_codes(_dial(ip), p)
            report.append(f"{name} {ip}:{p} {codes}")
            if name == "gcs_server" and codes[RAY_CALLS[0]] != "UNAUTHENTICATED":
                bad.append(f"the GCS at {ip}:{p} did not ask for the token: {codes}")
            if "OK" in codes.values():
                bad.append(f"{name} {ip}:{p} answered without a credential: {codes}")
            elif "UNAUTHENTICATED" in codes.values():
                continue  # a Ray gRPC port, closed to this caller
            elif set(codes.values()) == {"UNIMPLEMENTED"}:
                # lookalike's own gRPC servers (router, shards): no Ray service there, and on loopback
                if not ip.removeprefix("::ffff:").startswith("127."):
                    bad.append(f"{name} {ip}:{p}: a non-Ray gRPC server beyond loopback")
            elif (status := _http_status(_dial(ip), p)) != 401:
                bad.append(f"{name} {ip}:{p}: neither closed gRPC nor HTTP 401 (HTTP {status}; gRPC {codes})")
        assert not bad, "\n".join(bad + ["all:"] + report)

        # one storage, one server: a second one is refused before it starts anything
        t = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "tools.cli", "serve", "--data", str(data), "--port",
                                 str(free_port()), "--shards", "1"], capture_output=True, text=True, env=env,
                                timeout=60)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"in use by pid {first.pid}" in second.stderr and "serving since" in second.stderr, second.stderr
        assert time.monotonic() - t < 30
        holder = json.loads((data / ".lock").read_text())
        assert holder["pid"] == first.pid

        # kill -9: the kernel drops the lock; a new server starts on the same storage and the same Ray token
        started += psutil.Process(first.pid).children(recursive=True)
        os.kill(first.pid, signal.SIGKILL)
        first.communicate(timeout=30)
        port = free_port()
        third = _serve(data, port, env)
        try:
            wait_for_serving(f"127.0.0.1:{port}", timeout=120)
        except TimeoutError:
            third.kill()
            raise AssertionError(third.communicate()[0][-3000:]) from None
        assert token.read_text() == secret
        started += psutil.Process(third.pid).children(recursive=True)

        # SIGTERM to the whole process group (Ray's GCS and raylet get it too): serve ends in seconds, exit 0
        t = time.monotonic()
        os.killpg(third.pid, signal.SIGTERM)
        try:
            out, _ = third.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("serve still running 10 s after SIGTERM to its process group")
        assert third.returncode == 0, out[-3000:]
        assert "lookalike stopped" in out
        assert time.monotonic() - t < 10
    finally:
        _stop([first, third], started)


def test_serve_names_tls_files_that_do_not_pair_and_refuses_ray_without_token_auth(tmp_path, capsys, monkeypatch):
    pytest.importorskip("cryptography")
    from tools.cli import main
    from lookalike.devcerts import write_pki

    good, other = write_pki(tmp_path, "good-"), write_pki(tmp_path, "other-")
    data = str(tmp_path / "d")
    tls = ["--tls-ca", good.ca]
    refusals = [
        # a certificate given as the key: the shards would crash-loop on "Failed to bind" and serve die after 180 s
        (["--tls-cert", good.cert, "--tls-key", good.cert, *tls],
         f"the TLS key {good.cert!r} holds no PEM private key (it holds a certificate"),
        (["--tls-cert", good.cert, "--tls-key", other.key, *tls],
         f"the TLS key {other.key!r} is not the key of the certificate {good.cert!r}"),
        (["--tls-cert", good.key, "--tls-key", good.key, *tls], f"the TLS certificate {good.key!r} holds no PEM"),
    ]
    cluster = ["--address", "127.0.0.1:6379", "--tls-cert", good.cert, "--tls-key", good.key, *tls]
    for mode in ("disabled", None):  # a Ray cluster started apart: its routers must have Ray's token auth on
        refusals.append((cluster, "Ray's token authentication must be on", mode))
    for flags, message, *mode in refusals:
        if mode and mode[0]:
            monkeypatch.setenv("RAY_AUTH_MODE", mode[0])
        elif mode:
            monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        t = time.monotonic()
        assert main(["serve", "--data", data, *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags
        assert time.monotonic() - t < 5
    assert not (tmp_path / "d").exists()  # refused before anything started


def test_data_dir_lock_and_ray_token_files(tmp_path):
    from lookalike.datadir import DataDirInUse, DataDirLock, embedded_ray_env
    from lookalike.errors import InvalidArgument

    with DataDirLock(tmp_path / "d"):
        with pytest.raises(DataDirInUse, match=f"in use by pid {os.getpid()} on host .*, serving since ") as err:
            DataDirLock(tmp_path / "d").acquire()  # a second open file: flock conflicts even within one process
        assert err.value.holder["pid"] == os.getpid()
    DataDirLock(tmp_path / "d").acquire().release()  # released: free again

    env = embedded_ray_env(tmp_path / "d")
    path = tmp_path / "d" / "ray-auth-token"
    assert env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path.resolve()), "RAY_AUTH_TOKEN": None,
                   "AUTOSCALER_METRIC_PORT": "-1", "RAY_enable_metrics_collection": "0"}
    assert path.stat().st_mode & 0o777 == 0o600 and len(path.read_text()) == 64
    assert embedded_ray_env(tmp_path / "d") == env and len(path.read_text()) == 64  # reused, not remade
    path.chmod(0o644)
    with pytest.raises(InvalidArgument, match="readable by others"):
        embedded_ray_env(tmp_path / "d")
    path.write_text("")
    path.chmod(0o600)
    with pytest.raises(InvalidArgument, match="empty"):
        embedded_ray_env(tmp_path / "d")


def test_once_connected_by_its_own_ray_init_no_ray_call_connects_the_process_again_by_itself():
    """Ray's auto-init runs ``ray.init()`` with no address on a Ray call made while not connected: it starts a
    local Ray or joins whatever instance the machine has. Serve's shutdown, after a stop signal to its process group
    took its GCS down, so joined another serve's Ray and aborted. After serve's (and a router's) own ``ray.init``,
    such a call fails instead."""
    code = ("import ray\nfrom control.ray_cluster import no_implicit_connect\nno_implicit_connect()\n"
            "try:\n    ray.put(1)\nexcept Exception as err:\n    print('refused:', type(err).__name__, err)\n"
            "else:\n    print('connected to', ray.get_runtime_context().gcs_address)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("refused:") and "not been started" in out.stdout, out.stdout + out.stderr[-2000:]
