"""TLS on both hops (client -> router, router -> shard), mutual TLS, bearer tokens with scopes, request rates,
and the secrets' files: who gets in, who does not, and with which status."""

import json
import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import free_port
from lookalike.errors import InvalidArgument, Unavailable
from control.local import LocalCluster
from lookalike.security import AuthInterceptor, TLSConfig, TokenTable, new_token, token_hash

pytest.importorskip("cryptography", reason="cryptography makes the test certificates (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from lookalike.devcerts import write_pki

    d = tmp_path_factory.mktemp("pki")
    return {"good": write_pki(d, "good-"), "rogue": write_pki(d, "rogue-")}


def _serve(tmp_path, **kw):
    from router.server import create_router_server

    cl = LocalCluster(tmp_path / "data", shards=2)
    server, port, _ = create_router_server(cl.router, "127.0.0.1:0", **kw)
    cl.server, cl.port = server, port
    return cl


def _stop(cl):
    cl.server.stop(None)
    cl.close()


def _refused(fn, code):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    assert err.value.code() == code, (err.value.code(), err.value.details())
    return err.value


def _client(port, **kw):
    from lookalike.client import Client

    return Client(f"localhost:{port}", timeout=10, **kw)


# --- TLS: client -> router --------------------------------------------------------------------------------------
def test_tls_router_refuses_plaintext_and_unknown_cas(tmp_path, pki):
    good, rogue = pki["good"], pki["rogue"]
    cl = _serve(tmp_path, tls=TLSConfig(good.cert, good.key))
    try:
        with _client(cl.port) as c:  # plaintext to a TLS port
            _refused(c.list_collections, grpc.StatusCode.UNAVAILABLE)
        with _client(cl.port, tls=TLSConfig(ca=rogue.ca)) as c:  # a server this CA did not sign
            _refused(c.list_collections, grpc.StatusCode.UNAVAILABLE)
        with _client(cl.port, tls=TLSConfig(ca=good.ca)) as c:
            c.create_collection("t", 4, "l2", "Flat", buckets=8)
            c.upsert("t", ["a", "b"], np.eye(2, 4, dtype=np.float32))
            assert c.search("t", np.eye(1, 4, dtype=np.float32), k=1).ids[0] == ["a"]
    finally:
        _stop(cl)


def test_mutual_tls_needs_a_client_certificate_the_ca_signed(tmp_path, pki):
    good, rogue = pki["good"], pki["rogue"]
    cl = _serve(tmp_path, tls=TLSConfig(good.cert, good.key, good.ca, client_auth=True))
    try:
        with _client(cl.port, tls=TLSConfig(ca=good.ca)) as c:  # no client certificate
            _refused(c.list_collections, grpc.StatusCode.UNAVAILABLE)
        with _client(cl.port, tls=TLSConfig(rogue.cert, rogue.key, good.ca)) as c:  # signed by another CA
            _refused(c.list_collections, grpc.StatusCode.UNAVAILABLE)
        with _client(cl.port, tls=good) as c:
            assert c.list_collections() == []
    finally:
        _stop(cl)


def test_tls_files_errors_are_clear(tmp_path, pki):
    with pytest.raises(InvalidArgument, match="cannot read the TLS key"):
        TLSConfig(pki["good"].cert, str(tmp_path / "missing.key")).server_credentials()
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(InvalidArgument, match="not a PEM file"):
        TLSConfig(ca=str(tmp_path / "junk.pem")).channel_credentials()
    with pytest.raises(InvalidArgument, match="needs a certificate, its key and the CA"):
        TLSConfig(pki["good"].cert, pki["good"].key).internal()
    assert TLSConfig.from_env({}) is None
    env = {"LOOKALIKE_TLS_CERT": "c", "LOOKALIKE_TLS_KEY": "k", "LOOKALIKE_TLS_CA": "a",
           "LOOKALIKE_TLS_CLIENT_AUTH": "true"}
    assert TLSConfig.from_env(env) == TLSConfig("c", "k", "a", True)


# --- TLS: router -> shard (mutual) ------------------------------------------------------------------------------
def test_shard_hop_is_mutual_tls(tmp_path, pki):
    from router.shard_client import GrpcShardClient
    from shard.shard import Shard
    from shard.server import create_shard_server
    from protos import shard_pb2

    good, rogue = pki["good"], pki["rogue"]
    internal = TLSConfig(good.cert, good.key, good.ca, server_name="lookalike-internal").internal()
    shard = Shard("s0", str(tmp_path / "shard"))
    shard.serving = True
    server, port, _, _ = create_shard_server(shard, "127.0.0.1:0", tls=internal)
    try:
        addr = f"127.0.0.1:{port}"
        callers = {"plaintext": None, "no client certificate": TLSConfig(ca=good.ca, server_name="lookalike-internal"),
                   "another CA's certificate": TLSConfig(rogue.cert, rogue.key, good.ca,
                                                         server_name="lookalike-internal")}
        for what, tls in callers.items():
            c = GrpcShardClient(addr, tls)
            with pytest.raises(Unavailable):
                c.call("Stats", shard_pb2.ShardStatsRequest(), 5).result()
            c.close()
        c = GrpcShardClient(addr, internal)
        assert c.call("Stats", shard_pb2.ShardStatsRequest(), 5).result().shard_id == "s0"
        c.close()
    finally:
        server.stop(None)
        shard.close()


# --- tokens and scopes ------------------------------------------------------------------------------------------
@pytest.fixture
def tokens(tmp_path):
    toks = {s: new_token() for s in ("read", "write", "admin", "slow")}
    entries = [{"name": f"{s}-svc", "scopes": [s if s != "slow" else "read"], "sha256": token_hash(t)[7:]}
               for s, t in toks.items()]
    entries[-1].update(rate=2, burst=2)
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": entries}))
    return path, toks


def test_tokens_and_scopes(tmp_path, tokens):
    path, toks = tokens
    table = TokenTable(str(path), check_every_s=0.0)
    cl = _serve(tmp_path, auth=AuthInterceptor(table))
    try:
        with _client(cl.port) as c:
            e = _refused(c.list_collections, grpc.StatusCode.UNAUTHENTICATED)
            assert "bearer token" in e.details()
            # streams are refused the same way (and do not hang)
            _refused(lambda: c.upsert_stream("t", iter([(["a"], np.ones((1, 4), np.float32), None)])),
                     grpc.StatusCode.UNAUTHENTICATED)
            _refused(lambda: list(c.dedup_groups("nope")), grpc.StatusCode.UNAUTHENTICATED)
            # health and reflection need no token: Kubernetes' probes and grpcurl
            with grpc.insecure_channel(f"127.0.0.1:{cl.port}") as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
                from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

                stub = reflection_pb2_grpc.ServerReflectionStub(ch)
                answers = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                    list_services="")]), timeout=5))
                assert "lookalike.v1.Lookalike" in {s.name for s in answers[0].list_services_response.service}
        with _client(cl.port, token="lk_not-a-real-token") as c:
            assert "not valid" in _refused(c.list_collections, grpc.StatusCode.UNAUTHENTICATED).details()
        with _client(cl.port, token=toks["admin"]) as c:
            c.create_collection("t", 4, "l2", "Flat", buckets=8)
        with _client(cl.port, token=toks["write"]) as c:
            c.upsert("t", ["a", "b"], np.eye(2, 4, dtype=np.float32))
            _refused(lambda: c.search("t", np.eye(1, 4, dtype=np.float32), k=1), grpc.StatusCode.PERMISSION_DENIED)
        with _client(cl.port, token=toks["read"]) as c:
            assert c.search("t", np.eye(1, 4, dtype=np.float32), k=1).ids[0] == ["a"]
            e = _refused(lambda: c.upsert("t", ["c"], np.ones((1, 4), np.float32)), grpc.StatusCode.PERMISSION_DENIED)
            assert "read-svc" in e.details() and "'write'" in e.details() and toks["read"] not in e.details()
            _refused(lambda: c.drop_collection("t"), grpc.StatusCode.PERMISSION_DENIED)
            _refused(lambda: c.start_dedup("t", 0.1), grpc.StatusCode.PERMISSION_DENIED)
            _refused(lambda: list(c.export("t")), grpc.StatusCode.PERMISSION_DENIED)  # a backup: the whole catalog
            # revoked: the table follows its file
            doc = json.loads(path.read_text())
            doc["tokens"] = [t for t in doc["tokens"] if t["name"] != "read-svc"]
            path.write_text(json.dumps(doc))
            _refused(c.list_collections, grpc.StatusCode.UNAUTHENTICATED)
        with _client(cl.port, token=toks["admin"]) as c:  # admin holds every scope
            assert c.get("t", ["a"])[0] == ["a"]
            assert sorted(u for ids, _, _ in c.export("t") for u in ids) == ["a", "b"]
            c.drop_collection("t")
    finally:
        _stop(cl)


