"""GPUs for shards: detection, GPU memory, and the backend that puts FAISS indexes on a GPU.

A shard that Ray placed on a GPU (see ``control.ray_placer.RayPlacer``) gets a :class:`GpuBackend` and its
collections search a GPU mirror of their CPU index (``shard.gpu_keeper``). Everything GPU-specific goes through a
backend object, so the CPU-only CI runs the same code with :class:`EmulatedGpuBackend`, which "clones to the GPU"
with ``faiss.clone_index`` on the CPU.

A backend offers:
- ``lock``: a re-entrant lock held around every call into the GPU (FAISS GPU resources are not thread-safe);
- ``to_gpu(index, float16)``: a GPU copy of a CPU ``IndexFlat`` / ``IndexIVFFlat`` / ``IndexIVFPQ`` /
  ``IndexIVFScalarQuantizer`` (ids kept; raises when the GPU cannot hold that index);
- ``cagra(x, metric, graph_degree)``: a CAGRA graph over ``x`` (ids are row positions);
- ``cagra_params(itopk)``: CAGRA search parameters (None: defaults);
- ``total_bytes()`` / ``used_bytes()``: the GPU's memory as this shard may use it (None: unknown).
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import threading
import time

import faiss
import numpy as np

log = logging.getLogger(__name__)

# Largest k (and nprobe) FAISS GPU indexes select (GPU_MAX_SELECTION_K without cuVS).
GPU_MAX_K = 2048

_METRIC = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT, "cosine": faiss.METRIC_INNER_PRODUCT}


def has_gpu_support() -> bool:
    """True when this faiss build has GPU indexes (faiss-gpu, not faiss-cpu)."""
    return hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "index_cpu_to_gpu")


def available() -> bool:
    """True when faiss has GPU support and sees at least one GPU."""
    if not has_gpu_support():
        return False
    try:
        return faiss.get_num_gpus() > 0
    except Exception:  # a driver problem reads as "no GPU"
        return False


def has_cuvs() -> bool:
    """True when this faiss build has cuVS, and with it GPU CAGRA graph indexes."""
    return hasattr(faiss, "GpuIndexCagra")


def faiss_build() -> str:
    """A few words on this faiss build, for error messages."""
    kind = "GPU with cuVS" if has_cuvs() else "GPU" if has_gpu_support() else "CPU-only"
    return f"faiss {getattr(faiss, '__version__', '?')} ({kind})"


def shard_num_gpus(setting, cluster_gpus: float, shards: int) -> float:
    """GPUs Ray reserves for each shard actor.

    Args:
        setting: a number of GPUs per shard (0: CPU shards; a fraction shares a GPU between shards), or "auto" /
            None: one GPU per shard when the cluster has a GPU for every shard, an equal share of a GPU when it
            has fewer (shards per GPU rounded up, so that the shares pack onto whole GPUs), none without GPUs.
        cluster_gpus: ``ray.cluster_resources().get("GPU", 0)``.
        shards: the shards the cluster starts with.

    Raises:
        ValueError: a negative or unreadable setting.
    """
    if setting not in (None, "", "auto"):
        value = float(setting)
        if value < 0 or math.isnan(value):
            raise ValueError(f"GPUs per shard must be 'auto' or a number >= 0, got {setting!r}")
        return value
    gpus = int(cluster_gpus + 1e-9)
    if gpus <= 0:
        return 0.0
    if gpus >= shards:
        return 1.0
    per_gpu = math.ceil(shards / gpus)
    return math.floor(10_000 / per_gpu) / 10_000  # Ray keeps 4 decimals of a fractional resource


def _visible_id(device: int) -> str:
    """The id nvidia-smi / NVML know the CUDA device ``device`` of this process by (CUDA_VISIBLE_DEVICES maps it)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[device] if device < len(visible) else str(device)


def memory_info(device: int = 0) -> tuple[int, int] | None:
    """(total, free) bytes of CUDA device ``device`` as this process numbers it, or None when unknown.

    Asks NVML (``pynvml``) or ``nvidia-smi``, which create no CUDA context; PyTorch only when it is already loaded
    (importing it, or a context of its own, would cost the shard memory).
    """
    ident = _visible_id(device)
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = (pynvml.nvmlDeviceGetHandleByIndex(int(ident)) if ident.isdigit()
                  else pynvml.nvmlDeviceGetHandleByUUID(ident))
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.total), int(info.free)
    except Exception:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={ident}", "--query-gpu=memory.total,memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True).stdout.strip().splitlines()
        total_mib, used_mib = (float(v) for v in out[0].split(","))
        return int(total_mib * 2**20), int((total_mib - used_mib) * 2**20)
    except Exception:
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                free, total = torch.cuda.mem_get_info(device)
                return int(total), int(free)
        except Exception:
            pass
    return None


_resources: dict[int, object] = {}
_resources_lock = threading.Lock()


def gpu_resources(device: int = 0, temp_bytes: int | None = None):
    """The process's one ``StandardGpuResources`` for ``device`` (streams, cuBLAS handle, scratch memory)."""
    with _resources_lock:
        res = _resources.get(device)
        if res is None:
            res = faiss.StandardGpuResources()
            if temp_bytes is not None:
                res.setTempMemory(int(temp_bytes))
            _resources[device] = res
        return res


