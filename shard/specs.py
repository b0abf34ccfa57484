"""The FAISS side of a collection's index spec: the index a factory string builds, whether it builds at all for a
dimension and metric, how it runs on a GPU shard, and how many vectors it needs before it is trained.

The grammar of a spec (and its size bounds) is lookalike.indexspec's; this module is where FAISS sees the spec.
A ``CAGRA`` spec (a GPU graph, cuVS) builds a flat index: its CPU source of truth (see shard.gpu_keeper).

Uses faiss and the base package (lookalike) only.
"""

from __future__ import annotations

import re

import faiss

from lookalike import gpu as gpu_mod
from lookalike.errors import InvalidArgument
from lookalike.indexspec import check_spec, training_points

FAISS_METRIC = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT, "cosine": faiss.METRIC_INNER_PRODUCT}
FLAT_TYPES = (faiss.IndexFlat, faiss.IndexFlatL2, faiss.IndexFlatIP)
_IVF_GPU_TYPES = (faiss.IndexIVFFlat, faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer)

# "CAGRA" / "CAGRA<graph degree>": a GPU graph (cuVS); its CPU source of truth is a flat index.
_CAGRA_RE = re.compile(r"^CAGRA(\d*)$")
_CAGRA_DEGREE = 64


def faiss_reason(err: Exception) -> str:
    """The last line of an error's message (FAISS raises RuntimeError with its whole C++ context), or the error's
    type when it has no message."""
    return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__


def cagra_degree(spec: str) -> int | None:
    """The graph degree of a ``CAGRA`` spec; None for any other spec."""
    m = _CAGRA_RE.match(spec)
    return (int(m.group(1)) if m.group(1) else _CAGRA_DEGREE) if m else None


def build_index(dim: int, metric: str, spec: str):
    """A new, empty FAISS index of factory string ``spec`` (binary for metric "hamming")."""
    if metric == "hamming":
        return faiss.index_binary_factory(dim, spec)
    if cagra_degree(spec) is not None:
        return faiss.IndexFlat(dim, FAISS_METRIC[metric])  # exact on CPU; the graph lives on the GPU
    return without_polysemous_training(faiss.index_factory(dim, spec, FAISS_METRIC[metric]))


def without_polysemous_training(index):
    """``index`` with FAISS's polysemous training turned off in every PQ it holds, and returned. FAISS's factory
    asks for it on each "PQ<m>" code unless the spec ends in "np": it orders a PQ's centroids so that Hamming
    distances between codes filter candidates (``polysemous_ht``), which no lookalike search sets. It cost a
    minute or more of each IVF-PQ32 training on this 2-core machine, 1.6-7 times the rest (bench/train_bench.py;
    docs/BENCHMARKS.md, "Training IVF-PQ without polysemous training"). The codes are the same up to the order of
    each codebook's centroids, so searches find what they found."""
    part = index
    while part is not None:
        part = faiss.downcast_index(part)
        if hasattr(part, "do_polysemous_training"):  # IndexPQ, IndexIVFPQ (and IVFPQR)
            part.do_polysemous_training = False
        # inside a transform or an id map (index), a graph (storage), a refinement (base_index)
        part = next((getattr(part, a) for a in ("index", "storage", "base_index") if getattr(part, a, None)), None)
    return index


def gpu_kind(spec: str, metric: str, index) -> str | None:
    """How an index runs on a GPU shard: "flat", "ivf" or "cagra" (a GPU mirror), or None (on the CPU)."""
    if metric == "hamming":
        return None
    if cagra_degree(spec) is not None:
        return "cagra"
    if isinstance(index, faiss.IndexIDMap):
        index = faiss.downcast_index(index.index)
    if type(index) in FLAT_TYPES:
        return "flat"
    if type(index) in _IVF_GPU_TYPES and type(faiss.downcast_index(index.quantizer)) in FLAT_TYPES:
        return "ivf"
    return None


