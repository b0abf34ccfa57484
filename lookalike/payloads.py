"""Typed payloads: Python values <-> ``Value`` messages, the schema of a collection's filterable fields, and the
checks a payload passes on its way in (docs/API.md, "Typed payloads").

A payload travels as a ``Payload`` message: string fields in its ``fields`` map (what clients before typed payloads
send and read), every other type in its ``values`` map. :func:`canonical` puts a payload in that form.

Types, by name: ``string``, ``int``, ``float``, ``bool``, ``timestamp`` (microseconds since the Unix epoch, UTC;
``datetime`` in Python), ``string_list``, ``int_list``.

Uses the base package's errors and the protos only.
"""

from __future__ import annotations

import datetime as dt
import math
import re

from lookalike.errors import InvalidArgument
from protos import common_pb2

# Type name -> FieldType, and the Value oneof member of each.
TYPES = {"string": common_pb2.TYPE_STRING, "int": common_pb2.TYPE_INT, "float": common_pb2.TYPE_FLOAT,
         "bool": common_pb2.TYPE_BOOL, "timestamp": common_pb2.TYPE_TIMESTAMP,
         "string_list": common_pb2.TYPE_STRING_LIST, "int_list": common_pb2.TYPE_INT_LIST}
TYPE_NAMES = {v: k for k, v in TYPES.items()}
_KIND_TYPE = {"string_value": "string", "int_value": "int", "float_value": "float", "bool_value": "bool",
              "timestamp_micros": "timestamp", "string_list": "string_list", "int_list": "int_list"}
NUMERIC = frozenset({"int", "float", "timestamp"})
LISTS = frozenset({"string_list", "int_list"})
_FIELD_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_FILTERABLE = 64
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


# --- the schema of filterable fields -------------------------------------------------------------------------
def parse_schema(text: str) -> tuple[tuple[str, str], ...]:
    """``"category:string,price:float"`` as ((name, type), ...), in the order given ("" gives ()).

    Raises:
        InvalidArgument: a part is not ``name:type``, a name is invalid or repeated, a type unknown.
    """
    out: list[tuple[str, str]] = []
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        name, sep, kind = part.partition(":")
        name, kind = name.strip(), kind.strip().lower()
        if not sep:
            raise InvalidArgument(f"filterable field {part!r} names no type: write name:type, the type one of "
                                  f"{', '.join(TYPES)}")
        check_schema_field(name, kind)
        if any(n == name for n, _ in out):
            raise InvalidArgument(f"filterable field {name!r} is declared twice")
        out.append((name, kind))
    if len(out) > MAX_FILTERABLE:
        raise InvalidArgument(f"{len(out)} filterable fields; a collection declares at most {MAX_FILTERABLE}")
    return tuple(out)


def check_schema_field(name: str, kind: str) -> None:
    if not _FIELD_RE.match(name or ""):
        raise InvalidArgument(f"filterable field name {name!r} is invalid: use 1-64 characters from A-Z a-z 0-9 _ . -")
    if kind not in TYPES:
        raise InvalidArgument(f"filterable field {name!r} has unknown type {kind!r}: use one of {', '.join(TYPES)}")


def schema_text(schema) -> str:
    """((name, type), ...) as ``"name:type,..."``, the form CollectionConfig.filterable keeps."""
    return ",".join(f"{n}:{t}" for n, t in schema)


def schema_to_proto(text: str) -> list[common_pb2.FieldSchema]:
    return [common_pb2.FieldSchema(name=n, type=TYPES[t]) for n, t in parse_schema(text)]


def schema_from_proto(fields) -> str:
    """Repeated FieldSchema as the text form. Raises InvalidArgument for an unset type or a bad name."""
    parts = []
    for f in fields:
        if f.type not in TYPE_NAMES:
            raise InvalidArgument(f"filterable field {f.name!r} has no type: set one of {', '.join(TYPES)}")
        parts.append(f"{f.name}:{TYPE_NAMES[f.type]}")
    return schema_text(parse_schema(",".join(parts)))


# --- values ------------------------------------------------------------------------------------------------
def value_type(v: common_pb2.Value) -> str:
    """The type name of a Value; "" when it holds none."""
    return _KIND_TYPE.get(v.WhichOneof("kind") or "", "")


