"""The images are built from lock files with hashes, and the overlays name them by digest once released; the
routers are reachable by a headless Service and scale on their request rate (docs/DEPLOY.md).

- docker/requirements-{cpu,gpu}.lock: every requirement pinned (==) with its sha256 hashes, at the versions of
  docker/constraints.txt, covering pyproject.toml's dependencies; the Dockerfiles install them with
  ``--require-hashes --no-deps`` and the project itself with ``--no-deps``, from a base pinned by digest.
- docker/release.sh's pinning step, on a copy of k8s/, makes every lookalike container's image
  REPOSITORY@sha256:... and the render validates; the shipped overlays carry no digest of lookalike (none has been
  released from this checkout), and every third-party image (Redis) is pinned by tag and digest in k8s/base, which
  docker/release.sh checks against the registry.
- k8s: the headless Service selects the router pods on their gRPC port; the HPA's custom metric is the one the
  prometheus-adapter rule in docs/DEPLOY.md defines, from a series the shipped scrape config labels by pod and
  namespace.

No network: kubectl (for `kubectl kustomize`) where it is installed, else those checks skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import tomllib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
FLAVOURS = ("cpu", "gpu")
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(lock: pathlib.Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (the requirement as written, its hashes), of a pip requirements file with continuation lines."""
    text = re.sub(r"\s*\\\n\s*", " ", lock.read_text())
    out = {}
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        spec = words[0]
        hashes = [w.split("=", 1)[1] for w in words[1:] if w.startswith("--hash=")]
        assert all(w.startswith("--hash=") for w in words[1:]), f"{lock.name}: unexpected option in {line!r}"
        name = re.split(r"[<>=!~\[;@ ]", spec, maxsplit=1)[0]
        out[_norm(name)] = (spec, hashes)
    return out


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_norm(name)] = version
    return pins


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_requirement_of_the_lock_is_pinned_and_hashed(flavour):
    lock = DOCKER / f"requirements-{flavour}.lock"
    reqs = _requirements(lock)
    assert len(reqs) > 50, f"{lock.name} holds {len(reqs)} packages: not the whole tree"
    for name, (spec, hashes) in reqs.items():
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", spec), f"{lock.name}: {spec} is not pinned with =="
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), f"{lock.name}: {spec} unhashed"
    # the tested versions (constraints.txt), and every dependency of the project, are what the lock pins
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {_norm(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0]) for d in deps}
    wanted |= {_norm(line.split("[")[0].split("=")[0]) for line in (DOCKER / f"requirements-{flavour}.in")
               .read_text().splitlines() if line.strip() and not line.startswith("#")}
    if flavour == "gpu":
        wanted -= {"faiss-cpu"}
        assert "faiss-cpu" not in reqs, "the GPU image's faiss is faiss-gpu-cuvs"
    assert not wanted - set(reqs), f"{lock.name} lacks {sorted(wanted - set(reqs))}: run docker/lock.sh"
    for name, version in _constraints().items():
        if name in reqs:
            assert reqs[name][0].split("==")[1] == version, f"{lock.name} pins {reqs[name][0]}, constraints {version}"


