"""The Kubernetes deployment (k8s/) and its images (docker/): the kustomize renders validate against Kubernetes'
schemas and KubeRay's CRDs, and agree with the CLI they run (port, storage path, flags, Ray address and token).

Needs `kubectl` (for `kubectl kustomize`) and kubernetes-validate; the KubeRay CRD schemas are read from
../shared/schemas/kuberay/. Each check skips, saying why, when what it needs is absent. No network.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import tomllib

import pytest
import yaml

from k8s_invariants import CLUSTER_SCOPED, check_production_invariants, production_violations
from tools.cli import build_parser
from tools.cli.common import parse_bytes
from tools.cli.serve import serve_port
from lookalike.config import storage_path
from lookalike.health import LIVENESS

ROOT = pathlib.Path(__file__).resolve().parents[1]
KUBERAY_SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
TARGETS = ["base", "overlays/cpu", "overlays/gpu"]
NAMESPACE = "lookalike"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD files are large


# --- rendering and lookups ----------------------------------------------------------------------------------------
@functools.cache
def _render(target: str) -> tuple[dict, ...]:
    out = subprocess.run([shutil.which("kubectl"), "kustomize", str(ROOT / "k8s" / target)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize k8s/{target} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


@pytest.fixture(params=TARGETS)
def docs(request) -> tuple[dict, ...]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the kustomize renders of k8s/ are not checked")
    return _render(request.param)


def _one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind}{' ' + name if name else ''}, found {len(found)}"
    return found[0]


def _pod_templates(docs) -> list[tuple[str, dict]]:
    """(where, pod template) for every workload and every RayCluster node group."""
    out = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in WORKLOADS:
            out.append((name, d["spec"]["template"]))
        elif d["kind"] == "RayCluster":
            out.append((f"{name} head", d["spec"]["headGroupSpec"]["template"]))
            out += [(f"{name} group {g['groupName']}", g["template"]) for g in d["spec"].get("workerGroupSpecs", [])]
    return out


def _ray_templates(docs) -> list[tuple[str, dict]]:
    return [(where, t) for where, t in _pod_templates(docs) if where.startswith("RayCluster/")]


def _containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def _router(docs) -> tuple[dict, dict]:
    """The router Deployment and its container."""
    dep = _one(docs, "Deployment", "lookalike-router")
    (container,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "router"]
    return dep, container


def _env(docs, container: dict) -> dict[str, str]:
    """The container's plain environment: its `env` values and the ConfigMaps of its `envFrom`."""
    env = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(_one(docs, "ConfigMap", src["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command and args ($$ escapes; unknown variables stay as written)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def _serve_args(docs):
    """The router's `lookalike serve` flags, parsed by the CLI's own parser (its defaults included)."""
    _, container = _router(docs)
    env = _env(docs, container)
    argv = [_expand(a, env) for a in container.get("command", [])[1:] + container["args"]]
    assert not any("$(" in a for a in argv), f"router args name variables that are not set: {argv}"
    args = build_parser().parse_args(argv)  # a subcommand or flag the CLI lacks exits here
    assert args.command == "serve", f"the router runs `lookalike {args.command}`, not `lookalike serve`"
    return args


def _cpu(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _config(docs) -> dict[str, str]:
    return _one(docs, "ConfigMap", "lookalike-config")["data"]


# --- schemas ------------------------------------------------------------------------------------------------------
def test_kubernetes_resources_validate_strictly(docs):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e "
                                                           "'.[dev]'): Kubernetes schemas are not checked")
    version = kv.latest_version()
    assert tuple(int(x) for x in version.split(".")[:2]) >= (1, 32), f"kubernetes-validate {version} is too old"
    checked = [d for d in docs if not d["apiVersion"].startswith("ray.io/")]
    # The RayCluster's pod templates as core PodTemplates: strict pod specs even where KubeRay's CRD is absent.
    checked += [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "ray"}, "template": t}
                for _, t in _ray_templates(docs)]
    assert checked
    for doc in checked:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as err:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {version}: "
                        f"{'.'.join(map(str, err.path))}: {err.message}")


