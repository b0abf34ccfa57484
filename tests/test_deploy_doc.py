"""docs/DEPLOY.md's commands work as written against what the manifests deploy: a router with TLS and bearer tokens.

Every ```` ```bash ```` block of the runbook runs here, in order, in one scratch directory, as an operator's shell on
a workstation would: the certificate recipe (openssl), the tokens (`lookalike token create`), the checks (grpcurl
with the CA and the token, the CLI with LOOKALIKE_TLS_CA and LOOKALIKE_TOKEN_FILE) and the first load. The router
they talk to is a `lookalike serve` started here the way k8s/base/router.yaml starts it: the public certificate, key
and CA the recipe made (LOOKALIKE_TLS_*), the internal certificate's files of the internal recipe for the hop to
the shards (LOOKALIKE_INTERNAL_TLS_*, with router.yaml's server name), the tokens file, a plaintext health port. Only the address is replaced: ``localhost:50051`` (the port-forward of the router's port) by the router's.
Blocks marked ```` ```bash cluster ```` need a real
Kubernetes cluster (helm, kubectl) and are not run; the test keeps them few and keeps kubectl and helm out of the
others. Each block starts with the ``export`` lines of the blocks before it (an operator's shell keeps them).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import yaml

from conftest import cli_shim, free_port, make_data, stop_serve

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "DEPLOY.md"
N, DIM = 2000, 128


def doc_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced code block, in order."""
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(r"^ *```([^\n`]*)\n(.*?)^ *```", text, re.S | re.M)]


def _dedent(body: str) -> str:
    lines = body.splitlines()
    indent = min((len(line) - len(line.lstrip()) for line in lines if line.strip()), default=0)
    return "\n".join(line[indent:] for line in lines) + "\n"


def runnable_blocks() -> list[str]:
    return [_dedent(body) for info, body in doc_blocks(DOC.read_text()) if info in ("bash", "sh")]


def test_the_runbook_marks_what_needs_a_cluster_and_runs_the_rest():
    blocks = doc_blocks(DOC.read_text())
    cluster = [body for info, body in blocks if info.endswith(" cluster")]
    runnable = runnable_blocks()
    assert len(runnable) >= 5 and 3 <= len(cluster) <= 10, (len(runnable), len(cluster))
    for body in runnable:
        for line in body.splitlines():
            assert not re.match(r"\s*(kubectl|helm|docker)\b", line), f"needs a cluster, not marked: {line}"
    for info, _ in blocks:
        assert info.split()[0] in ("bash", "yaml", "python", "sh"), info
    for heading in ("## Network and pod security", "## Storage, sizing, backup and restore"):
        assert f"\n{heading}\n" in DOC.read_text(), heading


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=sysconfig.get_path("scripts"))
    if found is None:
        pytest.skip(f"{name} is not installed: the runbook's commands need it")
    return found


def _write_inputs(work: pathlib.Path) -> None:
    """The files the first load names: vectors.npy, ids.txt, payloads.jsonl, queries.npy."""
    xb, xq = make_data("l2", N, DIM, seed=4, nq=3)
    np.save(work / "vectors.npy", xb)
    np.save(work / "queries.npy", xq)
    (work / "ids.txt").write_text("\n".join(f"sku-{i}" for i in range(N)) + "\n")
    (work / "payloads.jsonl").write_text("\n".join(json.dumps({"sku": f"sku-{i}"}) for i in range(N)) + "\n")


def _run(block: str, exports: list[str], env: dict, work: pathlib.Path) -> subprocess.CompletedProcess:
    script = "set -euo pipefail\n" + "".join(f"{e}\n" for e in exports) + block
    return subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600)