class GpuBackend:
    """One CUDA device for the shards of this process.

    Args:
        device: the CUDA device, as this process numbers it (Ray's CUDA_VISIBLE_DEVICES makes its GPU device 0).
        share: the fraction of the GPU this shard holds (Ray's num_gpus, at most 1): its capacity is that share of
            the GPU's memory.
    """

    _MEMORY_TTL_S = 1.0

    def __init__(self, device: int = 0, share: float = 1.0):
        self.device = int(device)
        self.share = min(1.0, float(share)) if share > 0 else 1.0
        self.lock = threading.RLock()
        self.name = f"cuda:{self.device}"
        self._memory: tuple[float, tuple[int, int] | None] = (-math.inf, None)
        info = self.memory()
        # FAISS keeps a scratch area per resources object (18% of the GPU up to 1.5 GiB by default): scale it to
        # this shard's share when the GPU is shared.
        temp = None
        if info is not None and self.share < 1.0:
            temp = max(256 << 20, min(1536 << 20, int(0.18 * info[0] * self.share)))
        self._res = gpu_resources(self.device, temp)

    def memory(self) -> tuple[int, int] | None:
        """(total, free) bytes of the device, measured at most once a second."""
        at, info = self._memory
        now = time.monotonic()
        if now - at > self._MEMORY_TTL_S:
            info = memory_info(self.device)
            self._memory = (now, info)
        return info

    def total_bytes(self) -> int | None:
        info = self.memory()
        return int(info[0] * self.share) if info is not None else None

    def used_bytes(self) -> int | None:
        """Bytes in use on the device, every process's (a GPU shared with other work has that much less room);
        None for a share of a GPU, where the other shares' use is theirs: the shard counts its own mirrors."""
        info = self.memory() if self.share >= 1.0 else None
        return info[0] - info[1] if info is not None else None

    def to_gpu(self, index, float16: bool = False):
        co = faiss.GpuClonerOptions()
        co.useFloat16 = bool(float16)  # Flat: float16 storage; IVF-PQ: float16 lookup tables
        co.indicesOptions = faiss.INDICES_64_BIT  # our labels use 56 bits
        with self.lock:
            gpu = faiss.index_cpu_to_gpu(self._res, self.device, index, co)
        self._memory = (-math.inf, None)  # measure again
        return gpu

    def cagra(self, x: np.ndarray, metric: str, graph_degree: int):
        cfg = faiss.GpuIndexCagraConfig()
        cfg.device = self.device
        cfg.graph_degree = int(graph_degree)
        cfg.intermediate_graph_degree = 2 * int(graph_degree)
        with self.lock:
            index = faiss.GpuIndexCagra(self._res, x.shape[1], _METRIC[metric], cfg)
            index.train(np.ascontiguousarray(x, dtype=np.float32))
        self._memory = (-math.inf, None)
        return index

    def cagra_params(self, itopk: int):
        if not hasattr(faiss, "SearchParametersCagra"):
            return None
        params = faiss.SearchParametersCagra()
        params.itopk_size = int(itopk)
        return params


class EmulatedGpuBackend:
    """A stand-in for :class:`GpuBackend` on the CPU, for tests: "GPU" indexes are CPU clones (IVF without its
    direct map, like GPU IVF), CAGRA is an exact flat index, and memory is what the caller says.

    Args:
        total_bytes: the emulated GPU's memory (None: unknown, no capacity).
        used_bytes: what the device reports in use (None: the shard counts its mirrors' bytes).
    """

    def __init__(self, total_bytes: int | None = 1 << 34, used_bytes: int | None = None):
        self.lock = threading.RLock()
        self.name = "emulated"
        self._total = total_bytes
        self._used = used_bytes
        self.clones = 0
        self.cagra_builds = 0

    def total_bytes(self) -> int | None:
        return self._total

    def used_bytes(self) -> int | None:
        return self._used

    def to_gpu(self, index, float16: bool = False):
        with self.lock:
            clone = faiss.clone_index(index)
            ivf = faiss.try_extract_index_ivf(clone)
            if ivf is not None:
                ivf.set_direct_map_type(faiss.DirectMap.NoMap)
            self.clones += 1
            return clone

    def cagra(self, x: np.ndarray, metric: str, graph_degree: int):
        with self.lock:
            index = faiss.IndexFlat(x.shape[1], _METRIC[metric])
            index.add(np.ascontiguousarray(x, dtype=np.float32))
            self.cagra_builds += 1
            return index

    def cagra_params(self, itopk: int):
        return None


def backend_for_shard(share: float):
    """The backend of a shard actor that Ray gave ``share`` GPUs; None (CPU) without a GPU or GPU faiss."""
    if share <= 0:
        return None
    if not available():
        log.warning("this shard was given %g GPU(s), but %s sees no GPU: searching on the CPU", share, faiss_build())
        return None
    backend = GpuBackend(0, share)
    log.info("shard on GPU %s (%s, CUDA_VISIBLE_DEVICES=%s, %s of memory)", backend.name, faiss_build(),
             os.environ.get("CUDA_VISIBLE_DEVICES", ""),
             f"{backend.total_bytes() / 2**30:.1f} GiB" if backend.total_bytes() else "unknown")
    return backend
