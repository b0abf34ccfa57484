"""`lookalike size --kustomize` overlays and the data's claim (k8s/storage): the generated overlays render, validate
strictly and pass every check tests/test_k8s.py makes of the shipped overlays (its `docs` tests, run on them); pods
fit a node's allocatable memory and CPUs; max-shards is what the pods can hold; the claim lives apart from the app,
needs a storage class, and has the size `lookalike size` computes.

Needs `kubectl` (for `kubectl kustomize`); each check skips, saying why, when it is absent. No network.
"""

from __future__ import annotations

import inspect
import re
import shlex
import shutil
import subprocess

import pytest
import yaml

import test_k8s
from lookalike.indexspec import training_points
from tools import sizing, storage_sizing
from tools.cli import build_parser
from tools.cli.common import parse_bytes

ROOT = test_k8s.ROOT
# Every check of test_k8s.py that takes a render (``docs``), the ones added there later included.
DOCS_CHECKS = [f for name, f in sorted(vars(test_k8s).items())
               if name.startswith("test_") and callable(f) and list(inspect.signature(f).parameters) == ["docs"]]


def _kubectl():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize renders are not checked")
    return kubectl


def _render(path) -> tuple[dict, ...]:
    out = subprocess.run([_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


@pytest.fixture
def repo(tmp_path):
    """A copy of k8s/ with the storage class set (k8s/storage/storage.env), as an operator's checkout has it."""
    shutil.copytree(ROOT / "k8s", tmp_path / "repo" / "k8s")
    (tmp_path / "repo" / "k8s" / "storage" / "storage.env").write_text("STORAGE_CLASS=lookalike-rwx\n")
    return tmp_path / "repo"


_write_kustomize_orig = sizing.write_kustomize
CASES = {  # argv of `lookalike size`, and the overlay
    "cpu-4-per-node": ["--vectors", "40000000", "--dim", "128", "--replication", "2", "--node-memory", "64Gi",
                       "--shards-per-node", "4", "--node-cpus", "16"],
    "cpu-ivf-pq": ["--vectors", "300000000", "--dim", "256", "--index", "IVF65536,PQ32", "--replication", "2",
                   "--node-memory", "128Gi", "--node-allocatable", "120Gi", "--shards-per-node", "2"],
    "gpu-2-per-node": ["--vectors", "50000000", "--dim", "128", "--node-memory", "96Gi", "--shards-per-node", "2",
                       "--overlay", "gpu", "--gpu-memory", "24Gi"],
    "cpu-shared-process": ["--vectors", "100000000", "--dim", "128", "--index", "IVF4096,PQ32", "--node-memory",
                           "64Gi", "--shards-per-node", "4", "--shards-per-process", "4"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_generated_overlays_pass_the_checks_of_the_shipped_ones(case, repo, tmp_path, capsys, monkeypatch):
    argv = CASES[case]
    monkeypatch.setattr(sizing, "write_kustomize",
                        lambda *a, **kw: _write_kustomize_orig(*a, **{**kw, "repo_root": str(repo)}))
    from tools import cli

    out = tmp_path / "sized"
    assert cli.main(["size", *argv, "--kustomize", str(out)]) == 0
    text = capsys.readouterr().out
    args = build_parser().parse_args(["size", *argv])
    shard_cpus = args.shard_cpus or (8.0 if args.overlay == "gpu" else 2.0)
    p = sizing.plan(args.vectors, args.dim, args.index, args.metric, args.replication, args.node_memory,
                    args.shards_per_node, gpu_memory=args.gpu_memory, allocatable=args.node_allocatable,
                    shard_cpus=shard_cpus, node_cpus=args.node_cpus, shards_per_process=args.shards_per_process)
    vol = storage_sizing.volume(args.vectors, args.dim, args.index, args.metric, args.replication, p.shards)

    docs = _render(out)
    assert len(DOCS_CHECKS) >= 10, [f.__name__ for f in DOCS_CHECKS]
    # the production invariants (k8s_invariants.check_production_invariants) hold on the generated overlays too
    assert test_k8s.test_production_invariants in DOCS_CHECKS
    for check in DOCS_CHECKS:  # strict schemas, KubeRay's CRD, shards per pod vs max-shards, storage, labels...
        check(docs)
    group = test_k8s._one(docs, "RayCluster")["spec"]["workerGroupSpecs"][0]
    (worker,) = group["template"]["spec"]["containers"]
    res = worker["resources"]
    assert res["requests"] == res["limits"], "Guaranteed QoS"
    allocatable = args.node_allocatable or sizing.node_allocatable(args.node_memory)
    assert parse_bytes(res["limits"]["memory"]) <= allocatable - parse_bytes("1Gi"), \
        f"a worker pod of {res['limits']['memory']} does not fit a node of {allocatable} allocatable bytes"
    assert parse_bytes(res["limits"]["memory"]) < args.node_memory
    assert test_k8s._cpu(res["limits"]["cpu"]) == p.shards_per_node * shard_cpus == \
        float(group["rayStartParams"]["num-cpus"])
    if args.node_cpus:
        assert test_k8s._cpu(res["limits"]["cpu"]) <= sizing.node_allocatable_cpus(args.node_cpus) - 0.5
    if args.overlay == "gpu":
        assert res["limits"]["nvidia.com/gpu"] == str(p.shards_per_node)
    cfg = test_k8s._config(docs)
    shard_memory = parse_bytes(cfg["LOOKALIKE_SHARD_MEMORY"])
    per_pod = min(parse_bytes(res["limits"]["memory"]) // shard_memory,
                  int(float(group["rayStartParams"]["num-cpus"]) // float(cfg["LOOKALIKE_SHARD_CPUS"])))
    assert per_pod == p.shards_per_node, "each pod holds exactly --shards-per-node shards"
    assert int(cfg["LOOKALIKE_MAX_SHARDS"]) == group["maxReplicas"] * per_pod
    assert int(cfg["LOOKALIKE_SHARDS_PER_PROCESS"]) == args.shards_per_process <= per_pod
    assert int(cfg["LOOKALIKE_SHARDS"]) == p.shards <= group["replicas"] * per_pod
    assert f"volume: {storage_sizing.k8s_storage(vol.size)}" in text

    (pvc,) = _render(out / "storage")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "lookalike-data"
    assert pvc["spec"]["resources"]["requests"]["storage"] == storage_sizing.k8s_storage(vol.size)
    assert pvc["spec"]["storageClassName"] == "lookalike-rwx"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_sizes_come_from_node_allocatable_and_max_shards_from_what_pods_hold():
    p = sizing.plan(40_000_000, 128, "Flat", replicas=2, node_memory=64 * sizing.GiB, shards_per_node=4)
    # 64 GiB: 5.48 GiB of kubelet and system reserve and 100 MiB of eviction threshold, then 1 GiB of DaemonSets
    assert sizing.node_allocatable(64 * sizing.GiB) == int(64 * sizing.GiB - 5.48 * sizing.GiB - 100 * sizing.MiB)
    assert p.node_memory_request == 57 * sizing.GiB
    assert p.shard_memory == (57 - 2) * sizing.GiB // 4
    assert p.pod_cpus == 8 and p.max_nodes * p.shards_per_node == 4 * p.max_nodes
    given = sizing.plan(1000, 16, "Flat", node_memory=64 * sizing.GiB, allocatable=60 * sizing.GiB)
    assert given.node_memory_request == 59 * sizing.GiB
    with pytest.raises(ValueError, match="more than a node of 8 CPUs gives a pod"):
        sizing.plan(1000, 16, "Flat", shards_per_node=4, node_cpus=8)
    with pytest.raises(ValueError, match="whole numbers"):
        sizing.plan(1000, 16, "Flat", shards_per_node=3, shard_cpus=0.5)


def test_shards_sharing_a_process_share_its_fixed_memory_and_pay_jemallocs_bytes():
    """tools.sizing: with --shards-per-process, the process's fixed memory is counted once for its shards, and each
    vector pays JEMALLOC_EXTRA (measured at 10M: docs/BENCHMARKS.md)."""
    one = sizing.plan(100_000_000, 128, "IVF4096,PQ32", node_memory=64 * sizing.GiB, shards_per_node=4)
    four = sizing.plan(100_000_000, 128, "IVF4096,PQ32", node_memory=64 * sizing.GiB, shards_per_node=4,
                       shards_per_process=4)
    assert four.per_vector.resident == pytest.approx(one.per_vector.resident + sizing.JEMALLOC_EXTRA)
    assert sizing.process_overhead(4) == (sizing.SHARD_OVERHEAD + 3 * sizing.HOSTED_SHARD_OVERHEAD) / 4
    assert sizing.process_overhead(1) == sizing.SHARD_OVERHEAD
    assert "--shards-per-process 4" in sizing.report(four, 128, "IVF4096,PQ32")
    assert "--shards-per-process" not in sizing.report(one, 128, "IVF4096,PQ32")
    # within 15% of what 4 and 8 shards in one process held at 10M x 128 (83.3 and 87.8 bytes a vector)
    for shards, measured in ((4, 83.3), (8, 87.8)):
        est = shards * sizing.shard_resident_estimate(10_000_000 // shards, 128, "IVF4096,PQ32", id_bytes=7,
                                                      shards_per_process=shards) / 10_000_000
        assert abs(est / measured - 1) < 0.15, (shards, est)
    with pytest.raises(ValueError, match="from 1 to --shards-per-node"):
        sizing.plan(1000, 16, "Flat", shards_per_node=2, shards_per_process=4)


def test_the_training_peak_is_in_the_memory_plan():
    flat = sizing.plan(100_000_000, 256, "Flat", node_memory=32 * sizing.GiB)
    assert sizing.training_peak(256, "Flat", "l2", flat.per_vector) == (0.0, 0)
    pq = sizing.per_vector(256, "IVF65536,PQ32")
    per_item, once = sizing.training_peak(256, "IVF65536,PQ32", "l2", pq)
    assert once == 2 * training_points("IVF65536,PQ32")[1] * 256 * 4  # the training sample, read and joined
    assert training_points("IVF65536,PQ32")[1] == 39 * 65536  # 2.6M vectors: 5.2 GB at that peak
    assert per_item == pytest.approx((pq.code + pq.index) * sizing.ALLOCATOR_FACTOR)  # a second index while moving
    with_peak = sizing.plan(300_000_000, 256, "IVF65536,PQ32", replicas=2, node_memory=32 * sizing.GiB)
    cap = with_peak.shard_memory * 0.8 * 0.7 - sizing.SHARD_OVERHEAD - sizing.COLLECTION_OVERHEAD - sizing.fixed_bytes(
        256, "IVF65536,PQ32") - once
    assert with_peak.shards == -(-int(300_000_000 * 2 * (pq.resident + per_item)) // int(cap))
    assert with_peak.shards > -(-int(300_000_000 * 2 * pq.resident) // int(cap + once))
    assert "training peak of a shard" in sizing.report(with_peak, 256, "IVF65536,PQ32")


def test_the_volume_holds_snapshots_checkpoints_log_and_move_slack():
    v = storage_sizing.volume(100_000_000, 512, "Flat", replicas=2, shards=14)
    assert 410e9 < v.snapshots < 420e9  # the figure: 100M x 512-d x 2 copies of raw vectors
    snap, ckpt = storage_sizing.item_bytes(512, "Flat")
    assert (snap, ckpt) == (2048 + 16 + 2, 2048 + 8 + 20 + 16)  # table row: label, offset (uint32), payload length
    assert v.checkpoints == v.checkpoint_rewrite == 2e8 * ckpt
    assert v.size == pytest.approx(v.peak / 0.7) and v.peak > v.steady + v.log
    pq_snap, pq_ckpt = storage_sizing.item_bytes(512, "IVF4096,PQ64", payload_bytes=100)
    assert pq_snap == 2048 + 16 + 2 + 102 and pq_ckpt < pq_snap / 10  # snapshots keep the originals


def test_the_shipped_claim_lives_apart_requires_a_class_and_has_the_computed_size(tmp_path):
    kubectl = _kubectl()
    for target in test_k8s.TARGETS:  # `kubectl delete -k` of the app leaves the data
        assert not [d for d in test_k8s._render(target) if d["kind"] == "PersistentVolumeClaim"], target
    assert "storage.yaml" not in (ROOT / "k8s" / "base" / "kustomization.yaml").read_text()
    shutil.copytree(ROOT / "k8s" / "storage", tmp_path / "storage")
    failed = subprocess.run([kubectl, "kustomize", str(tmp_path / "storage")], capture_output=True, text=True)
    assert failed.returncode != 0 and "storage.env" in failed.stderr, "the claim renders without a storage class"
    (tmp_path / "storage" / "storage.env").write_text("SOMETHING_ELSE=1\n")
    failed = subprocess.run([kubectl, "kustomize", str(tmp_path / "storage")], capture_output=True, text=True)
    assert failed.returncode != 0 and "STORAGE_CLASS" in failed.stderr
    shutil.copy(ROOT / "k8s" / "storage" / "storage.env.example", tmp_path / "storage" / "storage.env")
    (pvc,) = _render(tmp_path / "storage")
    example = (ROOT / "k8s" / "storage" / "storage.env.example").read_text()
    placeholder = re.search(r"^STORAGE_CLASS=(.*)$", example, re.M).group(1)
    assert pvc["spec"]["storageClassName"] == placeholder
    # the placeholder is no valid class name (a DNS subdomain): the API server refuses the claim until it is set
    assert not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", placeholder)
    assert pvc["metadata"]["namespace"] == test_k8s.NAMESPACE and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # The size is what the command in pvc.yaml's comment prints as the volume.
    command = re.search(r"^#\s+lookalike (size .*)$", (ROOT / "k8s" / "storage" / "pvc.yaml").read_text(), re.M)
    args = build_parser().parse_args(shlex.split(command.group(1)))
    p = sizing.plan(args.vectors, args.dim, args.index, args.metric, args.replication, args.node_memory)
    vol = storage_sizing.volume(args.vectors, args.dim, args.index, args.metric, args.replication, p.shards,
                                args.id_bytes, args.payload_bytes, args.buckets, args.disk_headroom)
    assert pvc["spec"]["resources"]["requests"]["storage"] == storage_sizing.k8s_storage(vol.size)


def test_the_volume_model_matches_what_a_real_cluster_writes():
    """A real local cluster's data directory, by kind, against the model's bytes per vector (within 3%)."""
    m = storage_sizing.measure_storage(20_000, 32, "Flat", replicas=2, shards=2, payload_bytes=40)
    snap, ckpt = storage_sizing.item_bytes(32, "Flat", id_bytes=16, payload_bytes=40)
    assert m["per_copy"]["snapshots and log"] == pytest.approx(snap, rel=0.03), m
    assert m["per_copy"]["checkpoints"] == pytest.approx(ckpt, rel=0.03), m


def test_the_deploy_guide_shows_real_size_output_and_commands_that_parse(tmp_path, capsys):
    from tools import cli

    doc = (ROOT / "docs" / "DEPLOY.md").read_text()
    section = doc.split("## Storage, sizing, backup and restore", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^\s*lookalike ((?:size|backup|restore)\b[^\n#`]*)", section, flags=re.M)
    assert {c.split()[0] for c in commands} == {"size", "backup", "restore"}
    for line in commands:
        build_parser().parse_args(shlex.split(line))
    m = re.search(r"^lookalike (size [^\n]*)\n((?:# [^\n]*\n)+)", section, flags=re.M)
    argv = shlex.split(m.group(1))
    argv[argv.index("--kustomize") + 1] = str(tmp_path / "sized")
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line[2:] for line in m.group(2).splitlines()] == printed[:len(m.group(2).splitlines())]
