"""Configuration as frozen dataclasses, and the limits every server enforces.

Only entry points (the CLI) read flags and environment variables; everything else receives these objects.
"""

from __future__ import annotations

import dataclasses
import re

from lookalike.errors import InvalidArgument, ResourceExhausted
from lookalike.indexspec import check_spec
from lookalike.payloads import parse_schema, schema_text

METRICS = ("l2", "ip", "cosine", "hamming")
# Which direction is better, per metric: True when larger distances are better (similarities).
LARGER_IS_BETTER = {"l2": False, "ip": True, "cosine": True, "hamming": False}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Request limits, enforced at the router (and again at shards). Documented in docs/API.md."""

    max_k: int = 1024
    max_batch: int = 10_000           # queries per search, items per upsert/delete/get request
    max_id_bytes: int = 256
    max_payload_bytes: int = 16 * 1024
    max_message_bytes: int = 64 * 1024 * 1024
    max_dim: int = 65_536
    max_buckets: int = 65_536
    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 64 * 1024 * 1024  # 64 megapixels: a 8192 x 8192 photo decodes; a bomb does not
    max_query_images: int = 1000              # per SearchByImage
    max_nprobe: int = 1 << 20                 # IVF lists probed per query (= lookalike.indexspec.MAX_IVF_LISTS)
    max_ef_search: int = 1 << 16              # HNSW candidate list per query; beyond this it buys nothing


LIMITS = Limits()


@dataclasses.dataclass(frozen=True)
class RpcPolicy:
    """Deadlines, keepalives and concurrency bounds of the gRPC servers and channels (docs/OPERATIONS.md,
    "Health, deadlines and concurrency bounds").

    Attributes:
        default_deadline_s: the deadline of a call to a shard when the router's caller sent none (each shard call
            of a search, write or read; a write's retries as a whole keep ``Router.write_retry_s``).
        keepalive_time_s: channels ping an idle connection this often, and drop it when no answer comes within
            ``keepalive_timeout_s``: a peer that vanished (a node lost, a NAT that forgot) fails its calls then,
            not at their deadline.
        keepalive_timeout_s: see keepalive_time_s.
        min_ping_interval_s: servers accept a client's pings this often (less than keepalive_time_s, else
            they answer pings with GOAWAY "too_many_pings").
        max_concurrent_rpcs: calls a server runs or queues at once; beyond, grpc answers RESOURCE_EXHAUSTED at
            once (None: no bound).
        health_interval_s: how often the health checker probes (the control plane for a router, the storage for
            a shard).
        health_timeout_s: a probe slower than this counts as failed.
        max_connection_age_s: the public server (the router) sends GOAWAY to a client connection this old, and the
            client connects again (re-resolving its target): so that long-lived clients reach routers the
            autoscaler added (0: never; docs/DEPLOY.md, "Load balancing").
        max_connection_age_grace_s: calls in flight on a connection so ended get this long to finish (None: as long
            as they take; a shorter grace cuts a bulk load's stream).
    """

    default_deadline_s: float = 60.0
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    min_ping_interval_s: float = 10.0
    max_concurrent_rpcs: int | None = 1000
    health_interval_s: float = 1.0
    health_timeout_s: float = 2.0
    max_connection_age_s: float = 300.0
    max_connection_age_grace_s: float | None = None


RPC = RpcPolicy()


def check_search_params(nprobe: int, ef_search: int, limits: Limits = LIMITS, default_allowed: bool = True) -> None:
    """Raises InvalidArgument for an nprobe or ef_search outside its bounds (0 keeps the collection default where
    ``default_allowed``; a collection's own defaults must be at least 1)."""
    low = 0 if default_allowed else 1
    zero = " (0 keeps the collection's default)" if default_allowed else ""
    if not low <= nprobe <= limits.max_nprobe:
        raise InvalidArgument(f"nprobe must be between {low} and {limits.max_nprobe}{zero}, got {nprobe}")
    if not low <= ef_search <= limits.max_ef_search:
        raise InvalidArgument(f"ef_search must be between {low} and {limits.max_ef_search}{zero}, got {ef_search}")


def _varint_len(n: int) -> int:
    return max(1, (int(n).bit_length() + 6) // 7)


def search_slot_bytes(include_payloads: bool, limits: Limits = LIMITS) -> int:
    """The most bytes one result slot (one neighbour of one query) can take in a search answer: its distance
    (float32) and label (int64) in the shard's packed bytes fields, its id (a string field: tag, length, up to
    max_id_bytes) and, when asked for, its payload (a Payload message field: tag, length, up to
    max_payload_bytes serialized). See ShardSearchResponse in protos/shard.proto and Neighbors in
    protos/lookalike.proto; the router's Neighbors carry the same id and payload, a float distance and no label."""
    slot = 4 + 8 + 1 + _varint_len(limits.max_id_bytes) + limits.max_id_bytes
    if include_payloads:
        slot += 1 + _varint_len(limits.max_payload_bytes) + limits.max_payload_bytes
    return slot


def max_search_rows(k: int, include_payloads: bool = False, limits: Limits = LIMITS) -> int:
    """Most queries one search can carry so that its answers fit in a message whatever the ids and payloads: a
    shard answers nq * k slots (:func:`search_slot_bytes`) plus its fixed fields (two bytes fields' tags and
    lengths, nq, k: under 64 bytes); the router answers nq Neighbors, each k slots less their labels plus the
    message's own tag and length and its packed distances' tag and length (12 bytes), plus coverage and epoch."""
    k = max(int(k), 1)
    slot = search_slot_bytes(include_payloads, limits)
    room = limits.max_message_bytes - 64
    return max(0, min(room // (k * slot), room // (k * (slot - 8) + 12)))


def check_answer_size(nq: int, k: int, include_payloads: bool, limits: Limits = LIMITS) -> None:
    """Refuses, before any search runs, a search of ``nq`` queries whose answer could pass the message limit.

    Raises:
        ResourceExhausted: with how many queries fit at this k.
    """
    rows = max_search_rows(k, include_payloads, limits)
    if nq > rows:
        raise ResourceExhausted(
            f"{nq} queries x k={k} could make an answer over the {limits.max_message_bytes >> 20} MiB message limit "
            f"(ids of up to {limits.max_id_bytes} bytes"
            f"{f', payloads of up to {limits.max_payload_bytes} bytes' if include_payloads else ''}): send at most "
            f"{rows} queries per request at this k{' with payloads' if include_payloads else ''}")


@dataclasses.dataclass(frozen=True)
class CollectionConfig:
    """A collection's definition; see ``CollectionSpec`` in protos/common.proto for the meaning of each field."""

    name: str
    dim: int
    metric: str = ""  # "" means l2, or the encoder's metric
    index: str = "Flat"
    buckets: int = 1024
    replication: int = 1
    nprobe: int = 16
    ef_search: int = 64
    encoder: str = ""  # encoder spec ("phash"); empty: vectors only
    gpu_float16: bool = False  # on GPU shards: float16 vectors (Flat) or lookup tables (IVF-PQ)
    # Set by the controller, not by users: the version of the collection's trained index (shard.trained) every shard
    # starts its index from; 0 while the collection is untrained (or its spec needs no training).
    trained_version: int = 0
    # Payload fields the shards index for filters, "name:type,..." (lookalike.payloads; "" for none).
    filterable: str = ""

    @property
    def schema(self) -> dict[str, str]:
        """The filterable fields: name -> type name (lookalike.payloads.TYPES)."""
        return dict(parse_schema(self.filterable))

    @property
    def binary(self) -> bool:
        return self.metric == "hamming"

    @property
    def code_size(self) -> int:
        """Bytes per stored vector on the wire: 4*dim for float32, dim/8 for binary codes."""
        return self.dim // 8 if self.binary else 4 * self.dim

    @property
    def larger_is_better(self) -> bool:
        return LARGER_IS_BETTER[self.metric]

    def validated(self, limits: Limits = LIMITS) -> "CollectionConfig":
        """Returns the config with defaults normalised: its fields checked against ``limits`` and its index spec
        against the grammar of lookalike.indexspec.

        Two checks of a new collection need layers above this one, and the controller's create path makes them
        around this one: a collection naming an encoder gets its dim and metric from it first
        (``encoder.with_encoder``), and the normalised spec must then build in FAISS
        (``shard.specs.check_index_spec``).

        Raises:
            InvalidArgument: a field is out of range, with a sentence naming it.
        """
        if not self.metric:
            return dataclasses.replace(self, metric="l2").validated(limits)
        if not _NAME_RE.match(self.name or ""):
            raise InvalidArgument(
                f"collection name {self.name!r} is invalid: use 1-64 characters from A-Z a-z 0-9 _ . - "
                "starting with a letter or digit")
        if self.metric not in METRICS:
            raise InvalidArgument(f"metric {self.metric!r} is unknown: use one of {', '.join(METRICS)}")
        if not 1 <= self.dim <= limits.max_dim:
            raise InvalidArgument(f"dim must be between 1 and {limits.max_dim}, got {self.dim}")
        if self.binary and self.dim % 8:
            raise InvalidArgument(f"a hamming collection's dim is in bits and must be a multiple of 8, got {self.dim}")
        if not 1 <= self.buckets <= limits.max_buckets:
            raise InvalidArgument(f"buckets must be between 1 and {limits.max_buckets}, got {self.buckets}")
        if self.replication < 1:
            raise InvalidArgument(f"replication must be at least 1, got {self.replication}")
        check_search_params(self.nprobe, self.ef_search, limits, default_allowed=False)
        if not 0 <= self.trained_version < 1 << 31:
            raise InvalidArgument(f"trained_version must be between 0 and 2^31 - 1, got {self.trained_version}")
        index = (self.index or "").strip() or ("BFlat" if self.binary else "Flat")
        if self.binary and not index.startswith("B"):
            index = "B" + index  # "Flat" -> "BFlat", "IVF1024" -> "BIVF1024"
        check_spec(index, self.dim, self.binary)  # the grammar: before FAISS sees it (it aborts on some specs)
        return dataclasses.replace(self, index=index, filterable=schema_text(parse_schema(self.filterable)))


@dataclasses.dataclass(frozen=True)
class MovePolicy:
    """How moves run and when the cluster grows by itself.

    Attributes:
        max_moves: moves copying at once (at most one onto any node).
        move_buckets: buckets one move takes at most.
        grace_s: seconds a move's source keeps a bucket after the target took over (longer than a router's
            refresh interval).
        high_water: a shard using more than this fraction of its capacity triggers growth.
        max_shards: growth stops here.
        autoscale_s: seconds between checks of the high-water mark (0: no automatic growth).
        copy_mb_s: rate limit of one move's copy, MB of vectors per second (0: none): a slower move leaves more
            CPU to searches.
        tolerance: planning stops when the most and least loaded shards differ by less than this fraction of the
            mean load.
        train_check_s: seconds between checks of whether a collection needs training (0: only when asked).
        train_retry_s: seconds before a failed training is tried again.
    """

    max_moves: int = 2
    move_buckets: int = 16
    grace_s: float = 2.0
    high_water: float = 0.8
    max_shards: int = 64
    autoscale_s: float = 0.0
    tolerance: float = 0.05
    copy_mb_s: float = 0.0
    train_check_s: float = 1.0
    train_retry_s: float = 30.0


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """What `lookalike serve` starts.

    Attributes:
        shard_memory: bytes each shard may fill (its capacity; also reserved as Ray's ``memory`` resource so Ray
            places shards where it fits). 0: no limit, no automatic growth.
        shard_gpus: GPUs Ray reserves for each shard ("auto": one each when the Ray cluster has a GPU per shard, a
            share of one when it has fewer, none without GPUs; 0: CPU shards). A shard with a GPU searches there
            and its capacity is its share of the GPU's memory (or ``shard_memory`` when smaller); see
            lookalike.gpu.shard_num_gpus.
        policy: bucket moves and automatic growth.
        tls: the internal hop's mutual TLS (lookalike.security.TLSConfig: shards serve with it, routers and the
            jobs actor connect with it); None: plaintext shards.
        shard_metrics_port: the port each shard serves its Prometheus metrics on, on the address its gRPC server
            binds (beyond loopback only with ``tls``: HTTPS, client certificates its CA signed); 0: a free port
            (shards report it in Stats, the router's service discovery lists it); -1: none.
        shards_per_process: shards that share one process (shard.host): each process answers one search call
            for all of its shards and pays a call's costs once; it holds their resources together (CPUs, memory,
            GPUs), and a process that fails takes its shards with it until Ray restarts it. 1: a process each.
    """

    data_dir: str = "./lookalike-data"
    shards: int = 2
    cluster_name: str = "lookalike"
    namespace: str = "lookalike"
    shard_num_cpus: float = 1.0
    shard_host: str = "127.0.0.1"
    shard_memory: int = 0
    shard_gpus: float | str = "auto"
    policy: MovePolicy = MovePolicy()
    tls: object = None
    shard_metrics_port: int = -1
    shards_per_process: int = 1


def storage_path(uri: str) -> str:
    """The local directory of a storage URI: a path, or ``file://`` + path.

    Raises:
        ValueError: another scheme (object storage is used through a volume every node mounts at one path).
    """
    if "://" not in uri:
        return uri
    scheme, _, rest = uri.partition("://")
    if scheme != "file":
        raise ValueError(f"storage URI {uri!r}: only local directories (a path or file://PATH) are supported; "
                         "mount shared or object storage as a volume at the same path on every node")
    return rest