def _closed(schema):
    """The schema with unknown fields refused (the API server prunes them silently) where the CRD lists fields."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_closed(v) for v in schema]
    return schema


@functools.cache
def _crd_schema(kind: str, version: str) -> dict:
    crd = yaml.load((KUBERAY_SCHEMAS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=_LOADER)
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return _closed(ver["schema"]["openAPIV3Schema"])


def test_kuberay_resources_match_the_crd_schemas(docs):
    if not KUBERAY_SCHEMAS.is_dir():
        pytest.skip(f"{KUBERAY_SCHEMAS} is absent: KubeRay resources are not checked against the CRD schemas")
    jsonschema = pytest.importorskip("jsonschema")
    ray_docs = [d for d in docs if d["apiVersion"].startswith("ray.io/")]
    assert [d["kind"] for d in ray_docs] == ["RayCluster"]
    for doc in ray_docs:
        assert doc["apiVersion"] == "ray.io/v1"
        validator = jsonschema.Draft4Validator(_crd_schema(doc["kind"], "v1"))
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"{doc['kind']}/{doc['metadata']['name']} against KubeRay's CRD:\n" + "\n".join(errors)


# --- the router ---------------------------------------------------------------------------------------------------
def test_probes_and_service_use_the_port_the_router_listens_on(docs):
    args = _serve_args(docs)
    port = serve_port(args, _env(docs, _router(docs)[1]))  # --port, else LOOKALIKE_PORT, else serve's default
    # the kubelet's gRPC probes speak plaintext: with TLS they need serve's plaintext --health-port
    tls = "LOOKALIKE_TLS_CERT" in _env(docs, _router(docs)[1]) or args.tls_cert
    probe_port = args.health_port if tls else port
    assert probe_port, "the router serves TLS but has no --health-port for the kubelet's (plaintext) probes"
    dep, container = _router(docs)
    probes = {k: container.get(k) for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind in ("readinessProbe", "livenessProbe"):
        assert probes[kind], f"the router has no {kind}"
    for kind, probe in probes.items():
        if probe:
            assert probe.get("grpc", {}).get("port") == probe_port, \
                f"{kind} is not a gRPC probe of port {probe_port}: {probe}"
    # readiness follows the router's health (''), liveness and startup only that its process serves (lookalike.health)
    assert probes["readinessProbe"]["grpc"].get("service", "") == "", "readiness must ask the service '' (overall)"
    for kind in ("startupProbe", "livenessProbe"):
        if probes[kind]:
            assert probes[kind]["grpc"].get("service") == LIVENESS, \
                f"{kind} must ask the service {LIVENESS!r}: '' turns NOT_SERVING while the control plane is away, " \
                "and a liveness probe would restart the router for it"
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named.get("grpc") == port, f"container port 'grpc' is {named.get('grpc')}, the router listens on {port}"

    labels = dep["spec"]["template"]["metadata"]["labels"]
    services = [s for s in docs if s["kind"] == "Service"
                and s["spec"]["selector"].items() <= labels.items()]
    assert services, "no Service selects the router pods"
    for svc in services:
        (svc_port,) = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
        target = svc_port.get("targetPort", svc_port["port"])
        assert (named.get(target) if isinstance(target, str) else target) == port
        assert svc_port["port"] == port, "clients use the same port through the Service as the router's default"


def _mounted_file(pod_spec, container, path):
    """The (Secret name, key) a container sees at ``path``, or None."""
    for m in container.get("volumeMounts", []):
        prefix = m["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            (vol,) = [v for v in pod_spec.get("volumes", []) if v["name"] == m["name"]]
            return vol.get("secret", {}).get("secretName"), path[len(prefix):]
    return None


INTERNAL_TLS = ("LOOKALIKE_INTERNAL_TLS_CERT", "LOOKALIKE_INTERNAL_TLS_KEY", "LOOKALIKE_INTERNAL_TLS_CA")


def test_tls_and_tokens_files_are_mounted_where_router_and_shards_read_them(docs):
    """The router's LOOKALIKE_TLS_* (public), LOOKALIKE_INTERNAL_TLS_* (the shard hop's) and tokens file are files
    of Secrets it mounts; the shards (Ray pods) read the internal paths on their nodes (the cluster config carries
    paths), so every Ray pod mounts the same internal Secret there, and no Ray pod mounts the public one; plaintext
    is not asked for."""
    dep, container = _router(docs)
    env = _env(docs, container)
    args = _serve_args(docs)
    assert not args.insecure, "the router serves plaintext (--insecure)"
    paths = {k: env[k] for k in ("LOOKALIKE_TLS_CERT", "LOOKALIKE_TLS_KEY", "LOOKALIKE_TLS_CA",
                                 "LOOKALIKE_TOKENS_FILE", *INTERNAL_TLS)}
    pod = dep["spec"]["template"]["spec"]
    for k, path in paths.items():
        assert _mounted_file(pod, container, path), f"{k}={path} is not in a Secret the router mounts"
    assert pod["securityContext"].get("fsGroup"), "the router's user cannot read Secret files of mode 0440"
    assert env.get("LOOKALIKE_INTERNAL_TLS_SERVER_NAME"), "shards listen on pod addresses: name their certificate"
    public = _mounted_file(pod, container, paths["LOOKALIKE_TLS_KEY"])[0]
    internal = _mounted_file(pod, container, paths["LOOKALIKE_INTERNAL_TLS_KEY"])[0]
    assert public != internal, "the shard hop has no certificate of its own: the public key would be on Ray pods"
    for where, template in _ray_templates(docs):
        secrets = {v["secret"]["secretName"] for v in template["spec"].get("volumes", []) if "secret" in v}
        assert public not in secrets, f"{where} mounts the router's public certificate and key ({public})"
        for c in template["spec"]["containers"]:
            for k in INTERNAL_TLS:
                assert _mounted_file(template["spec"], c, paths[k]) == _mounted_file(pod, container, paths[k]), \
                    f"{where}: {paths[k]} is not the router's Secret file"


def test_router_scaling_and_disruption_target_the_router(docs):
    dep, _ = _router(docs)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in dep["spec"], "the HorizontalPodAutoscaler sets the replicas; apply would reset them"
    hpa = _one(docs, "HorizontalPodAutoscaler", "lookalike-router")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]
    pdbs = [p for p in docs if p["kind"] == "PodDisruptionBudget"
            and p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
    assert len(pdbs) == 1 and pdbs[0]["apiVersion"] == "policy/v1"
    assert pdbs[0]["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "the PDB would block every drain"
    strategy = dep["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0, "a rolling update stops a router only once its successor is ready"


def test_router_joins_the_ray_cluster_through_its_head_service_with_the_token(docs):
    args = _serve_args(docs)
    ray = _one(docs, "RayCluster")
    (head,) = ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    client_port = {p["name"]: p["containerPort"] for p in head["ports"]}["client"]
    # KubeRay names the head's Service <RayCluster>-head-svc; the router is no Ray node, so it uses Ray Client.
    assert args.address == f"ray://{ray['metadata']['name']}-head-svc:{client_port}"

    auth = ray["spec"]["authOptions"]
    assert auth["mode"] == "token"
    _, container = _router(docs)
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": auth["secretName"], "key": "auth_token"}
    for where, template in _pod_templates(docs):
        for c in _containers(template):
            for e in c.get("env", []):
                assert not (e["name"] == "RAY_AUTH_MODE" and e.get("value") != "token"), \
                    f"{where} {c['name']}: Ray's token auth stays on in a cluster"


# --- resources, storage, labels -----------------------------------------------------------------------------------
def test_every_container_has_requests_and_limits(docs):
    sized = [(f"{where} {c['name']}", c.get("resources", {})) for where, t in _pod_templates(docs)
             for c in _containers(t)]
    ray = _one(docs, "RayCluster")
    if ray["spec"].get("enableInTreeAutoscaling"):
        sized.append(("RayCluster autoscaler", ray["spec"].get("autoscalerOptions", {}).get("resources", {})))
    assert len(sized) >= 3
    for where, res in sized:
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{where}: no cpu and memory {kind}"
        assert _cpu(res["requests"]["cpu"]) <= _cpu(res["limits"]["cpu"]), where
        assert parse_bytes(res["requests"]["memory"]) <= parse_bytes(res["limits"]["memory"]), where


def test_storage_is_one_shared_volume_at_the_data_path_on_every_ray_node(docs):
    data = storage_path(_serve_args(docs).data)
    assert data.startswith("/"), "--data must be the same absolute path on every node"
    claims = {}
    ray_templates = _ray_templates(docs)
    assert len(ray_templates) >= 2, "a head and at least one worker group"
    for where, template in _pod_templates(docs):
        volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                   for v in template["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: volumes[m["name"]] for c in _containers(template)
                  for m in c.get("volumeMounts", []) if m["name"] in volumes}
        for path, claim in mounts.items():
            assert path == data, f"{where} mounts {claim} at {path}, not at --data {data}"
        if where.startswith("RayCluster/"):
            assert data in mounts, f"{where} does not mount the storage at {data}"
            claims[where] = mounts[data]
    assert len(set(claims.values())) == 1, f"Ray nodes mount different claims: {claims}"
    # The claim is k8s/storage's, apart from the app, so that deleting the app keeps the data (test_k8s_sizing.py)
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"], "the app's render holds the data's claim"
    assert set(claims.values()) == {"lookalike-data"}, f"Ray nodes mount {claims}, not k8s/storage's claim"


def test_names_labels_and_namespace(docs):
    for d in docs:
        meta = d["metadata"]
        if d["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, f"{d['kind']}/{meta['name']} is cluster-scoped"
        else:
            assert meta.get("namespace") == NAMESPACE, f"{d['kind']}/{meta['name']} is not in {NAMESPACE}"
        assert meta["name"].startswith("lookalike"), meta["name"]
        assert meta["labels"]["app.kubernetes.io/name"] == "lookalike", f"{d['kind']}/{meta['name']}"
        assert meta["labels"].get("app.kubernetes.io/component"), f"{d['kind']}/{meta['name']} has no component"
    for where, template in _pod_templates(docs):
        labels = template["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "lookalike" and labels["app.kubernetes.io/component"], where
    workers = [t["metadata"]["labels"] for where, t in _ray_templates(docs) if " group " in where]
    pdbs = [p["spec"]["selector"]["matchLabels"] for p in docs if p["kind"] == "PodDisruptionBudget"]
    assert all(any(sel.items() <= labels.items() for sel in pdbs) for labels in workers), \
        "worker pods have no PodDisruptionBudget: a drain could take every replica of a bucket at once"


# --- sizing and images --------------------------------------------------------------------------------------------
def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"docker/constraints.txt: {line!r} is not an exact pin"
            pins[_norm(name)] = version
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_worker_pods_fit_the_shards_and_the_growth_bound(docs):
    cfg, args = _config(docs), _serve_args(docs)
    shard_gpus = 0.0 if args.shard_gpus == "auto" else float(args.shard_gpus)
    shard_memory = parse_bytes(args.shard_memory)
    ray = _one(docs, "RayCluster")
    assert ray["spec"].get("enableInTreeAutoscaling") is True, "KubeRay's autoscaler adds pods for new shards"
    capacity = 0
    for group in ray["spec"]["workerGroupSpecs"]:
        (c,) = group["template"]["spec"]["containers"]
        limits = c["resources"]["limits"]
        params = group.get("rayStartParams", {})
        cpus = float(params.get("num-cpus", _cpu(limits["cpu"])))
        memory = int(params.get("memory", parse_bytes(limits["memory"])))  # KubeRay: the memory limit
        gpus = float(limits.get("nvidia.com/gpu", 0))
        per_pod = [int(cpus // args.shard_cpus)]
        if shard_memory:
            per_pod.append(memory // shard_memory)
        if shard_gpus:
            per_pod.append(int(gpus // shard_gpus))
        name = group["groupName"]
        assert min(per_pod) >= 1, f"a pod of group {name} cannot hold one shard ({cfg})"
        assert cpus <= _cpu(limits["cpu"]), f"group {name} tells Ray of more CPUs than its limit"
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        capacity += group["maxReplicas"] * min(per_pod)
    assert args.max_shards <= capacity, (f"growth up to {args.max_shards} shards needs more worker pods than "
                                         f"maxReplicas allow ({capacity} shards)")
    assert ray["spec"]["rayVersion"] == _pins()["ray"], "Ray's version differs between the RayCluster and the images"
    images = {c["image"] for _, t in _ray_templates(docs) + [("router", _one(docs, "Deployment",
                                                                          "lookalike-router")["spec"]["template"])]
              for c in _containers(t)}
    assert len(images) == 1, f"Ray Client needs the router and the Ray nodes on one Ray and Python: {images}"


def _instructions(dockerfile: pathlib.Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _dockerignore() -> list[str]:
    path = ROOT / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerfiles_copy_what_exists_and_run_the_cli():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["lookalike"].partition(":")
    assert module == "tools.cli" and func == "main"
    from tools import cli

    assert callable(getattr(cli, func))
    ignored = _dockerignore()
    for dockerfile in DOCKERFILES:
        steps = _instructions(dockerfile)
        copies = [shlex.split(arg) for op, arg in steps if op in ("COPY", "ADD")]
        assert copies, dockerfile.name
        for words in copies:
            sources = [w for w in words[:-1] if not w.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"{dockerfile.name} copies {src}, which is not in the repository"
                assert not any(fnmatch.fnmatch(src, pat) or src.startswith(pat.rstrip("/") + "/")
                               for pat in ignored), f"{dockerfile.name} copies {src}, which .dockerignore leaves out"
        (entry,) = [arg for op, arg in steps if op == "ENTRYPOINT"]
        assert yaml.safe_load(entry) == ["lookalike"], f"{dockerfile.name}: ENTRYPOINT {entry}"
        users = [arg for op, arg in steps if op == "USER"]
        assert users and users[-1].split(":")[0] not in ("0", "root"), f"{dockerfile.name} runs as root"
        assert steps[0][0] == "FROM" and re.search(r":\d+\.\d+\.\d+", steps[0][1]), "an exact base image tag"


def test_images_pin_every_dependency():
    pins = _pins()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = [d for d in deps if _norm(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0]) not in pins]
    assert not missing, f"docker/constraints.txt does not pin {missing}"
    gpu = (ROOT / "docker" / "requirements-gpu.lock").read_text()  # the locks: tests/test_image_locks.py
    for name in ("faiss-gpu-cuvs", "nvidia-ml-py"):
        assert f"\n{name}==" in gpu and _norm(name) in pins, name
    for dockerfile in DOCKERFILES:
        assert "--require-hashes --no-deps -r /src/requirements-" in dockerfile.read_text(), \
            f"{dockerfile.name} installs unpinned"


def test_serve_commands_in_the_docs_parse():
    """The `lookalike ...` commands of docs/DEPLOY.md exist with those flags (placeholders in CAPITALS kept)."""
    doc = ROOT / "docs" / "DEPLOY.md"
    if not doc.exists():
        pytest.skip("docs/DEPLOY.md is absent")
    parser = build_parser()
    commands = re.findall(r"^\s*(?:\$ )?lookalike ((?:collection|upsert|search|status|rebalance)\b[^\n#`]*)",
                          doc.read_text(), flags=re.M)
    assert commands, "docs/DEPLOY.md shows no lookalike command"
    for line in commands:
        parser.parse_args(shlex.split(line))


# --- production: no single point of failure, a closed network, hardened pods (tests/k8s_invariants.py) -----------
def test_production_invariants(docs):
    """Every shipped render holds every production invariant (k8s_invariants.check_production_invariants, which
    generated overlays go through too)."""
    check_production_invariants(docs)


def _get(docs, kind, name=None):
    return next(d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


def _head(docs):
    return _get(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]


def _worker(docs):
    return _get(docs, "RayCluster")["spec"]["workerGroupSpecs"][0]


def _router_spec(docs):
    return _get(docs, "Deployment", "lookalike-router")["spec"]["template"]["spec"]


def _redis_spec(docs):
    return _get(docs, "StatefulSet", "lookalike-redis")["spec"]["template"]["spec"]


def _policy(docs, name):
    return _get(docs, "NetworkPolicy", name)["spec"]


def _drop(docs, kind, name):
    docs[:] = [d for d in docs if not (d["kind"] == kind and d["metadata"]["name"] == name)]


# (what breaks, the check that must say so, the change)
MUTATIONS = [
    ("router as the default account", "service_accounts", lambda d: _router_spec(d).pop("serviceAccountName")),
    ("worker token mounted", "service_accounts", lambda d: _worker(d)["template"]["spec"].update(
        automountServiceAccountToken=True)),
    ("head container gets the API token", "service_accounts", lambda d: _head(d)["containers"][0]["volumeMounts"]
     .append({"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"})),
    ("autoscaler's Role reads Secrets", "service_accounts", lambda d: _get(d, "Role")["rules"].append(
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})),
    ("router and redis share an account", "service_accounts", lambda d: _redis_spec(d).update(
        serviceAccountName="lookalike-router")),
    ("autoscaler sidecar unhardened", "pod_security", lambda d: _get(d, "RayCluster")["spec"]["autoscalerOptions"]
     .pop("securityContext")),
    ("init container writes its root", "pod_security", lambda d: _router_spec(d)["initContainers"][0].update(
        securityContext={**_router_spec(d)["initContainers"][0]["securityContext"], "readOnlyRootFilesystem": False})),
    ("redis pod without seccomp", "pod_security", lambda d: _redis_spec(d)["securityContext"].pop("seccompProfile")),
    ("an unsafe sysctl", "pod_security", lambda d: _head(d)["securityContext"]["sysctls"].append(
        {"name": "net.core.somaxconn", "value": "1024"})),
    ("unbounded emptyDir", "writable_paths_and_ephemeral_storage", lambda d: _head(d)["volumes"][1].update(
        emptyDir={})),
    ("autoscaler without ephemeral storage", "writable_paths_and_ephemeral_storage",
     lambda d: _get(d, "RayCluster")["spec"]["autoscalerOptions"]["resources"]["limits"].pop("ephemeral-storage")),
    ("worker /tmp/ray on the root filesystem", "writable_paths_and_ephemeral_storage",
     lambda d: _worker(d)["template"]["spec"]["containers"][0]["volumeMounts"].pop(2)),
    ("autoscaler mounts a volume the head lacks", "volumes_resolve", lambda d: _get(d, "RayCluster")["spec"]
     ["autoscalerOptions"]["volumeMounts"].append({"name": "nothing", "mountPath": "/nothing"})),
    ("worker group loses a volume", "volumes_resolve", lambda d: _worker(d)["template"]["spec"]["volumes"].pop()),
    ("worker burstable", "guaranteed_ray_pods", lambda d: _worker(d)["template"]["spec"]["containers"][0]
     ["resources"]["requests"].update(cpu="2")),
    ("autoscaler burstable", "guaranteed_ray_pods", lambda d: _get(d, "RayCluster")["spec"]["autoscalerOptions"]
     ["resources"]["requests"].update(memory="512Mi")),
    ("no default deny", "network_policies", lambda d: _drop(d, "NetworkPolicy", "lookalike-default-deny")),
    ("router's health port opened", "network_policies", lambda d: _policy(d, "lookalike-router")["ingress"][0]
     ["ports"].append({"protocol": "TCP", "port": 8081})),
    ("Redis open to the workers", "network_policies", lambda d: _policy(d, "lookalike-redis")["ingress"][0]["from"]
     [0]["podSelector"]["matchLabels"].update({"app.kubernetes.io/component": "ray-worker"})),
    ("the public port open to every namespace", "network_policies", lambda d: _policy(d, "lookalike-router")
     ["ingress"][0]["from"][0].update(namespaceSelector={})),
    ("an unpinned Ray port", "network_policies", lambda d: _worker(d)["rayStartParams"].pop("node-manager-port")),
    ("the dashboard on all interfaces", "network_policies", lambda d: _get(d, "RayCluster")["spec"]
     ["headGroupSpec"]["rayStartParams"].update({"dashboard-host": "0.0.0.0"})),
    ("the kernel's ports", "network_policies", lambda d: _worker(d)["template"]["spec"]["securityContext"]
     .pop("sysctls")),
    ("routers stacked in a zone", "topology_spread", lambda d: _router_spec(d)["topologySpreadConstraints"].pop()),
    ("workers stacked on a node", "topology_spread", lambda d: _worker(d)["template"]["spec"]
     ["topologySpreadConstraints"][0].update(whenUnsatisfiable="ScheduleAnyway")),
    ("no head budget", "disruption_budgets", lambda d: _drop(d, "PodDisruptionBudget", "lookalike-ray-head")),
    ("no Redis budget", "disruption_budgets", lambda d: _drop(d, "PodDisruptionBudget", "lookalike-redis")),
    ("no GCS fault tolerance", "head_fault_tolerance", lambda d: _get(d, "RayCluster")["spec"]
     .pop("gcsFaultToleranceOptions")),
    ("Redis in plaintext", "head_fault_tolerance", lambda d: _get(d, "RayCluster")["spec"]
     ["gcsFaultToleranceOptions"].update(redisAddress="lookalike-redis:6379")),
    ("no Redis deployed", "head_fault_tolerance", lambda d: _drop(d, "StatefulSet", "lookalike-redis")),
    ("a missing PriorityClass", "priority_classes", lambda d: _drop(d, "PriorityClass", "lookalike-shards")),
    ("autoscaler without Ray's TLS", "ray_tls", lambda d: _get(d, "RayCluster")["spec"]["autoscalerOptions"]
     .pop("env")),
    ("the public key on the workers", "public_key_off_ray_pods", lambda d: _worker(d)["template"]["spec"]["volumes"]
     .append({"name": "tls", "secret": {"secretName": "lookalike-tls"}})),
    ("router without Ray's TLS", "ray_tls", lambda d: _router_spec(d)["containers"][0].update(
        env=[e for e in _router_spec(d)["containers"][0]["env"] if e["name"] != "RAY_USE_TLS"])),
]


@pytest.mark.parametrize("what,check,mutate", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_each_invariant_catches_what_it_guards(what, check, mutate):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the kustomize renders of k8s/ are not checked")
    docs = copy.deepcopy(list(_render("base")))
    assert production_violations(docs) == {}
    mutate(docs)
    found = production_violations(docs)
    assert check in found, f"{what}: {check} saw nothing wrong ({found})"


def test_ray_tls_init_script_makes_a_certificate_the_ray_ca_signed(tmp_path):
    """ray-tls/gencert.sh (the ray-tls init containers) with openssl: a key and a certificate for the pod's IP,
    the head's Service and loopback, signed by the Ray CA, server and client usage; the CA's key is not copied."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: the Ray TLS init script is not run")
    x509 = pytest.importorskip("cryptography.x509")
    ca, out = tmp_path / "ca", tmp_path / "tls"
    ca.mkdir()
    out.mkdir()
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", ca / "ca.key", "-out", ca / "ca.crt", "-subj", "/CN=ray-ca", "-days", "2"],
                   check=True, capture_output=True)
    ray = _get(_render("base"), "RayCluster")
    (init,) = [c for c in ray["spec"]["headGroupSpec"]["template"]["spec"]["initContainers"] if c["name"] == "ray-tls"]
    env = {e["name"]: e["value"] for e in init["env"] if "value" in e}
    env.update(RAY_CA_DIR=str(ca), RAY_TLS_DIR=str(out), POD_NAME="lookalike-head-x", POD_NAMESPACE=NAMESPACE,
               POD_IP="10.1.2.3", PATH=os.environ.get("PATH", "/usr/bin:/bin"))
    run = subprocess.run(["/bin/sh", ROOT / "k8s" / "base" / "ray-tls" / "gencert.sh"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in out.iterdir()), "the pod's key is readable by others"
    verify = subprocess.run([openssl, "verify", "-CAfile", ca / "ca.crt", out / "tls.crt"], capture_output=True,
                            text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    cert = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(sans.get_values_for_type(x509.DNSName)) | {str(a) for a in sans.get_values_for_type(x509.IPAddress)}
    svc = f"{ray['metadata']['name']}-head-svc"  # KubeRay's name of the head's Service, which Ray peers dial
    assert env["TLS_SERVICE"] == svc
    assert {"10.1.2.3", "127.0.0.1", "localhost", svc, f"{svc}.{NAMESPACE}.svc.cluster.local"} <= names
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert {x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH} <= usages
