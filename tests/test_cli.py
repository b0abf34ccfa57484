"""`lookalike serve` as a person runs it (embedded local Ray, its own process), driven by the CLI."""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import exact_knn, make_data

pytestmark = pytest.mark.slow


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, target):
    out = subprocess.run([sys.executable, "-m", "lookalike.cli", *args, "--target", target],
                         capture_output=True, text=True, timeout=120)
    return out


def test_serve_and_cli_end_to_end(tmp_path):
    from lookalike.net import wait_for_serving

    port = _free_port()
    target = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "lookalike.cli", "serve", "--data", str(tmp_path / "data"),
                             "--port", str(port), "--host", "127.0.0.1", "--shards", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_for_serving(target, timeout=120)
        xb, xq = make_data("l2", 3000, 16)
        np.save(tmp_path / "xb.npy", xb)
        np.save(tmp_path / "xq.npy", xq[:3])
        (tmp_path / "ids.txt").write_text("\n".join(f"img-{i}" for i in range(3000)) + "\n")
        (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"uri": f"/img/{i}.jpg"}) for i in range(3000)))
        assert _cli("collection", "create", "cats", "--dim", "16", "--metric", "l2", "--index", "Flat",
                    target=target).returncode == 0
        up = _cli("upsert", "cats", str(tmp_path / "xb.npy"), "--ids", str(tmp_path / "ids.txt"), "--payload",
                  str(tmp_path / "p.jsonl"), target=target)
        assert up.returncode == 0 and "upserted 3000" in up.stdout, up.stderr
        res = _cli("search", "cats", str(tmp_path / "xq.npy"), "-k", "4", "--json", "--payloads", target=target)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        _, I = exact_knn("l2", xb, xq[:3], 4)
        assert [r["ids"] for r in out["results"]] == [[f"img-{i}" for i in row] for row in I]
        assert out["results"][0]["payloads"][0] == {"uri": f"/img/{I[0][0]}.jpg"}
        st = json.loads(_cli("status", "--json", target=target).stdout)
        assert sum(int(s["vectors"]) for s in st["shards"]) == 3000
        assert "cats" in _cli("collection", "list", target=target).stdout
        bad = _cli("collection", "create", "cats", "--dim", "16", target=target)
        assert bad.returncode == 1 and "ALREADY_EXISTS" in bad.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    assert "lookalike stopped" in out
