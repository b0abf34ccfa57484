"""What a production render of k8s/ must hold, whatever overlay made it: `check_production_invariants(docs)` on the
documents of one `kubectl kustomize` (the shipped base and overlays in tests/test_k8s.py; generated overlays such as
`lookalike size --kustomize`'s go through the same function). docs/DEPLOY.md, "Network and pod security", is the
prose of the same rules.

Each check is a generator of violations (one sentence each); `production_violations` runs them all and returns the
violations by check, so a test can show which check catches what. Not a test module: import it.
"""

from __future__ import annotations

import re

WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")
CLUSTER_SCOPED = ("PriorityClass", "ClusterRole", "ClusterRoleBinding", "Namespace", "StorageClass",
                  "PersistentVolume")
RAY_COMPONENTS = ("ray-head", "ray-worker")

# --- the documented network paths (docs/DEPLOY.md, "Network and pod security") -----------------------------------
RAY_PORTS_RANGE = ("TCP 10002-19999",)
EPHEMERAL = (40000, 49999)  # the pods' net.ipv4.ip_local_port_range: shard gRPC and metrics servers bind port 0
EPHEMERAL_PORTS = f"TCP {EPHEMERAL[0]}-{EPHEMERAL[1]}"
RAY_PORTS = frozenset({"TCP 6379", "TCP 6380-6383", "TCP 10002-19999", EPHEMERAL_PORTS, "TCP 52365"})
RAY_METRICS_PORT = 8080
RAY = "pods ray-head+ray-worker"
MONITORING = "namespaces lookalike.io/monitoring=true"
CLIENTS = "namespaces lookalike.io/client=true"
DNS = "any namespace, pods k8s-app=kube-dns"
DNS_PORTS = frozenset({"UDP 53", "TCP 53"})
ANYWHERE = "anywhere"
PATHS = {
    ("ingress", "ray-head"): {RAY: RAY_PORTS, "pods router": {"TCP 10001"}, MONITORING: {f"TCP {RAY_METRICS_PORT}"}},
    ("ingress", "ray-worker"): {RAY: RAY_PORTS, "pods router": {EPHEMERAL_PORTS},
                                MONITORING: {f"TCP {RAY_METRICS_PORT}", EPHEMERAL_PORTS}},
    ("ingress", "router"): {CLIENTS: {"TCP 50051"}, MONITORING: {"TCP 9090"}},
    ("ingress", "redis"): {"pods ray-head": {"TCP 6379"}},
    ("egress", "ray-head"): {RAY: RAY_PORTS, "pods redis": {"TCP 6379"}, DNS: DNS_PORTS,
                             ANYWHERE: {"TCP 443", "TCP 6443"}},  # the autoscaler to the Kubernetes API
    ("egress", "ray-worker"): {RAY: RAY_PORTS, DNS: DNS_PORTS},
    ("egress", "router"): {"pods ray-head": {"TCP 10001"}, "pods ray-worker": {EPHEMERAL_PORTS}, DNS: DNS_PORTS},
    ("egress", "redis"): {DNS: DNS_PORTS},
}
# The ray start flags that pin a port, and the ports of the paths above they must fall in.
RAY_PORT_PARAMS = ("node-manager-port", "object-manager-port", "runtime-env-agent-port", "dashboard-agent-grpc-port",
                   "dashboard-agent-listen-port", "min-worker-port", "max-worker-port")
# KubeRay's autoscaler: what its Role may grant (KubeRay's own Role for it), and nothing else anywhere.
AUTOSCALER_RULES = {("", "pods"): {"get", "list", "watch", "patch"}, ("", "pods/resize"): {"patch"},
                    ("ray.io", "rayclusters"): {"get", "patch"}}
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
# The restricted Pod Security Standard's volume types and the sysctls the baseline allows.
PSS_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
               "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
RAY_TLS_ENV = ("RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")


# --- lookups ------------------------------------------------------------------------------------------------------
def pod_templates(docs) -> list[tuple[str, dict]]:
    """(where, pod template) for every workload and every RayCluster node group."""
    out = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in WORKLOADS:
            out.append((name, d["spec"]["template"]))
        elif d["kind"] == "CronJob":
            out.append((name, d["spec"]["jobTemplate"]["spec"]["template"]))
        elif d["kind"] == "RayCluster":
            out.append((f"{name} head", d["spec"]["headGroupSpec"]["template"]))
            out += [(f"{name} group {g['groupName']}", g["template"]) for g in d["spec"].get("workerGroupSpecs", [])]
    return out


