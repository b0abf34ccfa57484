"""`lookalike`: the command line for people. The only module (with the Ray actors) that configures logging and
reads flags and the environment. This module assembles the parser from the verb groups' modules and runs a
command; tools.cli.common holds what they share.

Errors: a mistake in what was given (a flag, a file, a value), or a server that refuses or cannot be reached, is
one line on stderr and a non-zero exit status (2: a mistake on the command line or in a file; 130: Ctrl-C; 1:
anything else). An exception nobody expected (a bug) is one line too, naming it, and ``LOOKALIKE_DEBUG=1`` shows its
traceback instead (main(), the last resort).

May use: every layer below tools (through the verb groups' modules) and tools' own modules.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import grpc

from lookalike import logs
from tools.cli import backup, catalog, cluster, collections, data, load, security, serve, training
from tools.cli.common import UserError, one_line, os_error, rpc_error_line
from tools.cli.flags import Parser, VersionAction, connection_defaults, connection_flags


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lookalike", description="Sharded similarity search for image catalogs. The connection flags "
               "(--target, --tls-*, --token-file) go before or after the subcommand.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more (INFO)")
    p.add_argument("--version", action=VersionAction, help="print the version of lookalike and exit")
    connection_flags(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_serve(sub)
    security.add_token(sub)
    collections.add_collection(sub)
    data.add_items(sub)
    training.add_train_encoder(sub)
    catalog.add_catalog(sub)
    cluster.add_status(sub)
    training.add_train(sub)
    cluster.add_rebalance(sub)
    load.add_loadtest(sub)
    cluster.add_size(sub)
    load.add_bench(sub)
    backup.add_backup(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit status (also for a command line argparse refuses: 2, or --help: 0)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        if argv[:1] == ["bench"]:  # the benchmark has its own flags
            return load.bench_main(argv[1:])
        args = parser.parse_args(argv)
        connection_defaults(parser, args)
    except SystemExit as stop:  # argparse: --help, --version, or a command line it refuses (one line on stderr)
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 2
    try:
        fmt = logs.log_format(getattr(args, "log_format", None))  # serve's --log-format, or LOOKALIKE_LOG_FORMAT
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logs.configure(logging.INFO if args.verbose or args.command == "serve" else logging.WARNING, fmt)
    try:
        return int(args.func(args) or 0)
    except SystemExit as stop:  # a command that ends itself (Ctrl-C while following a job: 130)
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
    except BrokenPipeError:  # `lookalike search ... | head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"\ninterrupted: `lookalike {args.command}` stopped", file=sys.stderr)
        return 130
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return err.status
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        print(f"error: {os_error(err)}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as err:
        print(f"error: a file given is not UTF-8 text ({err.reason} at byte {err.start})", file=sys.stderr)
        return 2
    except Exception as err:
        if isinstance(err, grpc.RpcError) and hasattr(err, "code"):
            print(rpc_error_line(err, args), file=sys.stderr)
            return 1
        if os.environ.get("LOOKALIKE_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: unexpected {type(err).__name__}: {one_line(err)} (a bug in lookalike, or a case it does not "
              "know: run again with LOOKALIKE_DEBUG=1 for the traceback, and report it)", file=sys.stderr)
        return 1
