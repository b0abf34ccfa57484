from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FieldType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FIELD_TYPE_UNSPECIFIED: _ClassVar[FieldType]
    TYPE_STRING: _ClassVar[FieldType]
    TYPE_INT: _ClassVar[FieldType]
    TYPE_FLOAT: _ClassVar[FieldType]
    TYPE_BOOL: _ClassVar[FieldType]
    TYPE_TIMESTAMP: _ClassVar[FieldType]
    TYPE_STRING_LIST: _ClassVar[FieldType]
    TYPE_INT_LIST: _ClassVar[FieldType]

class Metric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_UNSPECIFIED: _ClassVar[Metric]
    L2: _ClassVar[Metric]
    IP: _ClassVar[Metric]
    COSINE: _ClassVar[Metric]
    HAMMING: _ClassVar[Metric]
FIELD_TYPE_UNSPECIFIED: FieldType
TYPE_STRING: FieldType
TYPE_INT: FieldType
TYPE_FLOAT: FieldType
TYPE_BOOL: FieldType
TYPE_TIMESTAMP: FieldType
TYPE_STRING_LIST: FieldType
TYPE_INT_LIST: FieldType
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
    __slots__ = ("fields", "values")
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.ScalarMap[str, str]
    values: _containers.MessageMap[str, Value]
    def __init__(self, fields: _Optional[_Mapping[str, str]] = ..., values: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("string_value", "int_value", "float_value", "bool_value", "timestamp_micros", "string_list", "int_list")
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MICROS_FIELD_NUMBER: _ClassVar[int]
    STRING_LIST_FIELD_NUMBER: _ClassVar[int]
    INT_LIST_FIELD_NUMBER: _ClassVar[int]
    string_value: str
    int_value: int
    float_value: float
    bool_value: bool
    timestamp_micros: int
    string_list: StringList
    int_list: IntList
    def __init__(self, string_value: _Optional[str] = ..., int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., bool_value: _Optional[bool] = ..., timestamp_micros: _Optional[int] = ..., string_list: _Optional[_Union[StringList, _Mapping]] = ..., int_list: _Optional[_Union[IntList, _Mapping]] = ...) -> None: ...

class StringList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class IntList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[int]] = ...) -> None: ...

class FieldSchema(_message.Message):
    __slots__ = ("name", "type")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: FieldType
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[FieldType, str]] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("condition", "all", "any", "negate")
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    ANY_FIELD_NUMBER: _ClassVar[int]
    NEGATE_FIELD_NUMBER: _ClassVar[int]
    condition: Condition
    all: FilterList
    any: FilterList
    negate: Filter
    def __init__(self, condition: _Optional[_Union[Condition, _Mapping]] = ..., all: _Optional[_Union[FilterList, _Mapping]] = ..., any: _Optional[_Union[FilterList, _Mapping]] = ..., negate: _Optional[_Union[Filter, _Mapping]] = ...) -> None: ...

class FilterList(_message.Message):
    __slots__ = ("filters",)
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    filters: _containers.RepeatedCompositeFieldContainer[Filter]
    def __init__(self, filters: _Optional[_Iterable[_Union[Filter, _Mapping]]] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("field", "eq", "not_in", "range", "exists")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    EQ_FIELD_NUMBER: _ClassVar[int]
    IN_FIELD_NUMBER: _ClassVar[int]
    NOT_IN_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    field: str
    eq: Value
    not_in: ValueList
    range: Range
    exists: bool
    def __init__(self, field: _Optional[str] = ..., eq: _Optional[_Union[Value, _Mapping]] = ..., not_in: _Optional[_Union[ValueList, _Mapping]] = ..., range: _Optional[_Union[Range, _Mapping]] = ..., exists: _Optional[bool] = ..., **kwargs) -> None: ...

class ValueList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class Range(_message.Message):
    __slots__ = ("gt", "gte", "lt", "lte")
    GT_FIELD_NUMBER: _ClassVar[int]
    GTE_FIELD_NUMBER: _ClassVar[int]
    LT_FIELD_NUMBER: _ClassVar[int]
    LTE_FIELD_NUMBER: _ClassVar[int]
    gt: Value
    gte: Value
    lt: Value
    lte: Value
    def __init__(self, gt: _Optional[_Union[Value, _Mapping]] = ..., gte: _Optional[_Union[Value, _Mapping]] = ..., lt: _Optional[_Union[Value, _Mapping]] = ..., lte: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class CollectionSpec(_message.Message):
    __slots__ = ("name", "dim", "metric", "index", "buckets", "replication", "nprobe", "ef_search", "encoder", "gpu_float16", "filterable")
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
    FILTERABLE_FIELD_NUMBER: _ClassVar[int]
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
    filterable: _containers.RepeatedCompositeFieldContainer[FieldSchema]
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., metric: _Optional[_Union[Metric, str]] = ..., index: _Optional[str] = ..., buckets: _Optional[int] = ..., replication: _Optional[int] = ..., nprobe: _Optional[int] = ..., ef_search: _Optional[int] = ..., encoder: _Optional[str] = ..., gpu_float16: _Optional[bool] = ..., filterable: _Optional[_Iterable[_Union[FieldSchema, _Mapping]]] = ...) -> None: ...

class SearchParams(_message.Message):
    __slots__ = ("nprobe", "ef_search")
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    nprobe: int
    ef_search: int
    def __init__(self, nprobe: _Optional[int] = ..., ef_search: _Optional[int] = ...) -> None: ...
