"""The shard hop's own certificate (LOOKALIKE_INTERNAL_TLS_*): the router serves clients with the public
certificate and talks to the shards with the internal one, whose CA is another; a shard refuses a peer that holds
only the public certificate, so the public key need not be on the shards' nodes (docs/SECURITY.md)."""

import numpy as np
import pytest

from control.local import LocalCluster
from lookalike.client import Client
from lookalike.errors import InvalidArgument, Unavailable
from lookalike.security import TLSConfig, internal_tls_from_env
from protos import shard_pb2
from router.server import create_router_server
from router.shard_client import GrpcShardClient

pytest.importorskip("cryptography", reason="cryptography makes the test certificates (pip install -e '.[dev]')")

NAME = "lookalike-internal"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from lookalike.devcerts import write_pki

    d = tmp_path_factory.mktemp("pki")
    return {"public": write_pki(d, "public-"), "internal": write_pki(d, "internal-")}


def _env(cert: TLSConfig) -> dict[str, str]:
    return {"LOOKALIKE_INTERNAL_TLS_CERT": cert.cert, "LOOKALIKE_INTERNAL_TLS_KEY": cert.key,
            "LOOKALIKE_INTERNAL_TLS_CA": cert.ca}


def _stats(address: str, tls: TLSConfig) -> str:
    client = GrpcShardClient(address, tls)
    try:
        return client.call("Stats", shard_pb2.ShardStatsRequest(), 5).result().shard_id
    finally:
        client.close()


def test_router_and_shards_with_separate_public_and_internal_certificates(tmp_path, pki):
    public = TLSConfig(pki["public"].cert, pki["public"].key, pki["public"].ca, server_name=NAME)
    internal = public.internal(_env(pki["internal"]))
    assert (internal.cert, internal.key, internal.ca) == (pki["internal"].cert, pki["internal"].key,
                                                          pki["internal"].ca)
    assert internal.client_auth and internal.server_name == NAME
    # unset: today's behaviour, the public files on both hops
    assert public.internal({}) == TLSConfig(public.cert, public.key, public.ca, True, NAME)

    cluster = LocalCluster(tmp_path / "data", shards=2, tls=internal)
    server, port, _ = create_router_server(cluster.router, "127.0.0.1:0", tls=public)
    try:
        with Client(f"localhost:{port}", timeout=10, tls=TLSConfig(ca=public.ca)) as client:
            client.create_collection("t", 4, "l2", "Flat", buckets=8)
            vectors = np.eye(4, dtype=np.float32)
            client.upsert("t", ["a", "b", "c", "d"], vectors)
            assert [ids[0] for ids in client.search("t", vectors, k=1).ids] == ["a", "b", "c", "d"]
        addresses = [f"127.0.0.1:{p}" for _server, p, _s, _h in cluster.placer.servers.values()]
        assert len(addresses) == 2
        for address in addresses:
            assert _stats(address, internal)  # the router's way in
            # the router's public certificate alone (the old single-certificate setup) is refused by the shards
            with pytest.raises(Unavailable):
                _stats(address, public.internal({}))
            # and the shards present the internal certificate, which the public CA did not sign
            with pytest.raises(Unavailable):
                _stats(address, TLSConfig(internal.cert, internal.key, public.ca, server_name=NAME))
    finally:
        server.stop(None)
        cluster.close()


def test_internal_certificate_needs_all_three_files():
    assert internal_tls_from_env({}) is None
    with pytest.raises(InvalidArgument, match="LOOKALIKE_INTERNAL_TLS_KEY"):
        internal_tls_from_env({"LOOKALIKE_INTERNAL_TLS_CERT": "c", "LOOKALIKE_INTERNAL_TLS_CA": "a"})
    env = {"LOOKALIKE_INTERNAL_TLS_CERT": "c", "LOOKALIKE_INTERNAL_TLS_KEY": "k", "LOOKALIKE_INTERNAL_TLS_CA": "a",
           "LOOKALIKE_INTERNAL_TLS_SERVER_NAME": "shards"}
    assert internal_tls_from_env(env) == TLSConfig("c", "k", "a", True, "shards")
    assert TLSConfig("x", "y", "z", server_name="other").internal(env).server_name == "shards"


def test_serve_refuses_an_incomplete_or_unreadable_internal_certificate(tmp_path, pki, capsys, monkeypatch):
    from tools.cli import main

    public, internal = pki["public"], pki["internal"]
    data = tmp_path / "d"
    flags = ["serve", "--data", str(data), "--tls-cert", public.cert, "--tls-key", public.key, "--tls-ca", public.ca]
    monkeypatch.setenv("LOOKALIKE_INTERNAL_TLS_CERT", internal.cert)
    monkeypatch.setenv("LOOKALIKE_INTERNAL_TLS_CA", internal.ca)
    assert main(flags) == 2
    assert "LOOKALIKE_INTERNAL_TLS_KEY is not set" in capsys.readouterr().err
    monkeypatch.setenv("LOOKALIKE_INTERNAL_TLS_KEY", str(tmp_path / "missing.key"))
    assert main(flags) == 2
    assert "cannot read the TLS key" in capsys.readouterr().err
    assert not data.exists()  # refused before anything started
