"""Filters on typed payloads (docs/API.md, "Filters"): checking a ``Filter`` message against a collection's
filterable fields, building one from Python dicts (the client) or from a compact text form (the CLI).

Text form (``lookalike search --filter``)::

    category=shoes and price<100 and seller!=s1
    (color in (red, blue) or on_sale=true) and not exists(discontinued)
    created>=2026-01-01 and tags not in ('old', "used")

Operators ``= == != < <= > >=``, ``in (...)``, ``not in (...)``, ``exists(field)``; ``and`` binds tighter than
``or``; ``not`` and parentheses. Values: 'quoted' or "quoted" strings, numbers, true/false, ISO-8601 dates or
date-times (timestamps), and bare words (strings).

Uses the base package's errors and payloads, and the protos.
"""

from __future__ import annotations

import re

from lookalike.errors import InvalidArgument
from lookalike.payloads import NUMERIC, parse_timestamp, to_value, value_type
from protos import common_pb2

MAX_DEPTH = 8
MAX_VALUES = 1024
MAX_NODES = 256

# What each field type's values may be in a condition: the element type for lists, numbers mixing int and float.
_ACCEPTS = {"string": {"string"}, "bool": {"bool"}, "int": {"int", "float"}, "float": {"int", "float"},
            "timestamp": {"timestamp"}, "string_list": {"string"}, "int_list": {"int"}}


def check_filter(f: common_pb2.Filter, schema: dict[str, str], collection: str = "") -> None:
    """Checks a filter against the collection's filterable fields (name -> type).

    Raises:
        InvalidArgument: with a sentence: a field that is not filterable, a value of the wrong type, a range on a
            field that is not a number or timestamp, an empty condition, nested deeper than MAX_DEPTH, more than
            MAX_VALUES values or MAX_NODES conditions in all.
    """
    counts = [0, 0]  # values, nodes
    _check(f, schema, collection, 1, counts)


def _check(f, schema, collection, depth, counts) -> None:
    if depth > MAX_DEPTH:
        raise InvalidArgument(f"the filter is nested more than {MAX_DEPTH} levels deep")
    counts[1] += 1
    if counts[1] > MAX_NODES:
        raise InvalidArgument(f"the filter has more than {MAX_NODES} conditions and groups")
    kind = f.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("the filter (or a part of it) is empty: set a condition, all, any or negate")
    if kind in ("all", "any"):
        for sub in getattr(f, kind).filters:
            _check(sub, schema, collection, depth + 1, counts)
    elif kind == "negate":
        _check(f.negate, schema, collection, depth + 1, counts)
    else:
        _check_condition(f.condition, schema, collection, counts)


def _check_condition(c: common_pb2.Condition, schema, collection, counts) -> None:
    where = f" of collection {collection!r}" if collection else ""
    if c.field not in schema:
        known = ", ".join(sorted(schema)) or "none"
        raise InvalidArgument(f"the filter names field {c.field!r}, which is not a filterable field{where} "
                              f"(filterable: {known}; declare fields with --filterable at creation)")
    ftype = schema[c.field]
    op = c.WhichOneof("op")
    if op is None:
        raise InvalidArgument(f"the filter's condition on {c.field!r} has no operator (eq, in, not_in, range, exists)")
    if op == "exists":
        return
    if op == "range":
        if ftype not in NUMERIC:
            raise InvalidArgument(f"the filter asks a range of field {c.field!r}, a {ftype}: ranges apply to numbers "
                                  "and timestamps")
        bounds = [getattr(c.range, b) for b in ("gt", "gte", "lt", "lte") if c.range.HasField(b)]
        if not bounds:
            raise InvalidArgument(f"the filter's range on {c.field!r} has no bound")
        values = bounds
    elif op == "eq":
        values = [c.eq]
    else:
        values = list(getattr(c, op).values)
    counts[0] += len(values)
    if counts[0] > MAX_VALUES:
        raise InvalidArgument(f"the filter holds more than {MAX_VALUES} values")
    for v in values:
        got = value_type(v)
        if got not in _ACCEPTS[ftype]:
            raise InvalidArgument(f"the filter compares field {c.field!r} ({ftype}) with a {got or 'missing value'}"
                                  f": give a {' or '.join(sorted(_ACCEPTS[ftype]))}")


