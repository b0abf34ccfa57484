from protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WalRecord(_message.Message):
    __slots__ = ("op", "ids", "vectors", "payloads", "buckets")
    class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UPSERT: _ClassVar[WalRecord.Op]
        DELETE: _ClassVar[WalRecord.Op]
        RESET: _ClassVar[WalRecord.Op]
    UPSERT: WalRecord.Op
    DELETE: WalRecord.Op
    RESET: WalRecord.Op
    OP_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    op: WalRecord.Op
    ids: _containers.RepeatedScalarFieldContainer[str]
    vectors: _common_pb2.Vectors
    payloads: _containers.RepeatedScalarFieldContainer[bytes]
    buckets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, op: _Optional[_Union[WalRecord.Op, str]] = ..., ids: _Optional[_Iterable[str]] = ..., vectors: _Optional[_Union[_common_pb2.Vectors, _Mapping]] = ..., payloads: _Optional[_Iterable[bytes]] = ..., buckets: _Optional[_Iterable[int]] = ...) -> None: ...

class BucketSnapshot(_message.Message):
    __slots__ = ("bucket", "ids", "vectors", "payloads")
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    bucket: int
    ids: _containers.RepeatedScalarFieldContainer[str]
    vectors: _common_pb2.Vectors
    payloads: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, bucket: _Optional[int] = ..., ids: _Optional[_Iterable[str]] = ..., vectors: _Optional[_Union[_common_pb2.Vectors, _Mapping]] = ..., payloads: _Optional[_Iterable[bytes]] = ...) -> None: ...