def _component(template: dict) -> str:
    return template["metadata"].get("labels", {}).get("app.kubernetes.io/component", "")


def _rayclusters(docs) -> list[dict]:
    return [d for d in docs if d["kind"] == "RayCluster"]


def containers(docs, where: str, template: dict) -> list[dict]:
    """The pod's containers, init containers first; in a RayCluster's head, KubeRay's autoscaler sidecar too (the
    container its autoscalerOptions make, named "autoscaler")."""
    spec = template["spec"]
    out = spec.get("initContainers", []) + spec["containers"]
    if where.endswith(" head"):
        ray = next(d for d in _rayclusters(docs) if where == f"RayCluster/{d['metadata']['name']} head")
        if ray["spec"].get("enableInTreeAutoscaling"):
            opts = ray["spec"].get("autoscalerOptions", {})
            out = out + [{"name": "autoscaler", **{k: opts[k] for k in ("resources", "securityContext",
                                                                          "volumeMounts", "env") if k in opts}}]
    return out


def matches(selector: dict | None, labels: dict) -> bool:
    """A label selector (matchLabels, matchExpressions) against labels; None and {} match everything."""
    selector = selector or {}
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": key in labels and labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _quantity(q) -> float:
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    num, unit = float(m.group(1)), m.group(2)
    factors = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2 ** 10, "Mi": 2 ** 20,
               "Gi": 2 ** 30, "Ti": 2 ** 40}
    return num * factors[unit]


def _ports(rule_ports) -> frozenset:
    if not rule_ports:
        return frozenset({"all ports"})
    out = set()
    for p in rule_ports:
        proto, port = p.get("protocol", "TCP"), p.get("port")
        if port is None:
            out.add(f"{proto} all ports")
        else:
            out.add(f"{proto} {port}-{p['endPort']}" if "endPort" in p else f"{proto} {port}")
    return frozenset(out)


def _peer(peer: dict, components: dict[str, list[dict]]) -> str:
    """A NetworkPolicy peer in the words of PATHS: the components of this namespace a pod selector matches, the
    labels of a namespace selector, an ipBlock."""
    if "ipBlock" in peer:
        return f"ipBlock {peer['ipBlock']['cidr']}"
    pods, ns = peer.get("podSelector"), peer.get("namespaceSelector")
    if ns is None:
        hit = sorted(c for c, labels in components.items() if any(matches(pods, lab) for lab in labels))
        return "pods " + "+".join(hit) if hit else f"pods of no component ({pods})"
    words = ("namespaces " + ",".join(f"{k}={v}" for k, v in sorted(ns.get("matchLabels", {}).items()))
             if ns.get("matchLabels") else "any namespace")
    if ns.get("matchExpressions"):
        words += f" {ns['matchExpressions']}"
    if pods:
        words += ", pods " + ",".join(f"{k}={v}" for k, v in sorted(pods.get("matchLabels", {}).items()))
    return words


# --- the checks ---------------------------------------------------------------------------------------------------
CHECKS = []


def _check(fn):
    CHECKS.append(fn)
    return fn


