"""`lookalike backup` and `lookalike restore`: a restore drill on real local clusters (shards and a router behind
gRPC), from one cluster into a fresh one with another shard count, and a damaged backup refused with a sentence."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from conftest import served_local_cluster
from lookalike.ids import buckets_of
from tools import cli
from tools.cli import build_parser
from tools.cli.flags import connection_defaults


def _run(capsys, *argv) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def _items(n: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = [f"item-{i}" if i % 7 else f"é-{i}/ü" for i in range(n)]
    x = rng.standard_normal((n, dim)).astype(np.float32)
    payloads = [{"uri": f"s3://b/{i}.jpg", "tag": str(i % 5)} if i % 3 else {} for i in range(n)]
    return ids, x, payloads


def test_backup_then_restore_into_a_fresh_cluster_gives_every_acknowledged_item_back(tmp_path, capsys):
    n, dim = 3000, 24
    ids, x, payloads = _items(n, dim, seed=1)
    backup = tmp_path / "backup"
    with served_local_cluster(tmp_path / "a", shards=3) as (_cluster, client):
        client.create_collection("items", dim=dim, metric="l2", index="Flat", buckets=32, replication=2,
                                 nprobe=3, ef_search=40)
        assert client.upsert("items", ids[:2000], x[:2000], payloads[:2000]) == 2000
        assert client.upsert("items", ids[2000:], x[2000:], payloads[2000:]) == n - 2000
        client.upsert("items", ids[:10], x[10:20], [{"replaced": "yes"}] * 10)  # replaced: the new value counts
        x[:10], payloads[:10] = x[10:20], [{"replaced": "yes"}] * 10
        client.delete("items", ids[-5:])  # deleted before the backup: not in it
        kept = n - 5
        spec = client.describe_collection("items").spec
        target = client.target
        status, out, err = _run(capsys, "backup", "items", str(backup), "--target", target, "--page", "37",
                                "--chunk-items", "500", "--quiet")
        assert status == 0, err
        assert f"backed up {kept} items of items" in out
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["items"] == kept and len(manifest["chunks"]) > 3
    assert sorted(b for ch in manifest["chunks"] for b in ch["buckets"]) == list(range(32))

    with served_local_cluster(tmp_path / "b", shards=2) as (_cluster, client):
        status, out, err = _run(capsys, "restore", str(backup), "--target", client.target, "--batch", "333",
                                "--quiet")
        assert status == 0, err
        assert f"restored {kept} items of items" in out
        assert client.describe_collection("items").spec == spec  # dim, metric, index, buckets, replication, ...
        got_ids, got_x, got_payloads = client.get("items", ids, include_vectors=True)
        assert got_ids == ids[:kept]
        np.testing.assert_array_equal(got_x, x[:kept])
        assert got_payloads == payloads[:kept]
        assert client.get("items", ids[kept:])[0] == []
        # Run again (an interrupted restore goes on): it skips the chunks done and changes nothing.
        status, out, err = _run(capsys, "restore", str(backup), "--target", client.target, "--quiet")
        assert status == 0, err
        assert client.describe_collection("items").count == kept


def test_a_damaged_or_unfinished_backup_is_refused_with_a_sentence(tmp_path, capsys):
    ids, x, payloads = _items(400, 8, seed=2)
    backup = tmp_path / "backup"
    with served_local_cluster(tmp_path / "a", shards=2) as (_cluster, client):
        client.create_collection("small", dim=8, buckets=8)
        client.upsert("small", ids, x, payloads)
        status, _, err = _run(capsys, "backup", "small", str(backup), "--target", client.target, "--quiet",
                              "--chunk-items", "100")
        assert status == 0, err
        status, _, err = _run(capsys, "backup", "small", str(backup), "--target", client.target, "--quiet")
        assert status == 2 and "holds a finished backup of 'small'" in err
        for kwargs, code, words in [({"buckets": [1, 1]}, grpc.StatusCode.INVALID_ARGUMENT, "each at most once"),
                                    ({"buckets": [8]}, grpc.StatusCode.INVALID_ARGUMENT, "from 0 to 7"),
                                    ({"page": 10001}, grpc.StatusCode.INVALID_ARGUMENT, "page must be"),
                                    ({"collection": "nope"}, grpc.StatusCode.NOT_FOUND, "nope")]:
            with pytest.raises(grpc.RpcError) as e:
                list(client.export(**{"collection": "small", **kwargs}))
            assert e.value.code() == code and words in e.value.details(), e.value.details()

        chunk = sorted(backup.glob("chunk-*.npy"))[1]
        data = bytearray(chunk.read_bytes())
        data[-3] ^= 0x40  # one bit of one vector
        chunk.write_bytes(bytes(data))
        status, _, err = _run(capsys, "restore", str(backup), "--name", "again", "--target", client.target,
                              "--quiet")
        assert status == 2, err
        assert err.strip() == (f"error: backup {backup} is damaged: {chunk.name} does not match its SHA-256 in "
                               "manifest.json (changed or corrupted since the backup)")
        assert "again" not in [c.spec.name for c in client.list_collections()]  # checked before anything is made

        manifest = json.loads((backup / "manifest.json").read_text())
        manifest["finished"] = None
        (backup / "manifest.json").write_text(json.dumps(manifest))
        status, _, err = _run(capsys, "restore", str(backup), "--target", client.target, "--quiet")
        assert status == 2 and "unfinished backup of 'small'" in err


@pytest.mark.parametrize("metric,dim", [("hamming", 64), ("cosine", 12)])
def test_backup_keeps_binary_codes_and_cosine_vectors(tmp_path, capsys, metric, dim):
    rng = np.random.default_rng(3)
    n = 300
    ids = [str(i) for i in range(n)]
    x = (rng.integers(0, 256, (n, dim // 8), dtype=np.uint8) if metric == "hamming"
         else rng.standard_normal((n, dim)).astype(np.float32))
    with served_local_cluster(tmp_path / "a", shards=2) as (_cluster, client):
        client.create_collection("c", dim=dim, metric=metric, index="BFlat" if metric == "hamming" else "Flat",
                                 buckets=4)
        client.upsert("c", ids, x)
        before = client.get("c", ids, include_vectors=True)[1]
        status, _, err = _run(capsys, "backup", "c", str(tmp_path / "bk"), "--target", client.target, "--quiet")
        assert status == 0, err
        status, _, err = _run(capsys, "restore", str(tmp_path / "bk"), "--name", "c2", "--target", client.target,
                              "--quiet")
        assert status == 0, err
        after = client.get("c2", ids, include_vectors=True)[1]
        assert client.describe_collection("c2").spec.metric == client.describe_collection("c").spec.metric
    if metric == "hamming":
        np.testing.assert_array_equal(after, before)
    else:  # the stored vectors are normalised; the restore's upsert normalises them again: a float32 rounding
        np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)


def test_every_item_acknowledged_before_the_backup_is_in_it_while_writes_and_moves_go_on(tmp_path):
    """The backup runs while buckets move onto an added shard and new writes, replacements of other items and
    deletions of others land: every item acknowledged before it started, and left alone since, is in it with its
    vector and payload, once."""
    import threading

    from tools.cli import backup as backup_cli

    n, dim = 2400, 8
    ids, x, payloads = _items(n, dim, seed=4)
    kept = ids[:1600]  # the rest are replaced or deleted while the backup runs
    with served_local_cluster(tmp_path / "a", shards=2) as (cluster, client):
        client.create_collection("live", dim=dim, buckets=16)
        client.upsert("live", ids, x, payloads)
        parser = build_parser()
        args = parser.parse_args(["backup", "live", str(tmp_path / "bk"), "--target", client.target, "--page", "7",
                                  "--chunk-items", "300", "--quiet"])
        connection_defaults(parser, args)
        result = {}
        worker = threading.Thread(target=lambda: result.update(status=backup_cli.cmd_backup(args)))
        worker.start()
        client.rebalance("live", add_shards=1)
        rng = np.random.default_rng(5)
        for i in range(1600, n, 100):
            client.upsert("live", ids[i:i + 50], rng.standard_normal((50, dim)).astype(np.float32))
            client.delete("live", ids[i + 50:i + 100])
            client.upsert("live", [f"new-{i}-{j}" for j in range(20)], rng.standard_normal((20, dim)).astype(
                np.float32))
        worker.join(timeout=300)
        assert result.get("status") == 0
        assert cluster.controller.wait_moves(120)
    rows = [json.loads(line) for f in sorted((tmp_path / "bk").glob("chunk-*.jsonl"))
            for line in f.read_text("utf-8").splitlines()]
    vectors = np.concatenate([np.load(f) for f in sorted((tmp_path / "bk").glob("chunk-*.npy"))])
    got = [r["id"] for r in rows]
    assert len(got) == len(set(got)), "an item was backed up twice"
    where = {u: i for i, u in enumerate(got)}
    missing = [u for u in kept if u not in where]
    assert not missing, f"{len(missing)} acknowledged items are not in the backup: {missing[:5]}"
    rows_of = np.array([where[u] for u in kept])
    np.testing.assert_array_equal(vectors[rows_of], x[:1600])
    assert [rows[i]["payload"] for i in rows_of] == payloads[:1600]


def test_an_interrupted_backup_or_restore_goes_on_where_it_stopped(tmp_path, capsys, monkeypatch):
    from tools.cli import backup as backup_cli

    ids, x, payloads = _items(900, 8, seed=6)
    bk = tmp_path / "bk"
    calls = {"save": 0, "load": 0}
    save, load = backup_cli._save_chunk, backup_cli._chunk

    def save_then_stop(*a, **kw):
        calls["save"] += 1
        if calls["save"] == 3:
            raise KeyboardInterrupt
        return save(*a, **kw)

    def load_then_stop(*a, **kw):
        calls["load"] += 1
        if calls["load"] == 2:
            raise KeyboardInterrupt
        return load(*a, **kw)

    with served_local_cluster(tmp_path / "a", shards=2) as (_cluster, client):
        client.create_collection("r", dim=8, buckets=12)
        client.upsert("r", ids, x, payloads)
        client.create_collection("empty", dim=8, buckets=4)
        argv = ["backup", "r", str(bk), "--target", client.target, "--chunk-items", "100", "--quiet"]
        monkeypatch.setattr(backup_cli, "_save_chunk", save_then_stop)
        status, _, err = _run(capsys, *argv)
        assert status == 130 and "2 chunk(s) written; run the same command again" in err
        monkeypatch.setattr(backup_cli, "_save_chunk", save)
        status, out, err = _run(capsys, *argv)
        assert status == 0 and "backed up 900 items of r" in out, err
        manifest = json.loads((bk / "manifest.json").read_text())
        assert sorted(b for ch in manifest["chunks"] for b in ch["buckets"]) == list(range(12))

        argv = ["restore", str(bk), "--name", "r2", "--target", client.target, "--quiet"]
        monkeypatch.setattr(backup_cli, "_chunk", load_then_stop)
        status, _, err = _run(capsys, *argv)
        assert status == 130 and "1 of" in err and "run the same command again" in err
        monkeypatch.setattr(backup_cli, "_chunk", load)
        loaded = []
        monkeypatch.setattr(backup_cli, "_chunk", lambda out, chunk, spec: loaded.append(chunk["name"]) or
                            load(out, chunk, spec))
        status, out, err = _run(capsys, *argv)
        assert status == 0 and "restored 900 items of r" in out, err
        assert manifest["chunks"][0]["name"] not in loaded and len(loaded) == len(manifest["chunks"]) - 1
        got = client.get("r2", ids, include_vectors=True)
        assert got[0] == ids and got[2] == payloads
        np.testing.assert_array_equal(got[1], x)

        status, out, err = _run(capsys, "backup", "empty", str(tmp_path / "e"), "--target", client.target, "--quiet")
        assert status == 0 and "backed up 0 items of empty" in out, err
        status, out, err = _run(capsys, "restore", str(tmp_path / "e"), "--name", "empty2", "--target", client.target,
                                "--quiet")
        assert status == 0, err
        assert client.describe_collection("empty2").count == 0


def test_pages_are_cut_by_bytes_as_well_as_by_count(tmp_path, monkeypatch):
    """Large items make shorter pages (a page stays under the message limit), and the bucket is still read whole."""
    from shard import reads

    monkeypatch.setattr(reads, "PAGE_BYTES", 3000)  # about 10 items of 64-d with their payloads
    ids, x, payloads = _items(500, 64, seed=7)
    with served_local_cluster(tmp_path / "a", shards=2) as (_cluster, client):
        client.create_collection("big", dim=64, buckets=2, replication=2)
        client.upsert("big", ids, x, payloads)
        pages = list(client.export("big", page=100))
    assert max(len(p[0]) for p in pages) < 15 and len(pages) > 40
    got = [u for p in pages for u in p[0]]
    assert sorted(got) == sorted(ids) and len(got) == len(ids)
    home = buckets_of(got, 2).tolist()
    assert home == sorted(home)  # bucket after bucket, each in id order
    assert all(got[i] < got[i + 1] for i in range(len(got) - 1) if home[i] == home[i + 1])
    by_id = dict(zip(ids, range(len(ids))))
    rows = np.concatenate([p[1] for p in pages])
    np.testing.assert_array_equal(rows, x[[by_id[u] for u in got]])
