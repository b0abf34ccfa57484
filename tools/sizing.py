"""``lookalike size``: memory per vector for an index, and the shards, nodes and memory requests a catalog needs.

The estimate of a shard's resident memory is what a shard holds per item (shard/cpu_index.py, shard/idtable.py's
``IdTable``) times a measured allocator factor, plus the fixed cost of a shard process:

- the index's code for the vector: FAISS's ``sa_code_size()`` of the factory string (Flat: 4 x dim bytes, PQm: m,
  SQ8: dim...);
- the index's per-item structures: 8 bytes of id in ``IndexIDMap`` (Flat, PQ, SQ) or in the inverted list (IVF),
  no more (no IVF direct map: removal and Get do not need one, see shard/cpu_index.py); for IVF, what growing lists
  cost beyond their contents once a shard has packed them (it does when the writes stop, to exactly their length):
  ``IVF_LIST_HEAP`` bytes of heap, measured on a shard whose collection's index was trained before its items
  arrived, as in a cluster, in a shard process's environment (shard.osutil.SHARD_PROCESS_ENV): IVF1024,Flat at
  d=128, 300k vectors: 564 bytes a vector against FAISS's 522 and 580 here; IVF1024,PQ16: 66 against 61 here;
  IVF256,PQ16 at d=64: 49 against 54 here (bench/memory_bench.py, tests/test_sizing.py); for HNSW, the level-0
  links (2 x M x 4 bytes), the upper levels (about 4 bytes an item), 8 bytes of position -> label and 4 of
  positions sorted by label;
- the id table: 12 bytes an item (label, offset) plus the id's UTF-8 bytes;
- the payload: its serialized bytes plus 33 bytes of Python bytes object and 8 of pointer in the id table, when
  there is one;
- x ``ALLOCATOR_FACTOR`` (1.05): allocator slack;
- plus, per collection on a shard, ``COLLECTION_OVERHEAD`` (1 MiB: storage buffers; opening one measured 0.5-0.85
  MiB beyond its fixed part) and the index's fixed part (:func:`fixed_bytes`: IVF centroids, IVF-PQ's precomputed
  distance tables of nlist x M x 256 floats up to 16 MiB, 16 MiB for IVF1024,PQ16; larger ones are not kept, see
  shard.specs.drop_precomputed_tables), and
  ``SHARD_OVERHEAD`` per shard process (Python, numpy, FAISS, gRPC, Ray's worker, BLAS buffers: 150 MiB; an empty
  shard measured 128-138 MiB);
- shards sharing a process (``shards_per_process`` > 1, serve ``--shards-per-process``): ``SHARD_OVERHEAD`` once a
  process plus ``HOSTED_SHARD_OVERHEAD`` for each further shard (8 empty shards in one process measured 145-157
  MiB), and ``JEMALLOC_EXTRA`` bytes a vector: such a process allocates with jemalloc (shard.osutil), which held
  155-161 MB beyond its live allocations at 10M x 128 IVF4096,PQ32 on 4 and 8 shards (its metadata over the
  address space a load used, size-class rounding and part-used slabs; docs/BENCHMARKS.md, "4 and 8 shards in one
  process at 10M").

``measure_shard`` loads a known number of vectors into a real shard; tests/test_sizing.py checks the estimate
against it for Flat and IVF-PQ (within 15%).

Then: a shard is sized to stay under the controller's growth threshold (80% of ``--shard-memory``, see
``MovePolicy.high_water``) with ``--headroom`` left for growth, less its training peak (:func:`training_peak`);
each node runs one worker pod of the node's allocatable memory (:func:`node_allocatable`) less the DaemonSets', which
holds ``--shards-per-node`` shards of ``--shard-cpus`` each and keeps ``--reserve`` for Ray's own processes and the
object store. :func:`write_kustomize` writes that as kustomize patches. The volume is tools.storage_sizing's.

May use: the base package (lookalike) and shard (a real shard, for ``measure_shard``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
import tempfile

import faiss
import numpy as np

from lookalike.config import CollectionConfig
from lookalike.indexspec import check_spec, training_points
from shard.cpu_index import VectorIndex
from shard.osutil import release_memory
from shard.shard import Shard
from shard.specs import PRECOMPUTED_TABLE_MAX_BYTES, build_index
from shard.trained import write_template

GiB = 1 << 30
MiB = 1 << 20
ALLOCATOR_FACTOR = 1.05
SHARD_OVERHEAD = 150 * MiB
HOSTED_SHARD_OVERHEAD = 2 * MiB
JEMALLOC_EXTRA = 16
COLLECTION_OVERHEAD = 1 * MiB
IVF_LIST_HEAP = 8
_IDTABLE = 12  # label (int64) and offset (uint32) in shard.idtable.IdTable
_BYTES_OBJECT = 33
_PAYLOAD_POINTER = 8  # the id table's payload array, once any item has a payload


@dataclasses.dataclass
class PerVector:
    """Bytes a shard holds for one item, by part."""

    code: int
    index: float
    ids: int
    payload: int
    allocator: float = 0.0  # bytes a vector the allocator holds beyond its slack (jemalloc: shards sharing a process)

    @property
    def raw(self) -> float:
        return self.code + self.index + self.ids + self.payload

    @property
    def resident(self) -> float:
        """With the allocator's slack: what the shard's resident memory grows by per item."""
        return self.raw * ALLOCATOR_FACTOR + self.allocator


def per_vector(dim: int, index: str, metric: str = "l2", id_bytes: int = 16, payload_bytes: int = 0,
               shards_per_process: int = 1) -> PerVector:
    """Bytes per item on a shard for a FAISS factory string (see the module docstring); ``shards_per_process`` > 1
    adds jemalloc's ``JEMALLOC_EXTRA``.

    Raises:
        lookalike.errors.InvalidArgument: a spec lookalike does not support (lookalike.indexspec), with its sentence.
    """
    spec = index
    if metric == "hamming" and not spec.startswith("B"):
        spec = "B" + spec
    check_spec(spec, dim, metric == "hamming")  # the grammar's sentence, before FAISS parses (or aborts on) it
    built = build_index(dim, metric, spec)
    if isinstance(built, faiss.IndexBinary):
        code = built.code_size
    else:
        try:
            code = int(built.sa_code_size())
        except RuntimeError:  # HNSW and others without a standalone codec: the storage's codes
            storage = getattr(built, "storage", None)
            code = int(storage.sa_code_size()) if storage is not None else 4 * dim
    idx: float = 8.0  # the id in IndexIDMap, or in an inverted list
    if re.search(r"(^|,)B?IVF\d+", spec):
        idx += IVF_LIST_HEAP
    m = re.search(r"HNSW(\d+)", spec)
    if m:
        links = int(m.group(1))
        # level-0 links, upper levels (about 1/M of the items with M links), position -> label (8), positions
        # sorted by label (4)
        idx = 2 * links * 4 + 4 + 8 + 4
    payload = payload_bytes + _BYTES_OBJECT + _PAYLOAD_POINTER if payload_bytes else 0
    return PerVector(code=code, index=idx, ids=_IDTABLE + id_bytes, payload=payload,
                     allocator=JEMALLOC_EXTRA if shards_per_process > 1 else 0.0)


def process_overhead(shards_per_process: int = 1) -> float:
    """A shard's part of its process's fixed memory: ``SHARD_OVERHEAD``, or shared with the other shards of its
    process (see the module docstring)."""
    return (SHARD_OVERHEAD + (shards_per_process - 1) * HOSTED_SHARD_OVERHEAD) / shards_per_process


def fixed_bytes(dim: int, index: str, metric: str = "l2") -> int:
    """Bytes of an index that do not grow with its vectors, on every shard holding the collection: the IVF coarse
    centroids, and IVF-PQ's precomputed distance tables (nlist x M x 2^bits floats, L2 only) where a shard keeps
    them (up to ``shard.specs.PRECOMPUTED_TABLE_MAX_BYTES``)."""
    m = re.search(r"(^|,)B?IVF(\d+)", index)
    if not m:
        return 0
    nlist = int(m.group(2))
    if metric == "hamming":
        return nlist * dim // 8
    out = nlist * dim * 4
    pq = re.search(r"IVF\d+(?:_HNSW\d+)?,PQ(\d+)(?:x(\d+))?", index)
    if pq and metric == "l2":
        tables = nlist * int(pq.group(1)) * (1 << int(pq.group(2) or 8)) * 4
        out += tables if tables <= PRECOMPUTED_TABLE_MAX_BYTES else 0
    return out


@dataclasses.dataclass
class Plan:
    vectors: int
    replicas: int
    per_vector: PerVector
    data_bytes: float  # resident bytes of all copies, without process overhead
    shard_memory: int  # --shard-memory to give each shard
    shards: int
    shards_per_node: int
    nodes: int
    node_memory_request: int  # memory request and limit of each shard node's worker pod
    gpu: dict | None
    allocatable: int = 0  # memory the kubelet lets pods have on a node
    node_memory: int = 0  # the node's memory, as given
    shard_cpus: float = 2.0
    training: tuple[float, int] = (0.0, 0)  # training peak of a shard: (bytes per item it holds, bytes once)
    shards_per_process: int = 1

    @property
    def pod_cpus(self) -> int:
        """CPUs of each worker pod (its request, limit and Ray's num-cpus): one share per shard."""
        return round(self.shards_per_node * self.shard_cpus)

    @property
    def max_nodes(self) -> int:
        """The worker group's maxReplicas: room to grow to twice the shards."""
        return max(2 * self.nodes, self.nodes + 1)


# The kubelet's and the system's reserve and the eviction threshold, as GKE and AKS compute them (EKS and others
# are close; `kubectl get node NODE -o jsonpath='{.status.allocatable}'` gives a node's exact figure, for
# --node-allocatable): of the memory, 25% of the first 4 GiB, 20% of the next 4, 10% of the next 8, 6% of the
# next 112 and 2% above 128 GiB, plus 100 MiB; of the CPUs, 6% of the first, 1% of the second, 0.5% of the next
# two and 0.25% of the rest.
_MEMORY_RESERVE = ((4 * GiB, 0.25), (4 * GiB, 0.20), (8 * GiB, 0.10), (112 * GiB, 0.06), (math.inf, 0.02))
_CPU_RESERVE = ((1, 0.06), (1, 0.01), (2, 0.005), (math.inf, 0.0025))
EVICTION_THRESHOLD = 100 * MiB


def _tiers(amount: float, tiers) -> float:
    out, left = 0.0, amount
    for size, share in tiers:
        take = min(left, size)
        out, left = out + take * share, left - take
    return out


def node_allocatable(node_memory: int) -> int:
    """The memory a node of ``node_memory`` bytes lets pods have (see _MEMORY_RESERVE)."""
    return int(node_memory - _tiers(node_memory, _MEMORY_RESERVE) - EVICTION_THRESHOLD)


def node_allocatable_cpus(node_cpus: float) -> float:
    return node_cpus - _tiers(node_cpus, _CPU_RESERVE)


def training_peak(dim: int, index: str, metric: str, pv: PerVector) -> tuple[float, int]:
    """What training an index adds to a shard's memory at its peak, for a spec that needs training (else (0, 0)):
    (bytes per item the shard holds, bytes once). Per item: moving into a new trained version builds the new index
    beside the old one (shard.training.adopt_trained), a second copy of the codes and index structures. Once: the
    shard that trains reads the training sample from storage (lookalike.indexspec.training_points: up to 500k
    vectors) in parts and joins them, two copies of it."""
    needed, sample = training_points(("B" + index) if metric == "hamming" and not index.startswith("B") else index)
    if not needed:
        return 0.0, 0
    vec = dim // 8 if metric == "hamming" else 4 * dim
    return (pv.code + pv.index) * ALLOCATOR_FACTOR, 2 * sample * vec


def plan(vectors: int, dim: int, index: str, metric: str = "l2", replicas: int = 1, node_memory: int = 64 * GiB,
         shards_per_node: int = 1, headroom: float = 0.3, reserve: int = 2 * GiB, id_bytes: int = 16,
         payload_bytes: int = 0, gpu_memory: int = 0, gpu_float16: bool = False, high_water: float = 0.8,
         allocatable: int | None = None, daemonset_memory: int = 1 * GiB, shard_cpus: float = 2.0,
         node_cpus: float | None = None, daemonset_cpus: float = 0.5, shards_per_process: int = 1) -> Plan:
    """Shards and nodes for ``vectors`` items of ``dim`` in ``index``, ``replicas`` copies each.

    Each node runs one worker pod, which gets the node's allocatable memory (``allocatable``, else
    :func:`node_allocatable` of ``node_memory``) less ``daemonset_memory`` (the DaemonSets' pods on every node);
    that, less ``reserve`` for Ray's own processes, is split between ``shards_per_node`` shards: each shard's
    capacity (``--shard-memory``). A shard is filled to ``high_water`` x capacity x (1 - headroom) at most, less its
    training peak (:func:`training_peak`), so that the data can grow by ``headroom`` before the controller's
    automatic growth (at ``high_water``) adds shards. The pod has ``shard_cpus`` CPUs per shard; with
    ``node_cpus``, they must fit the node's allocatable CPUs less ``daemonset_cpus``. ``shards_per_process``: shards
    sharing one process (at most a pod's), which share its fixed memory and allocate with jemalloc.
    """
    if vectors < 0 or dim <= 0 or replicas < 1 or shards_per_node < 1 or not 0 <= headroom < 1:
        raise ValueError("vectors >= 0, dim > 0, replicas >= 1, shards per node >= 1, 0 <= headroom < 1")
    if not 1 <= shards_per_process <= shards_per_node:
        raise ValueError(f"--shards-per-process {shards_per_process}: from 1 to --shards-per-node "
                         f"({shards_per_node}); a process holds its shards' CPUs and memory together, on one node")
    pod_cpus = shards_per_node * shard_cpus
    if shard_cpus <= 0 or abs(pod_cpus - round(pod_cpus)) > 1e-9:
        raise ValueError(f"--shards-per-node {shards_per_node} x --shard-cpus {shard_cpus:g} is {pod_cpus:g} CPUs: "
                         "Ray counts a pod's CPUs in whole numbers; make it one")
    if node_cpus is not None and pod_cpus > node_allocatable_cpus(node_cpus) - daemonset_cpus:
        raise ValueError(f"{shards_per_node} shard(s) of {shard_cpus:g} CPUs need {pod_cpus:g} CPUs, more than a node "
                         f"of {node_cpus:g} CPUs gives a pod ({node_allocatable_cpus(node_cpus):.2f} allocatable, "
                         f"less {daemonset_cpus:g} for DaemonSets): fewer --shards-per-node, fewer --shard-cpus or "
                         "bigger nodes")
    pv = per_vector(dim, index, metric, id_bytes, payload_bytes, shards_per_process)
    allocatable = node_allocatable(node_memory) if allocatable is None else allocatable
    pod_memory = parse_quantity(k8s_quantity(allocatable - daemonset_memory, floor=True))
    shard_memory = parse_quantity(k8s_quantity((pod_memory - reserve) / shards_per_node, floor=True))
    per_item_peak, once_peak = training_peak(dim, index, metric, pv)
    fill = (shard_memory * high_water * (1 - headroom) - process_overhead(shards_per_process) - COLLECTION_OVERHEAD
            - fixed_bytes(dim, index, metric) - once_peak)
    if fill <= 0 or pod_memory <= reserve:
        raise ValueError(f"a node of {node_memory / GiB:.1f} GiB ({allocatable / GiB:.1f} GiB allocatable, less "
                         f"{daemonset_memory / GiB:.1f} GiB for DaemonSets) leaves no room for data after "
                         f"{reserve / GiB:.1f} GiB reserved for Ray and {shards_per_node} shard process(es)"
                         + (f" with a training peak of {format_bytes(once_peak)}" if once_peak else "")
                         + ": give --node-memory more")
    data = vectors * replicas * pv.resident
    shards = max(replicas, math.ceil(vectors * replicas * (pv.resident + per_item_peak) / fill))
    gpu = None
    if gpu_memory:
        # On GPU shards the GPU holds a mirror of the index (the vectors' codes, float16 when asked, and its ids).
        code = pv.code / 2 if gpu_float16 and re.fullmatch(r"Flat", index) else pv.code
        gpu_pv = code + 8
        gpu_fill = gpu_memory * high_water * (1 - headroom)
        gpu_shards = max(replicas, math.ceil(vectors * replicas * gpu_pv / gpu_fill))
        shards = max(shards, gpu_shards)
        gpu = {"bytes_per_vector": gpu_pv, "gpu_memory": gpu_memory, "shards_for_gpu_memory": gpu_shards}
    nodes = math.ceil(shards / shards_per_node)
    return Plan(vectors, replicas, pv, data, shard_memory, shards, shards_per_node, nodes, pod_memory, gpu,
                allocatable, node_memory, shard_cpus, (per_item_peak, once_peak), shards_per_process)


def shard_resident_estimate(vectors: int, dim: int, index: str, metric: str = "l2", id_bytes: int = 16,
                            payload_bytes: int = 0, shards_per_process: int = 1) -> float:
    """Resident memory a collection of ``vectors`` items adds to a shard (bytes)."""
    return (COLLECTION_OVERHEAD + fixed_bytes(dim, index, metric)
            + vectors * per_vector(dim, index, metric, id_bytes, payload_bytes, shards_per_process).resident)


def format_bytes(n: float) -> str:
    for unit, f in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{n:.0f} B"


def k8s_quantity(n: float, floor: bool = False) -> str:
    """Bytes as a Kubernetes quantity, rounded up (``floor``: down) to a MiB, or a GiB above 16 GiB."""
    step = math.floor if floor else math.ceil
    if n >= 16 * GiB:
        return f"{step(n / GiB)}Gi"
    return f"{step(n / MiB)}Mi"


def parse_quantity(q: str) -> int:
    """A quantity of :func:`k8s_quantity` back in bytes."""
    return int(q[:-2]) * (GiB if q.endswith("Gi") else MiB)


def report(p: Plan, dim: int, index: str) -> str:
    pv = p.per_vector
    fixed = fixed_bytes(dim, index)
    per_item_peak, once_peak = p.training
    lines = [
        f"{p.vectors:,} vectors of dim {dim} in {index!r}, {p.replicas} cop{'y' if p.replicas == 1 else 'ies'} each",
        f"  bytes per vector: {pv.code} code + {pv.index:g} index + {pv.ids} id table"
        + (f" + {pv.payload} payload" if pv.payload else "")
        + f" = {pv.raw:g}; resident with allocator slack (x{ALLOCATOR_FACTOR}"
        + (f", + {pv.allocator:g} of jemalloc's, shards sharing a process" if pv.allocator else "")
        + f"): {pv.resident:.0f}",
        f"  data in memory, all copies: {format_bytes(p.data_bytes)}"
        + (f", plus {format_bytes(fixed)} of index a shard holds whatever its vectors (IVF centroids, PQ tables)"
           if fixed else ""),
    ]
    if once_peak:
        lines.append(f"  training peak of a shard: {per_item_peak:.0f} bytes per vector (the new trained index beside "
                     f"the old) + {format_bytes(once_peak)} (the training sample, on the shard that trains)")
    lines += [
        f"  shards: {p.shards} ({p.shards_per_node} per node), each with --shard-memory {k8s_quantity(p.shard_memory)}"
        f" and --shard-cpus {p.shard_cpus:g} (filled to about "
        f"{format_bytes(p.data_bytes / p.shards + process_overhead(p.shards_per_process) + COLLECTION_OVERHEAD + fixed)}"
        " now)" + (f", {p.shards_per_process} a process" if p.shards_per_process > 1 else ""),
        f"  nodes: {p.nodes} shard node(s) of {format_bytes(p.node_memory)} ({format_bytes(p.allocatable)} "
        f"allocatable), one worker pod each: memory {k8s_quantity(p.node_memory_request)}, {p.pod_cpus} CPUs; "
        f"growth up to {p.max_nodes * p.shards_per_node} shards on {p.max_nodes} nodes",
    ]
    if p.gpu:
        lines.append(f"  GPU: {p.gpu['bytes_per_vector']:g} bytes per vector on the GPU; "
                     f"{p.gpu['shards_for_gpu_memory']} shard(s) for {format_bytes(p.gpu['gpu_memory'])} GPUs")
    lines.append(f"  serve with: lookalike serve --shards {p.shards} --shard-memory {k8s_quantity(p.shard_memory)} "
                 f"--shard-cpus {p.shard_cpus:g} --max-shards {p.max_nodes * p.shards_per_node}"
                 + (f" --shards-per-process {p.shards_per_process}" if p.shards_per_process > 1 else ""))
    return "\n".join(lines)


def measure_shard(vectors: int, dim: int, index: str, metric: str = "l2", seed: int = 0, batch: int = 20000) -> dict:
    """Loads ``vectors`` random items (ids ``str(i)``) into a real shard in this process and returns its resident
    memory before and after (bytes). Meant for a fresh process (tests run it in a subprocess)."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        shard = Shard("size-0", tmp)
        cfg = CollectionConfig("sized", dim, metric, index=index, buckets=16).validated()
        sample = training_points(cfg.index)[1]
        if sample:  # as in a cluster: the collection's trained index first (shard.trained), then the items
            x = rng.standard_normal((min(sample, vectors), dim)).astype(np.float32)
            write_template(tmp, cfg, 1, VectorIndex(cfg).train_template(x), len(x), 0.0)
            cfg = dataclasses.replace(cfg, trained_version=1)
        release_memory()
        unopened = shard.memory_bytes()
        shard.open_collection(cfg, range(16))
        sc = shard.collection("sized")
        release_memory()
        opened = shard.memory_bytes()
        # one warm-up write, and BLAS's and OpenMP's per-thread buffers (k-means, large searches), so that what
        # every shard pays once is not counted as data
        sc.upsert(["warm"], rng.standard_normal((1, dim)).astype(np.float32), [None])
        sc.delete(["warm"])
        import faiss
        faiss.Kmeans(dim, 16, niter=2).train(rng.standard_normal((4096, dim)).astype(np.float32))
        release_memory()
        before = shard.memory_bytes()
        for i in range(0, vectors, batch):
            n = min(batch, vectors - i)
            x = rng.standard_normal((n, dim)).astype(np.float32)
            sc.upsert([str(j) for j in range(i, i + n)], x, [None] * n)
        with sc._write_order:
            sc.upkeep.repack_if_due()  # what the shard does once the writes stop (compressed IVF lists packed)
        sc.store.compact()  # what a background compaction would do (waits for one that is running)
        release_memory()
        after = shard.memory_bytes()
        out = {"vectors": vectors, "before": before, "after": after, "grew": after - before,
               "opened": opened - unopened,  # what opening the collection cost (its fixed part and buffers)
               "index_bytes": sc.index.nbytes, "table_bytes": sc.table.nbytes, "trained": sc.index.trained}
        shard.close()
    return out


def write_kustomize(p: Plan, out_dir: str, overlay: str = "cpu", repo_root: str | None = None,
                    volume: str | None = None) -> list[str]:
    """Writes an overlay over ``k8s/overlays/<overlay>`` (kustomize patches: the rest, its hardening included, is
    the overlay's) that sizes the shard worker group and the settings for plan ``p`` together: worker pods
    (replicas = min = the nodes, max = :attr:`Plan.max_nodes`), each pod's memory and CPUs (requests = limits, and
    Ray's num-cpus; its GPUs in the GPU overlay, one per shard), and the ConfigMap's shard count, shard memory and
    CPUs, and growth bound (max-shards = maxReplicas x shards per pod, what the pods can hold). With ``volume`` (a
    quantity), also ``<out_dir>/storage``: an overlay over ``k8s/storage`` that sizes the data's claim. Returns the
    files written."""
    root = pathlib.Path(repo_root or pathlib.Path(__file__).resolve().parent.parent)
    base = root / "k8s" / "overlays" / overlay
    if not base.is_dir():
        raise ValueError(f"no overlay {overlay!r} under {root / 'k8s' / 'overlays'}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    group = "/spec/workerGroupSpecs/0"
    ops = [("replicas", p.nodes), ("minReplicas", p.nodes), ("maxReplicas", p.max_nodes),
           ("rayStartParams/num-cpus", f'"{p.pod_cpus}"')]
    resources = f"template/spec/containers/0/resources"
    for kind in ("requests", "limits"):
        ops += [(f"{resources}/{kind}/memory", k8s_quantity(p.node_memory_request)),
                (f"{resources}/{kind}/cpu", f'"{p.pod_cpus}"')]
        if overlay == "gpu":  # one GPU per shard (LOOKALIKE_SHARD_GPUS is 1 there)
            ops.append((f"{resources}/{kind}/nvidia.com~1gpu", f'"{p.shards_per_node}"'))
    lines = [f"# written by `lookalike size`: {p.vectors:,} vectors x {p.replicas} copies, {p.shards} shards on "
             f"{p.nodes} node(s), {p.shards_per_node} per pod"]
    for path, value in ops:
        lines += ["- op: replace", f"  path: {group}/{path}", f"  value: {value}"]
    (out / "raycluster-size.yaml").write_text("\n".join(lines) + "\n")
    (out / "config-size.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: lookalike-config\ndata:\n"
        f'  LOOKALIKE_SHARDS: "{p.shards}"\n  LOOKALIKE_SHARD_MEMORY: {k8s_quantity(p.shard_memory)}\n'
        f'  LOOKALIKE_SHARD_CPUS: "{p.shard_cpus:g}"\n'
        f'  LOOKALIKE_MAX_SHARDS: "{p.max_nodes * p.shards_per_node}"\n'
        f'  LOOKALIKE_SHARDS_PER_PROCESS: "{p.shards_per_process}"\n')
    (out / "kustomization.yaml").write_text(
        "# written by `lookalike size --kustomize`: apply with `kubectl apply -k` on this folder (the data's claim:\n"
        "# `kubectl apply -k storage` in it, first)\n"
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(base, out)}\n"
        "patches:\n  - path: raycluster-size.yaml\n"
        "    target: {group: ray.io, version: v1, kind: RayCluster, name: lookalike}\n"
        "  - path: config-size.yaml\n")
    files = [out / f for f in ("kustomization.yaml", "raycluster-size.yaml", "config-size.yaml")]
    if volume:
        storage = out / "storage"
        storage.mkdir(exist_ok=True)
        (storage / "kustomization.yaml").write_text(
            "# written by `lookalike size --kustomize`: the data's claim of k8s/storage (its class from\n"
            "# k8s/storage/storage.env) with the volume `lookalike size` computed. Apply it before the app.\n"
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources:\n  - {os.path.relpath(root / 'k8s' / 'storage', storage)}\n"
            "patches:\n  - target: {version: v1, kind: PersistentVolumeClaim, name: lookalike-data}\n"
            "    patch: |\n      - op: replace\n        path: /spec/resources/requests/storage\n"
            f"        value: {volume}\n")
        files.append(storage / "kustomization.yaml")
    return [str(f) for f in files]