def to_micros(t: dt.datetime) -> int:
    """A datetime as microseconds since the Unix epoch (a naive one is taken as UTC)."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    delta = t - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(us: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=int(us))


def parse_timestamp(text: str) -> int | None:
    """An ISO-8601 date or date-time ("2026-01-31", "2026-01-31T12:00:00Z") as microseconds; None if it is not one."""
    if not re.match(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?$", text):
        return None
    try:
        return to_micros(dt.datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        return None


def to_value(x) -> common_pb2.Value:
    """A Python value as a Value: str, bool, int, float (finite), datetime, or a list of str or of int.

    Raises:
        InvalidArgument: any other type, a non-finite float, a mixed list, or an int beyond 64 bits.
    """
    v = common_pb2.Value()
    if isinstance(x, str):
        v.string_value = x
    elif isinstance(x, bool):
        v.bool_value = x
    elif isinstance(x, int):
        if not -(1 << 63) <= x < (1 << 63):
            raise InvalidArgument(f"integer {x} does not fit in 64 bits")
        v.int_value = x
    elif isinstance(x, float):
        if not math.isfinite(x):
            raise InvalidArgument(f"float {x} is not finite")
        v.float_value = x
    elif isinstance(x, dt.datetime):
        v.timestamp_micros = to_micros(x)
    elif isinstance(x, dt.date):
        v.timestamp_micros = to_micros(dt.datetime(x.year, x.month, x.day))
    elif isinstance(x, (list, tuple)):
        if all(isinstance(e, str) for e in x):
            v.string_list.values.extend(x)
            if not x:
                v.string_list.SetInParent()
        elif all(isinstance(e, int) and not isinstance(e, bool) for e in x):
            v.int_list.values.extend(x)
        else:
            raise InvalidArgument("a list value holds only strings or only integers")
    else:
        raise InvalidArgument(f"a payload value of type {type(x).__name__} is not supported: use str, int, float, "
                              "bool, datetime, or a list of str or int")
    return v


def from_value(v: common_pb2.Value):
    """A Value as Python: str, int, float, bool, datetime (UTC), list; None when it holds none."""
    kind = v.WhichOneof("kind")
    if kind == "timestamp_micros":
        return from_micros(v.timestamp_micros)
    if kind in ("string_list", "int_list"):
        return list(getattr(v, kind).values)
    return getattr(v, kind) if kind else None


def plain(v: common_pb2.Value):
    """A Value as what an index keeps: str, int, float, bool, int microseconds, or a tuple for lists."""
    kind = v.WhichOneof("kind")
    if kind in ("string_list", "int_list"):
        return tuple(getattr(v, kind).values)
    return getattr(v, kind) if kind else None


# --- payloads ----------------------------------------------------------------------------------------------
def payload_to_proto(d: dict | None) -> common_pb2.Payload:
    """A dict of Python values as a Payload (strings in ``fields``, the others in ``values``)."""
    p = common_pb2.Payload()
    for k, x in (d or {}).items():
        if isinstance(x, str):
            p.fields[str(k)] = x
        else:
            p.values[str(k)].CopyFrom(to_value(x))
    return p


def payload_to_dict(p: common_pb2.Payload) -> dict:
    """A Payload as a dict of Python values (both maps)."""
    out = dict(p.fields)
    for k, v in p.values.items():
        out[k] = from_value(v)
    return out


def typed_items(p: common_pb2.Payload):
    """(name, type, value as :func:`plain` gives it) of every field of a Payload."""
    for k, s in p.fields.items():
        yield k, "string", s
    for k, v in p.values.items():
        kind = value_type(v)
        if kind:
            yield k, kind, plain(v)


def canonical(p: common_pb2.Payload, schema: dict[str, str] | None = None, item: str = "") -> common_pb2.Payload:
    """The payload in its stored form: string values in ``fields``, the others in ``values``; with the declared
    ``schema`` (name -> type), an ISO-8601 string becomes a timestamp and an int a float where the field is
    declared so (JSON has neither timestamps nor float-typed whole numbers).

    Raises:
        InvalidArgument: naming ``item`` and the field: a name in both maps, an empty value, a non-finite float,
            or a value of another type than the field's declared one.
    """
    schema = schema or {}
    where = f"item {item!r}" if item else "a payload"
    out = common_pb2.Payload()
    for k, s in p.fields.items():
        if k in p.values:
            raise InvalidArgument(f"{where}: field {k!r} is given twice (in fields and in values)")
        out.fields[k] = s
    for k, v in p.values.items():
        kind = value_type(v)
        if not kind:
            raise InvalidArgument(f"{where}: field {k!r} holds no value")
        if kind == "string":
            out.fields[k] = v.string_value
        elif kind == "float" and not math.isfinite(v.float_value):
            raise InvalidArgument(f"{where}: field {k!r} is not a finite number")
        else:
            out.values[k].CopyFrom(v)
    for k, want in schema.items():
        if k in out.fields and want == "timestamp":
            us = parse_timestamp(out.fields[k])
            if us is None:
                raise InvalidArgument(f"{where}: field {k!r} is a timestamp; {out.fields[k]!r} is not an ISO-8601 "
                                      "date or date-time")
            del out.fields[k]
            out.values[k].timestamp_micros = us
        elif k in out.values and want == "float" and value_type(out.values[k]) == "int":
            out.values[k].float_value = float(out.values[k].int_value)
        elif k in out.values and want in LISTS and value_type(out.values[k]) in LISTS \
                and not len(getattr(out.values[k], value_type(out.values[k])).values):
            out.values[k].Clear()
            getattr(out.values[k], want).SetInParent()  # an empty list is of either list type
        got = "string" if k in out.fields else value_type(out.values[k]) if k in out.values else want
        if got != want:
            raise InvalidArgument(f"{where}: field {k!r} is declared {want}, got a {got}")
    return out


def check_types(items, types: dict[str, str]) -> dict[str, str]:
    """Checks the fields of ``items`` ((item id, Payload), ...) against the types already fixed (name -> type,
    declared or first seen); returns the types the items fix anew (a field's first value fixes its type).

    Raises:
        InvalidArgument: a value of another type than its field's, naming the item and the field.
    """
    new: dict[str, str] = {}
    for uid, p in items:
        for name, kind, value in typed_items(p):
            want = types.get(name) or new.get(name)
            if want is None:
                if not (kind in LISTS and not value):  # an empty list is of either list type: it fixes none
                    new[name] = kind
            elif kind != want and not (kind in LISTS and want in LISTS and not value):
                raise InvalidArgument(f"item {uid!r}: field {name!r} is of type {want}, got a {kind}")
    return new