def test_rate_limit_answers_resource_exhausted_with_a_retry_hint(tmp_path, tokens):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    path, toks = tokens
    cl = _serve(tmp_path, auth=AuthInterceptor(TokenTable(str(path)), rate=1000))
    try:
        with _client(cl.port, token=toks["slow"]) as c:  # 2 requests/s, 2 at once
            c.list_collections()
            c.list_collections()
            err = _refused(c.list_collections, grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "slow-svc" in err.details() and "retry in" in err.details()
            trailers = dict(err.trailing_metadata())
            assert 1 <= int(trailers["retry-after-ms"]) <= 500
            st = rpc_status.from_call(err)
            info = error_details_pb2.RetryInfo()
            assert st.details[0].Unpack(info) and 0 < info.retry_delay.ToNanoseconds() <= 5e8
            time.sleep(int(trailers["retry-after-ms"]) / 1000 + 0.05)
            c.list_collections()  # after the hinted wait it goes through
        with _client(cl.port, token=toks["read"]) as c:  # another token has its own budget (the default 1000/s)
            for _ in range(5):
                c.list_collections()
    finally:
        _stop(cl)


def test_every_public_method_has_a_scope():
    from lookalike import security
    from protos import lookalike_pb2

    service = lookalike_pb2.DESCRIPTOR.services_by_name["Lookalike"]
    assert f"/{service.full_name}/" == security._PUBLIC_PREFIX
    assert set(security.METHOD_SCOPES) == {m.name for m in service.methods}


def test_tokens_file_errors_and_hashes_only(tmp_path):
    bad = tmp_path / "bad.json"
    for text, msg in [("{", "not JSON"), ('{"tokens": [{"name": "x", "scopes": ["read"], "sha256": "12"}]}', "64 hex"),
                      ('{"tokens": [{"name": "x", "scopes": ["root"], "sha256": "' + "a" * 64 + '"}]}', "scopes")]:
        bad.write_text(text)
        with pytest.raises(InvalidArgument, match=msg):
            TokenTable(str(bad))
    with pytest.raises(InvalidArgument, match="cannot read the tokens file"):
        TokenTable(str(tmp_path / "missing.json"))


def test_token_cli_writes_hashes_and_private_files(tmp_path, capsys):
    from tools.cli import main

    toks, out = tmp_path / "tokens.json", tmp_path / "ingest.token"
    assert main(["token", "create", "ingest", "--scopes", "write,read", "--rate", "50", "--tokens", str(toks),
                 "--out", str(out)]) == 0
    token = out.read_text().strip()
    assert token.startswith("lk_") and token not in toks.read_text() and token not in capsys.readouterr().out
    assert oct(out.stat().st_mode & 0o777) == "0o600" and oct(toks.stat().st_mode & 0o777) == "0o600"
    found = TokenTable(str(toks)).lookup(token)
    assert found.name == "ingest" and found.scopes == {"read", "write"} and found.rate == 50
    assert main(["token", "create", "ingest", "--scopes", "read", "--tokens", str(toks)]) == 1  # taken
    assert main(["token", "create", "x", "--scopes", "root", "--tokens", str(toks)]) == 2
    assert main(["token", "list", "--tokens", str(toks)]) == 0
    assert "ingest\tread,write" in capsys.readouterr().out
    assert main(["token", "revoke", "ingest", "--tokens", str(toks)]) == 0
    assert TokenTable(str(toks)).lookup(token) is None


def test_client_refuses_to_send_a_token_in_plaintext_beyond_loopback():
    from lookalike.client import Client

    with pytest.raises(ValueError, match="plaintext"):
        Client("10.1.2.3:50051", token="lk_x")


def test_serve_refuses_plaintext_beyond_loopback_and_bad_tls_flags(tmp_path, pki, capsys):
    from tools.cli import main

    data = str(tmp_path / "d")
    refusals = [(["--host", "0.0.0.0"], "refusing to serve plaintext on 0.0.0.0"),
                (["--address", "ray://10.0.0.1:10001"], "in a Ray cluster"),
                (["--tls-client-auth"], "--tls-client-auth needs TLS"),
                # TLS needs the CA too: the shards' hop is mutual TLS
                (["--tls-cert", pki["good"].cert, "--tls-key", pki["good"].key], "needs a certificate, its key and the CA")]
    for flags, message in refusals:
        assert main(["serve", "--data", data, *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags
    assert not (tmp_path / "d").exists()  # refused before anything started


# --- the whole thing: serve with TLS everywhere and tokens, driven by the CLI ----------------------------------
@pytest.mark.slow
def test_serve_with_tls_on_every_hop_and_tokens(tmp_path, pki):
    """`lookalike serve` with TLS (clients) and mutual TLS (its shards, Ray actors), a tokens file; the CLI with a
    token file; no token or secret in the server's output."""
    from lookalike.net import wait_for_serving

    good = pki["good"]
    toks = tmp_path / "tokens.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "LOOKALIKE_TOKENS_FILE": str(toks),
           "LOOKALIKE_TLS_CERT": good.cert, "LOOKALIKE_TLS_KEY": good.key, "LOOKALIKE_TLS_CA": good.ca}
    run = lambda *a, e=env: subprocess.run([sys.executable, "-m", "tools.cli", *a], capture_output=True,  # noqa
                                           text=True, timeout=120, env=e)
    assert run("token", "create", "ops", "--scopes", "admin", "--out", str(tmp_path / "ops.token")).returncode == 0
    port = free_port()
    target = f"localhost:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve", "--data", str(tmp_path / "data"),
                             "--port", str(port), "--shards", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_for_serving(target, timeout=120, tls=TLSConfig(ca=good.ca))
        client_env = {k: v for k, v in env.items() if not k.startswith("LOOKALIKE_")}
        flags = ["--target", target, "--tls-ca", good.ca]
        np.save(tmp_path / "xb.npy", np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32))
        ok = run("collection", "create", "c", "--dim", "8", *flags, "--token-file", str(tmp_path / "ops.token"),
                 e=client_env)
        assert ok.returncode == 0, ok.stderr
        up = run("upsert", "c", str(tmp_path / "xb.npy"), "--quiet", *flags, e={
            **client_env, "LOOKALIKE_TOKEN": (tmp_path / "ops.token").read_text().strip()})
        assert up.returncode == 0 and "upserted 200" in up.stdout, up.stderr  # through the shards' mutual TLS
        no = run("collection", "list", *flags, e=client_env)
        assert no.returncode == 1 and "UNAUTHENTICATED" in no.stderr
        plain = run("collection", "list", "--target", target, e=client_env)
        assert plain.returncode == 1 and "it speaks TLS and this client plaintext" in plain.stderr, plain.stderr
    finally:
        proc.send_signal(2)
        out = proc.communicate(timeout=60)[0]
    assert "TLS" in out and (tmp_path / "ops.token").read_text().strip() not in out
    assert proc.returncode == 0, out[-3000:]