def _instructions(dockerfile: pathlib.Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_dockerfiles_install_the_lock_with_hashes_and_nothing_else(flavour):
    dockerfile = DOCKER / f"Dockerfile.{flavour}"
    steps = _instructions(dockerfile)
    assert steps[0][0] == "FROM" and _DIGEST.search(steps[0][1]), f"{dockerfile.name}: base not pinned by digest"
    lock = f"requirements-{flavour}.lock"
    assert any(op == "COPY" and f"docker/{lock}" in arg.split() for op, arg in steps), f"{dockerfile.name}: no {lock}"
    installs = [cmd.strip() for op, arg in steps if op == "RUN" for cmd in arg.split("&&")
                if re.match(r"\s*(python -m )?pip install", cmd)]
    assert installs, dockerfile.name
    assert installs[0].endswith(f"--require-hashes --no-deps -r /src/{lock}"), installs[0]
    for cmd in installs[1:]:  # the project itself: from the copied sources, no dependency resolved here
        assert "--no-deps" in cmd and cmd.split()[-1] == "/src" and "--no-build-isolation" in cmd, cmd


def test_the_lock_script_writes_both_locks_with_hashes():
    script = (DOCKER / "lock.sh").read_text()
    assert "--generate-hashes" in script and "constraints.txt" in script
    for flavour in FLAVOURS:
        assert "requirements-$flavour" in script
        assert "docker/lock.sh" in (DOCKER / f"requirements-{flavour}.lock").read_text().split("\n", 3)[1]


def _render(path: pathlib.Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize renders are not checked")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _images(docs) -> set[str]:
    images = set()
    for d in docs:
        spec = d.get("spec") or {}
        templates = [spec["template"]] if "template" in spec else []
        if d["kind"] == "RayCluster":
            templates = [spec["headGroupSpec"]["template"], *[g["template"] for g in spec["workerGroupSpecs"]]]
        for t in templates:
            images |= {c["image"] for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]}
    return images


def _third_party(images: set[str]) -> set[str]:
    """The images that are not lookalike's own: each must be pinned by tag and digest."""
    return {i for i in images if not re.match(r"(lookalike:|registry\.example\.com/acme/lookalike@)", i)}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_release_pins_the_overlay_by_digest_and_the_shipped_one_carries_none(flavour, tmp_path):
    shipped = _images(_render(ROOT / "k8s" / "overlays" / flavour))
    third = _third_party(shipped)
    assert shipped - third == {f"lookalike:0.1.0-{flavour}"}, "the shipped overlays name lookalike's local tag"
    assert third, "the Redis of the head's GCS fault tolerance"
    for image in third:
        assert re.fullmatch(r"[a-z0-9./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), f"{image} is not pinned by digest"
    copy = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", copy)
    digest = "sha256:" + "0123456789abcdef" * 4
    ref = f"registry.example.com/acme/lookalike@{digest}"
    res = subprocess.run(["bash", str(DOCKER / "release.sh"), "pin", str(copy / "overlays" / flavour), ref],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    docs = _render(copy / "overlays" / flavour)
    assert _images(docs) == {ref} | third
    kustomization = yaml.safe_load((copy / "overlays" / flavour / "kustomization.yaml").read_text())
    assert kustomization["images"] == [{"name": "lookalike", "newName": "registry.example.com/acme/lookalike",
                                        "digest": digest}]
    assert (copy / "overlays" / flavour / "kustomization.yaml").read_text().startswith("#"), "comments kept"
    bad = subprocess.run(["bash", str(DOCKER / "release.sh"), "pin", str(copy / "overlays" / flavour),
                          "registry.example.com/acme/lookalike:latest"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "not an image by digest" in bad.stderr and "Traceback" not in bad.stderr


# --- the routers on the network -----------------------------------------------------------------------------------
def _adapter_rule() -> dict:
    """The prometheus-adapter rule of docs/DEPLOY.md (its yaml block holding ``rules:``)."""
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    for body in re.findall(r"^```yaml\n(.*?)^```", text, re.S | re.M):
        doc = yaml.safe_load(body)
        if isinstance(doc, dict) and "rules" in doc:
            return doc["rules"]["custom"][0]
    raise AssertionError("docs/DEPLOY.md shows no prometheus-adapter rule")


def test_headless_service_and_the_hpa_on_the_request_rate():
    docs = _render(ROOT / "k8s" / "base")
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    dep = by["Deployment", "lookalike-router"]
    headless = by["Service", "lookalike-router-headless"]
    assert headless["spec"]["clusterIP"] == "None" and not headless["spec"].get("publishNotReadyAddresses")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert [(p["port"], p["targetPort"]) for p in headless["spec"]["ports"]] == [(ports["grpc"], "grpc")]
    hpa = by["HorizontalPodAutoscaler", "lookalike-router"]
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert set(kinds) == {"Pods", "Resource"} and kinds["Resource"]["resource"]["name"] == "cpu"
    rule = _adapter_rule()
    assert kinds["Pods"]["pods"]["metric"]["name"] == rule["name"]["as"]
    series = re.match(r"(\w+)", rule["seriesQuery"]).group(1)
    assert series == "lookalike_router_requests_total"
    # the series carries the labels the rule maps to the HPA's pods: the shipped scrape config sets them
    scrape = yaml.safe_load(by["ConfigMap", "lookalike-prometheus"]["data"]["scrape-configs.yaml"])
    router_job = next(j for j in scrape if j["job_name"] == "lookalike-router")
    targets = {r.get("target_label") for r in router_job["relabel_configs"]}
    assert set(rule["resources"]["overrides"]) <= targets, "the scrape config does not label pod and namespace"


def test_release_builds_pushes_and_pins_both_overlays(tmp_path):
    """docker/release.sh end to end on a copy of docker/ and k8s/, with a `docker` on PATH that records its calls and
    answers as buildx does (the digest of what it pushed in --metadata-file): both images are built from their
    Dockerfiles for linux/amd64 and pushed under REPOSITORY:VERSION-FLAVOUR, and each overlay is pinned to the
    digest pushed for it."""
    _render(ROOT / "k8s" / "base")  # skips without kubectl
    repo = tmp_path / "repo"
    shutil.copytree(DOCKER, repo / "docker")
    shutil.copytree(ROOT / "k8s", repo / "k8s")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "docker-calls"
    fake = bin_dir / "docker"
    fake.write_text(f"""#!/usr/bin/env python3
import hashlib, json, sys
args = sys.argv[1:]
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:3] == ["buildx", "imagetools", "inspect"]:
    print(json.dumps("sha256:" + "ab" * 32))
elif args[:2] == ["buildx", "build"]:
    tag = args[args.index("-t") + 1]
    meta = args[args.index("--metadata-file") + 1]
    json.dump({{"containerimage.digest": "sha256:" + hashlib.sha256(tag.encode()).hexdigest()}}, open(meta, "w"))
""")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run(["bash", str(repo / "docker" / "release.sh"), "registry.example.com/acme/lookalike",
                          "0.2.0"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    builds = [json.loads(line) for line in calls.read_text().splitlines() if '"build"' in line]
    assert len(builds) == 2
    for flavour, args in zip(FLAVOURS, builds):
        tag = f"registry.example.com/acme/lookalike:0.2.0-{flavour}"
        assert args[args.index("-f") + 1] == f"docker/Dockerfile.{flavour}" and args[-1] == "."
        assert args[args.index("-t") + 1] == tag and "--push" in args
        assert args[args.index("--platform") + 1] == "linux/amd64"
        digest = "sha256:" + hashlib.sha256(tag.encode()).hexdigest()
        pinned = _images(_render(repo / "k8s" / "overlays" / flavour))
        third = _third_party(pinned)
        assert pinned - third == {f"registry.example.com/acme/lookalike@{digest}"}
        assert f"{flavour}: {tag} = registry.example.com/acme/lookalike@{digest}" in res.stdout
    assert "is now sha256:abab" in res.stdout  # the base image's tag moved since the Dockerfile's digest
    # every third-party image pinned in k8s/base is looked up by its digest before anything is built
    inspected = [json.loads(line)[-1] for line in calls.read_text().splitlines() if '"imagetools"' in line]
    for image in third:
        assert image in inspected and f"note: {image.split('@')[0]} is now" in res.stdout
