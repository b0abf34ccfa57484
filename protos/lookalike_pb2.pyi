from protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SampleRequest(_message.Message):
    __slots__ = ("collection", "size", "seed", "include_vectors", "filter")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    collection: str
    size: int
    seed: int
    include_vectors: bool
    filter: _common_pb2.Filter
    def __init__(self, collection: _Optional[str] = ..., size: _Optional[int] = ..., seed: _Optional[int] = ..., include_vectors: _Optional[bool] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ...) -> None: ...

class DedupSpec(_message.Message):
    __slots__ = ("collection", "threshold", "k", "params", "batch", "filter")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    collection: str
    threshold: float
    k: int
    params: _common_pb2.SearchParams
    batch: int
    filter: _common_pb2.Filter
    def __init__(self, collection: _Optional[str] = ..., threshold: _Optional[float] = ..., k: _Optional[int] = ..., params: _Optional[_Union[_common_pb2.SearchParams, _Mapping]] = ..., batch: _Optional[int] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ...) -> None: ...

class ClusterSpec(_message.Message):
    __slots__ = ("collection", "k", "sample", "field", "niter", "seed")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    NITER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    collection: str
    k: int
    sample: int
    field: str
    niter: int
    seed: int
    def __init__(self, collection: _Optional[str] = ..., k: _Optional[int] = ..., sample: _Optional[int] = ..., field: _Optional[str] = ..., niter: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class StartJobRequest(_message.Message):
    __slots__ = ("job_id", "dedup", "cluster")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DEDUP_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    dedup: DedupSpec
    cluster: ClusterSpec
    def __init__(self, job_id: _Optional[str] = ..., dedup: _Optional[_Union[DedupSpec, _Mapping]] = ..., cluster: _Optional[_Union[ClusterSpec, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "kind", "collection", "state", "done", "total", "message", "started_unix", "elapsed_s", "summary_json")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Job.State]
        RUNNING: _ClassVar[Job.State]
        SUCCEEDED: _ClassVar[Job.State]
        FAILED: _ClassVar[Job.State]
        CANCELLED: _ClassVar[Job.State]
    STATE_UNSPECIFIED: Job.State
    RUNNING: Job.State
    SUCCEEDED: Job.State
    FAILED: Job.State
    CANCELLED: Job.State
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    collection: str
    state: Job.State
    done: int
    total: int
    message: str
    started_unix: float
    elapsed_s: float
    summary_json: str
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., collection: _Optional[str] = ..., state: _Optional[_Union[Job.State, str]] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., message: _Optional[str] = ..., started_unix: _Optional[float] = ..., elapsed_s: _Optional[float] = ..., summary_json: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class DedupGroupsRequest(_message.Message):
    __slots__ = ("job_id", "offset", "limit")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    offset: int
    limit: int
    def __init__(self, job_id: _Optional[str] = ..., offset: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class DedupGroup(_message.Message):
    __slots__ = ("group", "ids", "distances")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    DISTANCES_FIELD_NUMBER: _ClassVar[int]
    group: int
    ids: _containers.RepeatedScalarFieldContainer[str]
    distances: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, group: _Optional[int] = ..., ids: _Optional[_Iterable[str]] = ..., distances: _Optional[_Iterable[float]] = ...) -> None: ...

class CreateCollectionRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: _common_pb2.CollectionSpec
    def __init__(self, spec: _Optional[_Union[_common_pb2.CollectionSpec, _Mapping]] = ...) -> None: ...

class ListCollectionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCollectionsResponse(_message.Message):
    __slots__ = ("collections",)
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    collections: _containers.RepeatedCompositeFieldContainer[CollectionInfo]
    def __init__(self, collections: _Optional[_Iterable[_Union[CollectionInfo, _Mapping]]] = ...) -> None: ...

class DescribeCollectionRequest(_message.Message):
    __slots__ = ("collection", "name")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    collection: str
    name: str
    def __init__(self, collection: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DropCollectionRequest(_message.Message):
    __slots__ = ("collection", "name")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    collection: str
    name: str
    def __init__(self, collection: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DropCollectionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CollectionInfo(_message.Message):
    __slots__ = ("spec", "count", "epoch", "training")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    spec: _common_pb2.CollectionSpec
    count: int
    epoch: int
    training: IndexTraining
    def __init__(self, spec: _Optional[_Union[_common_pb2.CollectionSpec, _Mapping]] = ..., count: _Optional[int] = ..., epoch: _Optional[int] = ..., training: _Optional[_Union[IndexTraining, _Mapping]] = ...) -> None: ...

class IndexTraining(_message.Message):
    __slots__ = ("state", "version", "vectors", "vectors_needed", "trained_on", "shards", "shards_ready", "message", "next_version")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[IndexTraining.State]
        NOT_NEEDED: _ClassVar[IndexTraining.State]
        UNTRAINED: _ClassVar[IndexTraining.State]
        TRAINING: _ClassVar[IndexTraining.State]
        TRAINED: _ClassVar[IndexTraining.State]
    STATE_UNSPECIFIED: IndexTraining.State
    NOT_NEEDED: IndexTraining.State
    UNTRAINED: IndexTraining.State
    TRAINING: IndexTraining.State
    TRAINED: IndexTraining.State
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_NEEDED_FIELD_NUMBER: _ClassVar[int]
    TRAINED_ON_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_READY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NEXT_VERSION_FIELD_NUMBER: _ClassVar[int]
    state: IndexTraining.State
    version: int
    vectors: int
    vectors_needed: int
    trained_on: int
    shards: int
    shards_ready: int
    message: str
    next_version: int
    def __init__(self, state: _Optional[_Union[IndexTraining.State, str]] = ..., version: _Optional[int] = ..., vectors: _Optional[int] = ..., vectors_needed: _Optional[int] = ..., trained_on: _Optional[int] = ..., shards: _Optional[int] = ..., shards_ready: _Optional[int] = ..., message: _Optional[str] = ..., next_version: _Optional[int] = ...) -> None: ...

class TrainIndexRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    def __init__(self, collection: _Optional[str] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("collection", "ids", "vectors", "payloads")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    vectors: _common_pb2.Vectors
    payloads: _containers.RepeatedCompositeFieldContainer[_common_pb2.Payload]
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., vectors: _Optional[_Union[_common_pb2.Vectors, _Mapping]] = ..., payloads: _Optional[_Iterable[_Union[_common_pb2.Payload, _Mapping]]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("collection", "ids")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class WriteResponse(_message.Message):
    __slots__ = ("count", "missing")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    count: int
    missing: int
    def __init__(self, count: _Optional[int] = ..., missing: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("collection", "ids", "include_vectors")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    include_vectors: bool
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., include_vectors: _Optional[bool] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("ids", "vectors", "payloads")
    IDS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    vectors: _common_pb2.Vectors
    payloads: _containers.RepeatedCompositeFieldContainer[_common_pb2.Payload]
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., vectors: _Optional[_Union[_common_pb2.Vectors, _Mapping]] = ..., payloads: _Optional[_Iterable[_Union[_common_pb2.Payload, _Mapping]]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("collection", "queries", "k", "params", "min_coverage", "include_payloads", "filter")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    MIN_COVERAGE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    collection: str
    queries: _common_pb2.Vectors
    k: int
    params: _common_pb2.SearchParams
    min_coverage: float
    include_payloads: bool
    filter: _common_pb2.Filter
    def __init__(self, collection: _Optional[str] = ..., queries: _Optional[_Union[_common_pb2.Vectors, _Mapping]] = ..., k: _Optional[int] = ..., params: _Optional[_Union[_common_pb2.SearchParams, _Mapping]] = ..., min_coverage: _Optional[float] = ..., include_payloads: _Optional[bool] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ...) -> None: ...

class Neighbors(_message.Message):
    __slots__ = ("ids", "distances", "payloads")
    IDS_FIELD_NUMBER: _ClassVar[int]
    DISTANCES_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    distances: _containers.RepeatedScalarFieldContainer[float]
    payloads: _containers.RepeatedCompositeFieldContainer[_common_pb2.Payload]
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., distances: _Optional[_Iterable[float]] = ..., payloads: _Optional[_Iterable[_Union[_common_pb2.Payload, _Mapping]]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "coverage", "epoch", "plans")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PLANS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Neighbors]
    coverage: float
    epoch: int
    plans: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, results: _Optional[_Iterable[_Union[Neighbors, _Mapping]]] = ..., coverage: _Optional[float] = ..., epoch: _Optional[int] = ..., plans: _Optional[_Iterable[str]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("id", "data", "payload")
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    id: str
    data: bytes
    payload: _common_pb2.Payload
    def __init__(self, id: _Optional[str] = ..., data: _Optional[bytes] = ..., payload: _Optional[_Union[_common_pb2.Payload, _Mapping]] = ...) -> None: ...

class UpsertImagesRequest(_message.Message):
    __slots__ = ("collection", "images", "skip_bad")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SKIP_BAD_FIELD_NUMBER: _ClassVar[int]
    collection: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    skip_bad: bool
    def __init__(self, collection: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., skip_bad: _Optional[bool] = ...) -> None: ...

class ImageFailure(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UpsertImagesResponse(_message.Message):
    __slots__ = ("count", "failures")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    count: int
    failures: _containers.RepeatedCompositeFieldContainer[ImageFailure]
    def __init__(self, count: _Optional[int] = ..., failures: _Optional[_Iterable[_Union[ImageFailure, _Mapping]]] = ...) -> None: ...

class SearchByImageRequest(_message.Message):
    __slots__ = ("collection", "images", "k", "params", "min_coverage", "include_payloads", "filter")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    MIN_COVERAGE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    collection: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    k: int
    params: _common_pb2.SearchParams
    min_coverage: float
    include_payloads: bool
    filter: _common_pb2.Filter
    def __init__(self, collection: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ..., k: _Optional[int] = ..., params: _Optional[_Union[_common_pb2.SearchParams, _Mapping]] = ..., min_coverage: _Optional[float] = ..., include_payloads: _Optional[bool] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ...) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardStatus(_message.Message):
    __slots__ = ("shard_id", "address", "serving", "node", "buckets", "vectors", "memory_bytes", "index_bytes", "capacity_bytes", "joining", "damaged", "problem", "collections", "metrics_address")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    INDEX_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    JOINING_FIELD_NUMBER: _ClassVar[int]
    DAMAGED_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    address: str
    serving: bool
    node: str
    buckets: int
    vectors: int
    memory_bytes: int
    index_bytes: int
    capacity_bytes: int
    joining: int
    damaged: _containers.RepeatedScalarFieldContainer[str]
    problem: str
    collections: _containers.RepeatedCompositeFieldContainer[ShardCollection]
    metrics_address: str
    def __init__(self, shard_id: _Optional[str] = ..., address: _Optional[str] = ..., serving: _Optional[bool] = ..., node: _Optional[str] = ..., buckets: _Optional[int] = ..., vectors: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., index_bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., joining: _Optional[int] = ..., damaged: _Optional[_Iterable[str]] = ..., problem: _Optional[str] = ..., collections: _Optional[_Iterable[_Union[ShardCollection, _Mapping]]] = ..., metrics_address: _Optional[str] = ...) -> None: ...

class ShardCollection(_message.Message):
    __slots__ = ("collection", "buckets", "joining", "vectors", "index_bytes")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    JOINING_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    INDEX_BYTES_FIELD_NUMBER: _ClassVar[int]
    collection: str
    buckets: int
    joining: int
    vectors: int
    index_bytes: int
    def __init__(self, collection: _Optional[str] = ..., buckets: _Optional[int] = ..., joining: _Optional[int] = ..., vectors: _Optional[int] = ..., index_bytes: _Optional[int] = ...) -> None: ...

class BucketMove(_message.Message):
    __slots__ = ("collection", "bucket", "source", "target", "phase")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    bucket: int
    source: str
    target: str
    phase: str
    def __init__(self, collection: _Optional[str] = ..., bucket: _Optional[int] = ..., source: _Optional[str] = ..., target: _Optional[str] = ..., phase: _Optional[str] = ...) -> None: ...

class ClusterStatusResponse(_message.Message):
    __slots__ = ("epoch", "shards", "collections", "moves", "moves_done", "moves_failed")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    MOVES_FIELD_NUMBER: _ClassVar[int]
    MOVES_DONE_FIELD_NUMBER: _ClassVar[int]
    MOVES_FAILED_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardStatus]
    collections: _containers.RepeatedCompositeFieldContainer[CollectionInfo]
    moves: _containers.RepeatedCompositeFieldContainer[BucketMove]
    moves_done: int
    moves_failed: int
    def __init__(self, epoch: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardStatus, _Mapping]]] = ..., collections: _Optional[_Iterable[_Union[CollectionInfo, _Mapping]]] = ..., moves: _Optional[_Iterable[_Union[BucketMove, _Mapping]]] = ..., moves_done: _Optional[int] = ..., moves_failed: _Optional[int] = ...) -> None: ...

class RebalanceRequest(_message.Message):
    __slots__ = ("collection", "name", "add_shards")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADD_SHARDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    name: str
    add_shards: int
    def __init__(self, collection: _Optional[str] = ..., name: _Optional[str] = ..., add_shards: _Optional[int] = ...) -> None: ...

class RebalanceResponse(_message.Message):
    __slots__ = ("moves", "shards", "epoch")
    MOVES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    moves: int
    shards: int
    epoch: int
    def __init__(self, moves: _Optional[int] = ..., shards: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("collection", "buckets", "page")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    buckets: _containers.RepeatedScalarFieldContainer[int]
    page: int
    def __init__(self, collection: _Optional[str] = ..., buckets: _Optional[_Iterable[int]] = ..., page: _Optional[int] = ...) -> None: ...
