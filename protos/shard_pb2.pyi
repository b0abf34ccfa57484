from protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShardScanRequest(_message.Message):
    __slots__ = ("collection", "buckets", "include_vectors", "include_payloads", "epoch", "filter", "after_id", "limit")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    collection: str
    buckets: _containers.RepeatedScalarFieldContainer[int]
    include_vectors: bool
    include_payloads: bool
    epoch: int
    filter: _common_pb2.Filter
    after_id: str
    limit: int
    def __init__(self, collection: _Optional[str] = ..., buckets: _Optional[_Iterable[int]] = ..., include_vectors: _Optional[bool] = ..., include_payloads: _Optional[bool] = ..., epoch: _Optional[int] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ..., after_id: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ShardScanResponse(_message.Message):
    __slots__ = ("ids", "vectors", "payloads", "more")
    IDS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    vectors: _common_pb2.Vectors
    payloads: _containers.RepeatedCompositeFieldContainer[_common_pb2.Payload]
    more: bool
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., vectors: _Optional[_Union[_common_pb2.Vectors, _Mapping]] = ..., payloads: _Optional[_Iterable[_Union[_common_pb2.Payload, _Mapping]]] = ..., more: _Optional[bool] = ...) -> None: ...

class ShardAssignRequest(_message.Message):
    __slots__ = ("collection", "centroids", "field", "count_buckets", "epoch", "buckets")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    CENTROIDS_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    COUNT_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    centroids: _common_pb2.Vectors
    field: str
    count_buckets: _containers.RepeatedScalarFieldContainer[int]
    epoch: int
    buckets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, collection: _Optional[str] = ..., centroids: _Optional[_Union[_common_pb2.Vectors, _Mapping]] = ..., field: _Optional[str] = ..., count_buckets: _Optional[_Iterable[int]] = ..., epoch: _Optional[int] = ..., buckets: _Optional[_Iterable[int]] = ...) -> None: ...

class ShardAssignResponse(_message.Message):
    __slots__ = ("sizes", "labelled")
    SIZES_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    labelled: int
    def __init__(self, sizes: _Optional[_Iterable[int]] = ..., labelled: _Optional[int] = ...) -> None: ...

class ShardUpsertRequest(_message.Message):
    __slots__ = ("collection", "ids", "vectors", "payloads", "epoch")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    vectors: _common_pb2.Vectors
    payloads: _containers.RepeatedCompositeFieldContainer[_common_pb2.Payload]
    epoch: int
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., vectors: _Optional[_Union[_common_pb2.Vectors, _Mapping]] = ..., payloads: _Optional[_Iterable[_Union[_common_pb2.Payload, _Mapping]]] = ..., epoch: _Optional[int] = ...) -> None: ...

class ShardDeleteRequest(_message.Message):
    __slots__ = ("collection", "ids", "epoch")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    epoch: int
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., epoch: _Optional[int] = ...) -> None: ...

class ShardWriteResponse(_message.Message):
    __slots__ = ("count", "missing")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    count: int
    missing: int
    def __init__(self, count: _Optional[int] = ..., missing: _Optional[int] = ...) -> None: ...

class ShardGetRequest(_message.Message):
    __slots__ = ("collection", "ids", "include_vectors", "epoch")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    include_vectors: bool
    epoch: int
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., include_vectors: _Optional[bool] = ..., epoch: _Optional[int] = ...) -> None: ...

class ShardGetResponse(_message.Message):
    __slots__ = ("ids", "vectors", "payloads")
    IDS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    vectors: _common_pb2.Vectors
    payloads: _containers.RepeatedCompositeFieldContainer[_common_pb2.Payload]
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., vectors: _Optional[_Union[_common_pb2.Vectors, _Mapping]] = ..., payloads: _Optional[_Iterable[_Union[_common_pb2.Payload, _Mapping]]] = ...) -> None: ...

class ShardSearchRequest(_message.Message):
    __slots__ = ("collection", "queries", "k", "params", "include_payloads", "epoch", "coarse", "filter", "shards")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    COARSE_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    queries: _common_pb2.Vectors
    k: int
    params: _common_pb2.SearchParams
    include_payloads: bool
    epoch: int
    coarse: CoarseAssignment
    filter: _common_pb2.Filter
    shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., queries: _Optional[_Union[_common_pb2.Vectors, _Mapping]] = ..., k: _Optional[int] = ..., params: _Optional[_Union[_common_pb2.SearchParams, _Mapping]] = ..., include_payloads: _Optional[bool] = ..., epoch: _Optional[int] = ..., coarse: _Optional[_Union[CoarseAssignment, _Mapping]] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ..., shards: _Optional[_Iterable[str]] = ...) -> None: ...