@_check
def service_accounts(docs):
    """Every pod runs as its component's own ServiceAccount (not `default`), with no API token mounted; one
    component, one account. The one token: KubeRay's autoscaler's, mounted into that container alone, with a Role
    no wider than AUTOSCALER_RULES."""
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    owner: dict[str, str] = {}
    for where, t in pod_templates(docs):
        spec, comp = t["spec"], _component(t)
        sa = spec.get("serviceAccountName", "")
        if sa in ("", "default"):
            yield f"{where} runs as the default ServiceAccount"
            continue
        if sa not in accounts:
            yield f"{where}: its ServiceAccount {sa} is not in the render"
        elif accounts[sa].get("automountServiceAccountToken") is not False:
            yield f"ServiceAccount {sa} does not set automountServiceAccountToken: false"
        if spec.get("automountServiceAccountToken") is not False:
            yield f"{where} does not set automountServiceAccountToken: false"
        if owner.setdefault(sa, comp) != comp:
            yield f"ServiceAccount {sa} is shared by {owner[sa]} and {comp}"
        for c in containers(docs, where, t):
            token = any(m["mountPath"].rstrip("/") == TOKEN_PATH for m in c.get("volumeMounts", []))
            if token and c["name"] != "autoscaler":
                yield f"{where} {c['name']} mounts an API token"
    heads = {t["spec"].get("serviceAccountName") for w, t in pod_templates(docs) if w.endswith(" head")
             and next(d for d in _rayclusters(docs)
                      if w == f"RayCluster/{d['metadata']['name']} head")["spec"].get("enableInTreeAutoscaling")}
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    for d in docs:
        if d["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            yield f"{d['kind']}/{d['metadata']['name']}: nothing of lookalike needs cluster-wide permissions"
        if d["kind"] != "RoleBinding":
            continue
        subjects = {s["name"] for s in d.get("subjects", [])}
        if not subjects <= heads:
            yield f"RoleBinding/{d['metadata']['name']} grants {sorted(subjects - heads)}, which need no API access"
        role = roles.get(d["roleRef"]["name"]) if d["roleRef"]["kind"] == "Role" else None
        if role is None:
            yield f"RoleBinding/{d['metadata']['name']} binds a role that is not a Role of the render"
            continue
        for rule in role.get("rules", []):
            for group in rule.get("apiGroups", []):
                for res in rule.get("resources", []):
                    extra = set(rule.get("verbs", [])) - AUTOSCALER_RULES.get((group, res), set())
                    if extra:
                        yield f"Role/{role['metadata']['name']} grants {sorted(extra)} on {group or 'core'}/{res}"


@_check
def pod_security(docs):
    """The restricted Pod Security Standard, and more: non-root, seccomp RuntimeDefault, no privilege escalation,
    every capability dropped, a read-only root filesystem, for every container (init containers and KubeRay's
    autoscaler sidecar included); no host namespaces or host paths; only safe sysctls."""
    for where, t in pod_templates(docs):
        spec = t["spec"]
        pod = spec.get("securityContext", {})
        if pod.get("runAsNonRoot") is not True:
            yield f"{where}: the pod does not set runAsNonRoot"
        if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            yield f"{where}: the pod's seccompProfile is not RuntimeDefault"
        if pod.get("runAsUser") == 0:
            yield f"{where} runs as root"
        for k in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(k):
                yield f"{where} uses {k}"
        for s in pod.get("sysctls", []):
            if s["name"] not in SAFE_SYSCTLS:
                yield f"{where}: sysctl {s['name']} is not a safe one"
        for v in spec.get("volumes", []):
            kinds = set(v) - {"name"}
            if not kinds <= PSS_VOLUMES:
                yield f"{where}: volume {v['name']} is of a type the restricted standard refuses ({kinds})"
        for c in containers(docs, where, t):
            sc, name = c.get("securityContext", {}), f"{where} {c['name']}"
            if sc.get("allowPrivilegeEscalation") is not False:
                yield f"{name}: allowPrivilegeEscalation is not false"
            if sc.get("privileged"):
                yield f"{name} is privileged"
            if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
                yield f"{name} does not drop ALL capabilities (and add none)"
            if sc.get("readOnlyRootFilesystem") is not True:
                yield f"{name}: the root filesystem is not read-only"
            if sc.get("seccompProfile", {}).get("type", "RuntimeDefault") != "RuntimeDefault":
                yield f"{name}: its seccompProfile is not RuntimeDefault"
            if sc.get("runAsNonRoot") is False or sc.get("runAsUser") == 0:
                yield f"{name} runs as root"


@_check
def writable_paths_and_ephemeral_storage(docs):
    """Every container has ephemeral-storage requests and limits; every emptyDir a sizeLimit; the Ray containers
    write /tmp and Ray's session directory (/tmp/ray) on emptyDirs, the router /tmp."""
    for where, t in pod_templates(docs):
        volumes = {v["name"]: v for v in t["spec"].get("volumes", [])}
        for name, v in volumes.items():
            if "emptyDir" in v and not (v["emptyDir"] or {}).get("sizeLimit"):
                yield f"{where}: emptyDir {name} has no sizeLimit"
        for c in containers(docs, where, t):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                if "ephemeral-storage" not in res.get(kind, {}):
                    yield f"{where} {c['name']}: no ephemeral-storage {kind}"
        main = [c for c in t["spec"]["containers"]]
        needs = ("/tmp", "/tmp/ray") if _component(t) in RAY_COMPONENTS else ("/tmp",)
        for c in main:
            mounts = {m["mountPath"].rstrip("/"): m["name"] for m in c.get("volumeMounts", [])}
            for path in needs:
                if "emptyDir" not in volumes.get(mounts.get(path, ""), {}):
                    yield f"{where} {c['name']}: {path} is not a writable emptyDir"


@_check
def volumes_resolve(docs):
    """Every mount (the autoscaler's included) names a volume of its pod, once per path; volume names are unique.
    The API server checks this only when the pod is made, long after `kubectl apply` succeeded."""
    claims = {f"StatefulSet/{d['metadata']['name']}": [c["metadata"]["name"] for c in
                                                        d["spec"].get("volumeClaimTemplates", [])]
              for d in docs if d["kind"] == "StatefulSet"}
    for where, t in pod_templates(docs):
        names = [v["name"] for v in t["spec"].get("volumes", [])] + claims.get(where, [])
        if len(names) != len(set(names)):
            yield f"{where}: volume names repeat: {names}"
        for c in containers(docs, where, t):
            paths = [m["mountPath"].rstrip("/") for m in c.get("volumeMounts", [])]
            if len(paths) != len(set(paths)):
                yield f"{where} {c['name']}: a path is mounted twice: {paths}"
            for m in c.get("volumeMounts", []):
                if m["name"] not in names:
                    yield f"{where} {c['name']}: mounts {m['name']}, which is no volume of the pod"


@_check
def guaranteed_ray_pods(docs):
    """The Ray head's and workers' containers (init containers and the autoscaler sidecar included) have requests
    equal to limits: Guaranteed QoS."""
    for where, t in pod_templates(docs):
        if _component(t) not in RAY_COMPONENTS:
            continue
        for c in containers(docs, where, t):
            res = c.get("resources", {})
            req, lim = res.get("requests", {}), res.get("limits", {})
            if not {"cpu", "memory"} <= set(lim):
                yield f"{where} {c['name']}: no cpu and memory limits"
            if set(req) != set(lim) or any(_quantity(req[k]) != _quantity(lim[k]) for k in lim):
                yield f"{where} {c['name']}: requests {req} differ from limits {lim}"


@_check
def network_policies(docs):
    """Deny by default, in and out, for every pod; then exactly the paths of PATHS (by component, peer and port
    list), which the ports the manifests configure fall in."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    templates = pod_templates(docs)
    components: dict[str, list[dict]] = {}
    for _, t in templates:
        components.setdefault(_component(t), []).append(t["metadata"].get("labels", {}))
    deny = [p for p in policies if p["spec"].get("podSelector") == {} and set(p["spec"].get("policyTypes", []))
            == {"Ingress", "Egress"} and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    if not deny:
        yield "no NetworkPolicy denies all ingress and egress by default"
    for comp, labels in components.items():
        found = {("ingress", comp): {}, ("egress", comp): {}}
        for p in policies:
            if not any(matches(p["spec"].get("podSelector"), lab) for lab in labels):
                continue
            for direction, key, peers in (("ingress", "ingress", "from"), ("egress", "egress", "to")):
                if direction.capitalize() not in p["spec"].get("policyTypes", ["Ingress"]):
                    continue
                for rule in p["spec"].get(key, []):
                    ports = _ports(rule.get("ports"))
                    for peer in rule.get(peers) or [None]:
                        who = ANYWHERE if peer is None else _peer(peer, components)
                        found[(direction, comp)].setdefault(who, set()).update(ports)
        for key, paths in found.items():
            expected = {who: set(ports) for who, ports in PATHS.get(key, {}).items()}
            if paths != expected:
                yield f"{key[0]} of {key[1]}: the policies allow {paths}, the documented paths are {expected}"
        if comp not in {c for _, c in PATHS}:
            yield f"pods of component {comp!r} have no documented network paths"
    yield from _ports_match_the_policies(docs, templates)


def _in_ports(port: int, ports) -> bool:
    for p in ports:
        proto, _, span = p.partition(" ")
        lo, _, hi = span.partition("-")
        if proto == "TCP" and int(lo) <= port <= int(hi or lo):
            return True
    return False


def _ports_match_the_policies(docs, templates):
    for ray in _rayclusters(docs):
        groups = [("head", ray["spec"]["headGroupSpec"])] + [(g["groupName"], g) for g in
                                                              ray["spec"].get("workerGroupSpecs", [])]
        for name, group in groups:
            params = group.get("rayStartParams", {})
            for k in RAY_PORT_PARAMS:
                if k not in params:
                    yield f"RayCluster group {name}: {k} is not pinned (a policy cannot name a random port)"
                elif not _in_ports(int(params[k]), RAY_PORTS):
                    yield f"RayCluster group {name}: {k} {params[k]} is outside the Ray ports the policies allow"
            if params.get("metrics-export-port") != str(RAY_METRICS_PORT):
                yield f"RayCluster group {name}: metrics-export-port is not {RAY_METRICS_PORT}"
        head = ray["spec"]["headGroupSpec"]
        if head.get("rayStartParams", {}).get("dashboard-host", "127.0.0.1") != "127.0.0.1" \
                and head.get("rayStartParams", {}).get("include-dashboard") != "false":
            yield "the Ray dashboard (its job API runs code) listens beyond the head's loopback"
        ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0].get("ports", [])}
        if ports.get("gcs-server", 6379) != 6379 or ports.get("client", 10001) != 10001:
            yield f"the head's GCS and Ray Client ports {ports} are not those the policies allow (6379, 10001)"
    for where, t in templates:
        if _component(t) not in RAY_COMPONENTS:
            continue
        sysctls = {s["name"]: s["value"] for s in t["spec"].get("securityContext", {}).get("sysctls", [])}
        if sysctls.get("net.ipv4.ip_local_port_range", "").split() != [str(p) for p in EPHEMERAL]:
            yield f"{where}: the ephemeral port range is not {EPHEMERAL} (shards bind port 0)"
    for where, t in templates:
        c = t["spec"]["containers"][0]
        named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        comp = _component(t)
        if comp == "router" and (named.get("grpc"), named.get("metrics")) != (50051, 9090):
            yield f"{where}: the router's ports {named} are not those the policies allow (grpc 50051, metrics 9090)"
        if comp == "redis" and named.get("redis") != 6379:
            yield f"{where}: Redis listens on {named}, the policies allow 6379"


@_check
def topology_spread(docs):
    """Workers and routers: at most one more pod on a node than on any other (hard), spread over zones (soft)."""
    for where, t in pod_templates(docs):
        if _component(t) not in ("ray-worker", "router"):
            continue
        got = {(c["topologyKey"], c["whenUnsatisfiable"]) for c in t["spec"].get("topologySpreadConstraints", [])
               if matches(c.get("labelSelector"), t["metadata"].get("labels", {})) and c.get("labelSelector")}
        for want in (("kubernetes.io/hostname", "DoNotSchedule"), ("topology.kubernetes.io/zone", "ScheduleAnyway")):
            if want not in got:
                yield f"{where} has no topology spread over {want[0]} ({want[1]}) selecting its own pods"


@_check
def disruption_budgets(docs):
    """One PodDisruptionBudget per component, selecting its pods (batch pods, Jobs and CronJobs, need none)."""
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for where, t in pod_templates(docs):
        if where.split("/")[0] in ("Job", "CronJob"):
            continue
        hits = [p["metadata"]["name"] for p in pdbs
                if matches(p["spec"]["selector"], t["metadata"].get("labels", {}))]
        if len(hits) != 1:
            yield f"{where} is selected by {len(hits)} PodDisruptionBudgets {hits}, not one"


@_check
def head_fault_tolerance(docs):
    """The RayCluster's GCS is fault tolerant (gcsFaultToleranceOptions, or KubeRay's older ray.io/ft-enabled
    annotation) and its Redis is deployed here: a Service at redisAddress selecting a pod that listens on that port,
    its password from the same Secret key as the head's, over TLS (rediss://, the head checking Redis' certificate
    with RAY_REDIS_CA_CERT)."""
    for ray in _rayclusters(docs):
        ft = ray["spec"].get("gcsFaultToleranceOptions")
        if ft is None:
            annotations = ray["metadata"].get("annotations", {})
            if annotations.get("ray.io/ft-enabled") != "true":
                yield f"RayCluster/{ray['metadata']['name']} has no GCS fault tolerance"
                continue
            env = {e["name"]: e for e in ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
                   .get("env", [])}
            address = env.get("RAY_REDIS_ADDRESS", {}).get("value", "")
            secret = env.get("REDIS_PASSWORD", {}).get("valueFrom", {}).get("secretKeyRef")
        else:
            if ft.get("backend", "redis") != "redis":
                continue  # embedded RocksDB on the head's own volume: no Redis to deploy
            address = ft.get("redisAddress", "")
            secret = ft.get("redisPassword", {}).get("valueFrom", {}).get("secretKeyRef")
        head_env = {e["name"] for e in ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
                    .get("env", [])}
        if not address.startswith("rediss://") or "RAY_REDIS_CA_CERT" not in head_env:
            yield f"the GCS reaches its Redis {address!r} without TLS (rediss:// and RAY_REDIS_CA_CERT on the head)"
        host, _, port = address.removeprefix("redis://").removeprefix("rediss://").partition(":")
        host = host.split(".")[0]
        svc = next((d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == host), None)
        if svc is None:
            yield f"the GCS's Redis {address!r} is no Service of the render"
            continue
        if not secret:
            yield "the GCS's Redis has no password from a Secret"
        served = False
        for where, t in pod_templates(docs):
            if not matches({"matchLabels": svc["spec"]["selector"]}, t["metadata"].get("labels", {})):
                continue
            for c in t["spec"]["containers"]:
                if any(p["containerPort"] == int(port or 6379) for p in c.get("ports", [])):
                    served = True
                    refs = [e.get("valueFrom", {}).get("secretKeyRef") for e in c.get("env", [])]
                    if secret and secret not in refs:
                        yield f"{where}: Redis does not take its password from {secret}"
        if not served:
            yield f"no pod of the render serves the GCS's Redis {address!r}"


@_check
def priority_classes(docs):
    """Every pod names a PriorityClass of the render."""
    classes = {d["metadata"]["name"] for d in docs if d["kind"] == "PriorityClass"}
    for where, t in pod_templates(docs):
        name = t["spec"].get("priorityClassName")
        if name not in classes:
            yield f"{where}: priorityClassName {name!r} is not a PriorityClass of the render"


@_check
def ray_tls(docs):
    """Ray's own TLS on every Ray container, KubeRay's autoscaler and the router (a Ray Client): RAY_USE_TLS=1 and
    the certificate files on a volume the container mounts."""
    for where, t in pod_templates(docs):
        if _component(t) not in RAY_COMPONENTS + ("router",):
            continue
        for c in containers(docs, where, t):
            if c in t["spec"].get("initContainers", []):
                continue
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if env.get("RAY_USE_TLS") != "1":
                yield f"{where} {c['name']}: Ray's TLS is off (RAY_USE_TLS)"
                continue
            mounts = [m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts", [])]
            for k in RAY_TLS_ENV:
                if not any((env.get(k) or "").startswith(m) for m in mounts):
                    yield f"{where} {c['name']}: {k}={env.get(k)} is on no volume it mounts"


@_check
def public_key_off_ray_pods(docs):
    """The router's public certificate and key (the Secret of its LOOKALIKE_TLS_KEY) are on no Ray pod, where Ray
    runs whatever code it is given: the shard hop has its own certificate (LOOKALIKE_INTERNAL_TLS_*)."""
    for where, t in pod_templates(docs):
        if _component(t) != "router":
            continue
        volumes = {v["name"]: v for v in t["spec"].get("volumes", [])}
        for c in t["spec"]["containers"]:
            env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
            if not env.get("LOOKALIKE_TLS_KEY"):
                continue
            if not env.get("LOOKALIKE_INTERNAL_TLS_KEY"):
                yield f"{where} {c['name']}: the shard hop has no certificate of its own (LOOKALIKE_INTERNAL_TLS_*)"
            for m in c.get("volumeMounts", []):
                secret = volumes.get(m["name"], {}).get("secret", {}).get("secretName")
                if secret and env["LOOKALIKE_TLS_KEY"].startswith(m["mountPath"].rstrip("/") + "/"):
                    for other, ot in pod_templates(docs):
                        if _component(ot) in RAY_COMPONENTS and any(
                                v.get("secret", {}).get("secretName") == secret for v in ot["spec"].get("volumes", [])):
                            yield f"{other} mounts {secret}, the router's public certificate and key"


def production_violations(docs) -> dict[str, list[str]]:
    """Every check's violations, by check name (empty: none)."""
    return {fn.__name__: v for fn in CHECKS if (v := list(fn(docs)))}


def check_production_invariants(docs) -> None:
    """Asserts every check of this module on one render (its documents): ServiceAccounts, pod security, writable
    paths and ephemeral storage, volumes that resolve, Guaranteed Ray pods, NetworkPolicies, topology spread,
    disruption budgets, the head's fault tolerance, PriorityClasses, Ray's TLS, the public key off the Ray pods."""
    bad = production_violations(docs)
    assert not bad, "production invariants violated:\n" + "\n".join(
        f"  {name}: {msg}" for name, msgs in bad.items() for msg in msgs)