def check_index_spec(dim: int, metric: str, spec: str, gpu_float16: bool = False) -> None:
    """Raises InvalidArgument, with FAISS's reason, when the factory string does not build for dim and metric
    (or is not in the grammar of lookalike.indexspec, or asks for CAGRA from a faiss build without cuVS, or
    gpu_float16 where it means nothing)."""
    check_spec(spec, dim, metric == "hamming")
    if cagra_degree(spec) is not None:
        if not gpu_mod.has_cuvs():
            raise InvalidArgument(
                f"index {spec!r} needs FAISS built with cuVS (GPU CAGRA), and this faiss build has none "
                f"({gpu_mod.faiss_build()}): use 'HNSW32' for a graph index, or install a faiss-gpu build with cuVS")
    try:
        index = build_index(dim, metric, spec)
    except Exception as err:  # FAISS raises RuntimeError with its C++ message
        raise InvalidArgument(f"index {spec!r} cannot be built for dim={dim}, metric={metric}: "
                              f"{faiss_reason(err)}") from None
    if gpu_float16:
        kind = gpu_kind(spec, metric, index)
        if not (kind == "flat" or (kind == "ivf" and type(index) is faiss.IndexIVFPQ)):
            raise InvalidArgument(
                f"gpu_float16 applies to 'Flat' (float16 vectors on the GPU) and 'IVF...,PQ...' (float16 lookup "
                f"tables), not to {spec!r}" + (" (use 'IVF...,SQfp16' for float16 IVF lists)" if kind == "ivf" else ""))


def is_graph(index) -> bool:
    """Whether an index is an append-only graph (HNSW), which FAISS cannot remove from."""
    return isinstance(index, (faiss.IndexHNSW, faiss.IndexBinaryHNSW)) or "HNSW" in type(index).__name__


def extract_ivf(index):
    """The IVF index inside ``index`` (float or binary); None if it has none."""
    if isinstance(index, faiss.IndexBinary):
        return index if isinstance(index, faiss.IndexBinaryIVF) else None
    return faiss.try_extract_index_ivf(index)


# IVF-PQ precomputed distance tables larger than this are not kept (FAISS's own cap is 2 GB, for one index).
PRECOMPUTED_TABLE_MAX_BYTES = 16 << 20


def drop_precomputed_tables(index) -> None:
    """Frees IVF-PQ's precomputed distance tables in ``index`` (if it has an ``IndexIVFPQ``) when they are larger
    than ``PRECOMPUTED_TABLE_MAX_BYTES``: searches then build each probed list's table from the query's residual,
    as FAISS does past its own ``precomputed_table_max_bytes``.

    The tables are nlist x M x 2^nbits floats (128 MiB at IVF4096,PQ32) and the same on every shard holding the
    trained index, so 8 shards of one node held 8 copies (107 bytes a vector at 10M). Measured in-process over 1-8
    shards (``python -m bench.pqtables_bench``, docs/BENCHMARKS.md "IVF-PQ's precomputed tables"): at 2M x 128,
    past 16 MiB, computing each list's table cost 0.65-1.14x the CPU of reading it from a table the caches do not
    hold; small tables stay in the caches, and with short lists (20k vectors, IVF64,PQ16 and IVF256,PQ32) going
    without them cost 1.3-2.2x, so tables up to the cap are kept. Distances differ by float rounding only.
    """
    if isinstance(index, faiss.IndexBinary):
        return
    ivf = extract_ivf(index)
    if ivf is None:
        return
    ivf = faiss.downcast_index(ivf)
    if not isinstance(ivf, faiss.IndexIVFPQ) or ivf.use_precomputed_table == -1:
        return
    if int(ivf.nlist) * int(ivf.pq.M) * int(ivf.pq.ksub) * 4 > PRECOMPUTED_TABLE_MAX_BYTES:
        ivf.use_precomputed_table = -1
        ivf.precompute_table()  # with -1: resizes the table to nothing


def train_threshold(spec: str) -> int:
    """Vectors a collection needs before its index is trained (see lookalike.indexspec.training_points); 0 for
    indexes that need no training."""
    return training_points(spec)[0]