class CoarseAssignment(_message.Message):
    __slots__ = ("version", "nprobe", "lists", "distances")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    LISTS_FIELD_NUMBER: _ClassVar[int]
    DISTANCES_FIELD_NUMBER: _ClassVar[int]
    version: int
    nprobe: int
    lists: bytes
    distances: bytes
    def __init__(self, version: _Optional[int] = ..., nprobe: _Optional[int] = ..., lists: _Optional[bytes] = ..., distances: _Optional[bytes] = ...) -> None: ...

class ShardQuantizerRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    def __init__(self, collection: _Optional[str] = ...) -> None: ...

class ShardQuantizerResponse(_message.Message):
    __slots__ = ("version", "centroids")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CENTROIDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    centroids: _common_pb2.Vectors
    def __init__(self, version: _Optional[int] = ..., centroids: _Optional[_Union[_common_pb2.Vectors, _Mapping]] = ...) -> None: ...

class ShardSearchResponse(_message.Message):
    __slots__ = ("distances", "labels", "ids", "payloads", "nq", "k", "plan", "id_bytes", "id_lengths", "failures")
    DISTANCES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    NQ_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ID_BYTES_FIELD_NUMBER: _ClassVar[int]
    ID_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    distances: bytes
    labels: bytes
    ids: _containers.RepeatedScalarFieldContainer[str]
    payloads: _containers.RepeatedCompositeFieldContainer[_common_pb2.Payload]
    nq: int
    k: int
    plan: str
    id_bytes: bytes
    id_lengths: bytes
    failures: _containers.RepeatedCompositeFieldContainer[ShardFailure]
    def __init__(self, distances: _Optional[bytes] = ..., labels: _Optional[bytes] = ..., ids: _Optional[_Iterable[str]] = ..., payloads: _Optional[_Iterable[_Union[_common_pb2.Payload, _Mapping]]] = ..., nq: _Optional[int] = ..., k: _Optional[int] = ..., plan: _Optional[str] = ..., id_bytes: _Optional[bytes] = ..., id_lengths: _Optional[bytes] = ..., failures: _Optional[_Iterable[_Union[ShardFailure, _Mapping]]] = ...) -> None: ...

class ShardFailure(_message.Message):
    __slots__ = ("shard", "code", "message")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    shard: str
    code: int
    message: str
    def __init__(self, shard: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ShardStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CollectionStats(_message.Message):
    __slots__ = ("name", "buckets", "vectors", "index_bytes", "trained", "bucket_counts", "joining", "damaged", "trained_version", "loaded_from_checkpoint", "replayed_records")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    INDEX_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    BUCKET_COUNTS_FIELD_NUMBER: _ClassVar[int]
    JOINING_FIELD_NUMBER: _ClassVar[int]
    DAMAGED_FIELD_NUMBER: _ClassVar[int]
    TRAINED_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADED_FROM_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_RECORDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    buckets: int
    vectors: int
    index_bytes: int
    trained: bool
    bucket_counts: bytes
    joining: int
    damaged: _containers.RepeatedScalarFieldContainer[str]
    trained_version: int
    loaded_from_checkpoint: bool
    replayed_records: int
    def __init__(self, name: _Optional[str] = ..., buckets: _Optional[int] = ..., vectors: _Optional[int] = ..., index_bytes: _Optional[int] = ..., trained: _Optional[bool] = ..., bucket_counts: _Optional[bytes] = ..., joining: _Optional[int] = ..., damaged: _Optional[_Iterable[str]] = ..., trained_version: _Optional[int] = ..., loaded_from_checkpoint: _Optional[bool] = ..., replayed_records: _Optional[int] = ...) -> None: ...

class ShardStatsResponse(_message.Message):
    __slots__ = ("shard_id", "collections", "memory_bytes", "serving", "capacity_bytes", "metrics_address")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    collections: _containers.RepeatedCompositeFieldContainer[CollectionStats]
    memory_bytes: int
    serving: bool
    capacity_bytes: int
    metrics_address: str
    def __init__(self, shard_id: _Optional[str] = ..., collections: _Optional[_Iterable[_Union[CollectionStats, _Mapping]]] = ..., memory_bytes: _Optional[int] = ..., serving: _Optional[bool] = ..., capacity_bytes: _Optional[int] = ..., metrics_address: _Optional[str] = ...) -> None: ...
