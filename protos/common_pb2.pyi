from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Metric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_UNSPECIFIED: _ClassVar[Metric]
    L2: _ClassVar[Metric]
    IP: _ClassVar[Metric]
    COSINE: _ClassVar[Metric]
    HAMMING: _ClassVar[Metric]
METRIC_UNSPECIFIED: Metric
L2: Metric
IP: Metric
COSINE: Metric
HAMMING: Metric

class Vectors(_message.Message):
    __slots__ = ("data", "rows", "dim", "dtype")
    class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        FLOAT32: _ClassVar[Vectors.DType]
        UINT8: _ClassVar[Vectors.DType]
    FLOAT32: Vectors.DType
    UINT8: Vectors.DType
    DATA_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    rows: int
    dim: int
    dtype: Vectors.DType
    def __init__(self, data: _Optional[bytes] = ..., rows: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[Vectors.DType, str]] = ...) -> None: ...

class Payload(_message.Message):
    __slots__ = ("fields",)
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.ScalarMap[str, str]
    def __init__(self, fields: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CollectionSpec(_message.Message):
    __slots__ = ("name", "dim", "metric", "index", "buckets", "replication", "nprobe", "ef_search", "encoder", "gpu_float16")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    GPU_FLOAT16_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    metric: Metric
    index: str
    buckets: int
    replication: int
    nprobe: int
    ef_search: int
    encoder: str
    gpu_float16: bool
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., metric: _Optional[_Union[Metric, str]] = ..., index: _Optional[str] = ..., buckets: _Optional[int] = ..., replication: _Optional[int] = ..., nprobe: _Optional[int] = ..., ef_search: _Optional[int] = ..., encoder: _Optional[str] = ..., gpu_float16: _Optional[bool] = ...) -> None: ...

class SearchParams(_message.Message):
    __slots__ = ("nprobe", "ef_search")
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    nprobe: int
    ef_search: int
    def __init__(self, nprobe: _Optional[int] = ..., ef_search: _Optional[int] = ...) -> None: ...
