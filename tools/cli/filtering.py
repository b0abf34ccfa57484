"""Filters and typed payloads on the command line: the `--filter` flag of search, sample, dedup and loadtest, and
the checks of `--payload` files (docs/API.md, "Filters").

May use: the base package (lookalike.filters, lookalike.payloads), tools.cli.common.
"""

from __future__ import annotations

from lookalike.errors import InvalidArgument
from lookalike.filters import check_filter, parse_filter
from lookalike.payloads import payload_to_proto
from protos import common_pb2
from tools.cli.common import UserError

FILTER_HELP = ("only items whose payload matches, e.g. \"category=shoes and price<100 and seller!=s1\": = != < <= > >= "
               "in (...) not in (...) exists(FIELD) and or not, on the collection's --filterable fields "
               "(default: none, every item)")


def filter_flag(sp) -> None:
    """--filter TEXT (default: none)."""
    sp.add_argument("--filter", default=None, metavar="TEXT", help=FILTER_HELP)


def cli_filter(client, collection: str, text: str | None) -> common_pb2.Filter | None:
    """The ``--filter`` text as a Filter message, read with the collection's filterable fields (so that
    ``sku=123`` on a string field compares strings); None without one.

    Raises:
        UserError: it does not parse, or does not fit the collection's filterable fields.
    """
    if text is None:
        return None
    schema = {f.name: _TYPE[f.type] for f in client.describe_collection(collection).spec.filterable}
    try:
        filt = parse_filter(text, schema)
        check_filter(filt, schema, collection)  # here, before a job or a load test starts with it
        return filt
    except InvalidArgument as err:
        raise UserError(f"--filter: {err}") from None


def check_payload_file(payloads: list[dict], path: str) -> None:
    """Refuses a --payload file with a value no payload can hold (null, a nested object, a mixed list), naming the
    object."""
    for i, p in enumerate(payloads, 1):
        try:
            payload_to_proto(p)
        except InvalidArgument as err:
            raise UserError(f"--payload {path}: object {i}: {err}") from None


_TYPE = {common_pb2.TYPE_STRING: "string", common_pb2.TYPE_INT: "int", common_pb2.TYPE_FLOAT: "float",
         common_pb2.TYPE_BOOL: "bool", common_pb2.TYPE_TIMESTAMP: "timestamp",
         common_pb2.TYPE_STRING_LIST: "string_list", common_pb2.TYPE_INT_LIST: "int_list"}