def test_runbook_commands_run_against_a_router_with_tls_and_tokens(tmp_path):
    grpcurl = _tool("grpcurl")
    _tool("openssl")
    work = tmp_path / "ops"
    work.mkdir()
    cli_shim(tmp_path / "bin")
    env = {**os.environ, "PATH": os.pathsep.join([str(tmp_path / "bin"), str(pathlib.Path(grpcurl).parent),
                                                  os.environ["PATH"]])}
    for name in [k for k in env if k.startswith("LOOKALIKE_")]:
        del env[name]
    blocks = runnable_blocks()
    port, health_port = free_port(), free_port()
    exports: list[str] = []
    outputs: list[str] = []
    proc = None
    try:
        for i, block in enumerate(blocks):
            if proc is None and "openssl" not in block and "token create" not in block:
                # the certificate and the tokens exist: start the router as router.yaml does, with them
                assert (work / "tls.crt").exists() and (work / "tokens.json").exists(), "the recipe ran first"
                _write_inputs(work)
                proc = _serve(work, port, health_port, env)
            block = block.replace("localhost:50051", f"localhost:{port}")
            res = _run(block, exports, env, work)
            out = res.stdout + res.stderr
            assert res.returncode == 0 and "Traceback" not in out, f"block {i}:\n{block}\n{out[-4000:]}"
            outputs.append(res.stdout)
            exports += [line for line in block.splitlines() if line.startswith("export ")]
        text = "\n".join(outputs)
        assert text.count('"status": "SERVING"') >= 2, text
        assert "lookalike.v1.Lookalike" in text and "grpc.health.v1.Health" in text
        assert '"shards"' in text  # ClusterStatus over TLS with the token
        assert "upserted 2000" in text
        assert "sku-" in text  # the search's answers
    finally:
        if proc is not None:
            out = stop_serve(proc)
            assert proc.returncode == 0, out[-3000:]


def _router_env() -> dict[str, str]:
    """The LOOKALIKE_* variables with a literal value of k8s/base/router.yaml's router container, but the
    ConfigMap's (serve's flags, which the command line below gives) and Ray's."""
    docs = [d for d in yaml.safe_load_all((REPO / "k8s" / "base" / "router.yaml").read_text()) if d]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    router = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "router")
    return {e["name"]: e["value"] for e in router.get("env", [])
            if e["name"].startswith("LOOKALIKE_") and "value" in e and "RAY" not in e["name"]}


def _serve(work: pathlib.Path, port: int, health_port: int, env: dict) -> subprocess.Popen:
    """`lookalike serve` with what k8s/base/router.yaml gives the router: the public TLS files, the internal
    certificate's (the Secret lookalike-internal-tls maps the recipe's internal.crt, internal.key and internal-ca.crt
    to tls.crt, tls.key and ca.crt under /etc/lookalike/internal-tls), tokens file, plaintext health port (embedded
    Ray here: the manifests' Ray cluster is what this machine lacks)."""
    from lookalike.net import wait_for_serving
    from lookalike.security import TLSConfig

    files = {"/etc/lookalike/tls/": {n: work / n for n in ("tls.crt", "tls.key", "ca.crt")},
             "/etc/lookalike/internal-tls/": {"tls.crt": work / "internal.crt", "tls.key": work / "internal.key",
                                               "ca.crt": work / "internal-ca.crt"},
             "/etc/lookalike/tokens/": {"tokens.json": work / "tokens.json"}}
    serve_env = dict(env)
    for name, value in _router_env().items():  # router.yaml's LOOKALIKE_* values, its mounted paths mapped here
        for mount, names in files.items():
            if value.startswith(mount):
                value = str(names[value[len(mount):]])
        serve_env[name] = value
    assert {"LOOKALIKE_TLS_CERT", "LOOKALIKE_INTERNAL_TLS_CERT", "LOOKALIKE_INTERNAL_TLS_SERVER_NAME",
            "LOOKALIKE_TOKENS_FILE"} <= serve_env.keys()
    assert "LOOKALIKE_TLS_SERVER_NAME" not in serve_env, "the internal name is the internal certificate's"
    for name in ("LOOKALIKE_TLS_CERT", "LOOKALIKE_INTERNAL_TLS_CERT", "LOOKALIKE_INTERNAL_TLS_KEY"):
        assert pathlib.Path(serve_env[name]).exists(), f"{name}: the runbook's recipes made no {serve_env[name]}"
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve", "--data", str(work / "data"), "--port",
                             str(port), "--host", "127.0.0.1", "--health-port", str(health_port), "--shards", "2"],
                            cwd=REPO, env=serve_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_serving(f"localhost:{port}", timeout=180, tls=TLSConfig(ca=str(work / "ca.crt")))
    except TimeoutError:
        proc.kill()
        raise AssertionError(proc.communicate()[0][-3000:]) from None
    return proc