# --- building filters -------------------------------------------------------------------------------------
def condition(field: str, op: str, value=None) -> common_pb2.Filter:
    """One condition: op one of eq, ne, in, not_in, gt, gte, lt, lte, exists (value: a Python value, a list for
    in/not_in, a bool for exists)."""
    f = common_pb2.Filter()
    c = f.condition
    c.field = field
    if op == "eq":
        c.eq.CopyFrom(to_value(value))
    elif op == "ne":
        return negate(condition(field, "eq", value))
    elif op in ("in", "not_in"):
        if not isinstance(value, (list, tuple, set)):
            raise InvalidArgument(f"{op} on {field!r} takes a list of values")
        getattr(c, op).SetInParent()
        getattr(c, op).values.extend(to_value(v) for v in value)
    elif op in ("gt", "gte", "lt", "lte"):
        getattr(c.range, op).CopyFrom(to_value(value))
    elif op == "exists":
        c.exists = bool(True if value is None else value)
    else:
        raise InvalidArgument(f"unknown filter operator {op!r}: use eq, ne, in, not_in, gt, gte, lt, lte or exists")
    return f


def all_of(*filters) -> common_pb2.Filter:
    f = common_pb2.Filter()
    f.all.SetInParent()
    f.all.filters.extend(filters)
    return f


def any_of(*filters) -> common_pb2.Filter:
    f = common_pb2.Filter()
    f.any.SetInParent()
    f.any.filters.extend(filters)
    return f


def negate(filt: common_pb2.Filter) -> common_pb2.Filter:
    f = common_pb2.Filter()
    f.negate.CopyFrom(filt)
    return f


def to_filter(spec) -> common_pb2.Filter | None:
    """A filter from what a caller gives: None, a Filter message, the text form, or a dict.

    A dict is the ``and`` of its items: ``{"category": "shoes"}`` (equality), ``{"color": ["red", "blue"]}``
    (in), ``{"price": {"gte": 10, "lt": 100}}`` (operators eq, ne, in, not_in, gt, gte, lt, lte, exists),
    ``{"$or": [dict, ...]}``, ``{"$and": [...]}``, ``{"$not": dict}``.
    """
    if spec is None or isinstance(spec, common_pb2.Filter):
        return spec
    if isinstance(spec, str):
        return parse_filter(spec)
    if not isinstance(spec, dict):
        raise InvalidArgument(f"a filter is a dict, a string or a Filter message, not a {type(spec).__name__}")
    parts = []
    for key, val in spec.items():
        if key in ("$or", "$and"):
            subs = [to_filter(s) for s in val]
            parts.append(any_of(*subs) if key == "$or" else all_of(*subs))
        elif key == "$not":
            parts.append(negate(to_filter(val)))
        elif isinstance(val, dict):
            parts.extend(condition(key, op, v) for op, v in val.items())
        elif isinstance(val, (list, tuple, set)):
            parts.append(condition(key, "in", list(val)))
        else:
            parts.append(condition(key, "eq", val))
    return parts[0] if len(parts) == 1 else all_of(*parts)


# --- the text form -----------------------------------------------------------------------------------------
_TOKEN = re.compile(r"""\s*(?:(?P<str>'[^']*'|"[^"]*")|(?P<op><=|>=|!=|==|=|<|>|\(|\)|,)|(?P<word>[^\s=!<>(),'"]+))""")
_KEYWORDS = {"and", "or", "not", "in", "exists"}


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise InvalidArgument(f"cannot read the filter at {text[pos:pos + 20]!r}")
        pos = m.end()
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
    return out


def _value(tok: tuple[str, str], ftype: str | None = None):
    kind, s = tok
    if kind == "str":
        return s[1:-1]
    if kind != "word":
        raise InvalidArgument(f"the filter has {s!r} where a value belongs" if s else "the filter ends where a value "
                              "belongs")
    if ftype in ("string", "string_list"):  # a bare word on a string field is a string, digits or not
        return s
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if re.fullmatch(r"[+-]?\d+", s):
        return int(s)
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?", s):
        return float(s)
    us = parse_timestamp(s)
    if us is not None:
        v = common_pb2.Value(timestamp_micros=us)
        return v
    return s


class _Parser:
    def __init__(self, text: str, schema: dict[str, str] | None = None):
        self.toks = _tokens(text)
        self.i = 0
        self.text = text
        self.schema = schema or {}

    def peek(self, ahead: int = 0):
        j = self.i + ahead
        return self.toks[j] if j < len(self.toks) else ("end", "")

    def word(self, w: str, ahead: int = 0) -> bool:
        k, s = self.peek(ahead)
        return k == "word" and s.lower() == w

    def take(self, kind: str, s: str | None = None) -> str:
        k, got = self.peek()
        if k != kind or (s is not None and got != s):
            raise InvalidArgument(f"the filter {self.text!r} expects {s or kind} at {got or 'its end'!r}")
        self.i += 1
        return got

    def parse(self) -> common_pb2.Filter:
        f = self.or_()
        if self.peek()[0] != "end":
            raise InvalidArgument(f"the filter {self.text!r} has something left over at {self.peek()[1]!r}")
        return f

    def or_(self):
        parts = [self.and_()]
        while self.word("or"):
            self.i += 1
            parts.append(self.and_())
        return parts[0] if len(parts) == 1 else any_of(*parts)

    def and_(self):
        parts = [self.unary()]
        while self.word("and"):
            self.i += 1
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else all_of(*parts)

    def unary(self):
        if self.word("not") and not self.word("in", 1):
            self.i += 1
            return negate(self.unary())
        if self.peek() == ("op", "("):
            self.i += 1
            f = self.or_()
            self.take("op", ")")
            return f
        if self.word("exists") and self.peek(1) == ("op", "("):
            self.i += 2
            field = self.take("word")
            self.take("op", ")")
            return condition(field, "exists", True)
        return self.cond()

    def values(self, field: str) -> list:
        self.take("op", "(")
        out = [self.one_value(field)]
        while self.peek() == ("op", ","):
            self.i += 1
            out.append(self.one_value(field))
        self.take("op", ")")
        return out

    def one_value(self, field: str):
        tok = self.peek()
        self.i += 1
        return _value(tok, self.schema.get(field))

    def cond(self):
        k, field = self.peek()
        if k != "word" or field.lower() in _KEYWORDS:
            raise InvalidArgument(f"the filter {self.text!r} expects a field name at {field or 'its end'!r}")
        self.i += 1
        if self.word("in"):
            self.i += 1
            return _cond(field, "in", self.values(field))
        if self.word("not") and self.word("in", 1):
            self.i += 2
            return _cond(field, "not_in", self.values(field))
        k, op = self.peek()
        ops = {"=": "eq", "==": "eq", "!=": "ne", "<": "lt", "<=": "lte", ">": "gt", ">=": "gte"}
        if k != "op" or op not in ops:
            raise InvalidArgument(f"the filter {self.text!r} expects an operator after {field!r}, got "
                                  f"{op or 'its end'!r}")
        self.i += 1
        return _cond(field, ops[op], self.one_value(field))


def _cond(field: str, op: str, value) -> common_pb2.Filter:
    """condition() taking Value messages (timestamps from the text form) as they are."""
    if isinstance(value, list) and any(isinstance(v, common_pb2.Value) for v in value):
        f = condition(field, op, [])
        getattr(f.condition, op).values.extend(v if isinstance(v, common_pb2.Value) else to_value(v) for v in value)
        return f
    if isinstance(value, common_pb2.Value):
        f = condition(field, op, 0)
        target = f.negate.condition.eq if op == "ne" else (f.condition.eq if op == "eq" else
                                                           getattr(f.condition.range, op))
        target.CopyFrom(value)
        return f
    return condition(field, op, value)


def parse_filter(text: str, schema: dict[str, str] | None = None) -> common_pb2.Filter:
    """The text form (see the module docstring) as a Filter; with the collection's filterable fields (``schema``,
    name -> type), a bare word compared with a string field is a string even when it looks like a number.

    Raises:
        InvalidArgument: it does not parse, with where.
    """
    if not text or not text.strip():
        raise InvalidArgument("the filter is empty")
    return _Parser(text, schema).parse()
