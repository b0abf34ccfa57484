"""The command line's parser: :class:`Parser` (errors in one line), the argument types (numbers within bounds,
sizes, ports, targets), the connection and TLS flags every client command shares, and
:func:`connection_defaults`, which fills in the connection flags after parsing.

May use: the base package (lookalike), encoder (the names of its encoders, for the help) and tools.cli.common.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import tomllib
from importlib import metadata

from encoder.registry import available
from tools.cli.common import CONNECTION_DEFAULTS, DEFAULT_TARGET, one_line, parse_bytes


class _Help(argparse.RawDescriptionHelpFormatter):
    """Help that shows every option's default (unless its sentence already says it) and the encoders the registry
    knows (``%(encoders)s``, looked up only when help is printed)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(encoders)s" in text:
            text = text.replace("%(encoders)s", _encoder_forms().replace("%", "%%"))
        if (action.option_strings and action.nargs != 0 and "default" not in text
                and action.default not in (None, False, "", argparse.SUPPRESS)):
            text += " (default %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: what is wrong, and where the help is (the usage, on one line,
    when something required is missing)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        # No abbreviated flags: `size --shards 4` silently meant --shards-per-node 4.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        if "required" in message:
            usage = " ".join(self.format_usage().split()[1:])
            message += f" (usage: {usage})"
        self.exit(2, f"{self.prog}: error: {one_line(message)}; `{self.prog} --help` says more\n")


class VersionAction(argparse.Action):
    """--version: the installed package's version, else the source's (pyproject.toml); read only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"lookalike {package_version()}")
        parser.exit()


def package_version() -> str:
    """The version of lookalike: the installed distribution's, else pyproject.toml's next to this source."""
    try:
        return metadata.version("lookalike")
    except metadata.PackageNotFoundError:
        try:
            toml = (pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
            return tomllib.loads(toml)["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown (not installed, and no pyproject.toml beside the source)"


# How each encoder of the registry is named on the command line (its argument after the colon); a name the
# registry adds later shows as it is.
_ENCODER_ARGS = {"phash": "phash[:N] (N x N-bit hash, default 8)", "face": "face[:strict]",
                 "torchscript": "torchscript:PATH (your TorchScript model, or `lookalike train-encoder`'s)"}


def _encoder_forms() -> str:
    return ", ".join(_ENCODER_ARGS.get(name, name) for name in available())


def number(kind, low=None, high=None, above=None):
    """An argparse type: text -> ``kind`` (int or float) within bounds; its errors are sentences."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"takes {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"takes a finite number, got {text!r}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be more than {above}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = number(int, low=1)        # something there must be at least one of
non_negative_int = number(int, low=0)     # 0: the default (the server's, the collection's, none)
positive_float = number(float, above=0)
port_number = number(int, low=0, high=65535)


def search_param_flags(sp) -> None:
    """--nprobe and --ef-search: a search's breadth, 0 meaning the collection's own."""
    sp.add_argument("--nprobe", type=non_negative_int, default=0,
                    help="IVF indexes: inverted lists to probe (default 0: the collection's)")
    sp.add_argument("--ef-search", type=non_negative_int, default=0,
                    help="HNSW indexes: search breadth (default 0: the collection's)")


def byte_size(text: str) -> int:
    """argparse type of a memory size: '8Gi', '512Mi', '2G', '1000000' -> bytes."""
    try:
        value = parse_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a size such as 8Gi, 512Mi or 1000000 (bytes), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def shard_gpus(text: str):
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes auto or a number of GPUs (0: CPU shards), got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be auto or at least 0, got {text}")
    return value


_GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


def grpc_target(text: str) -> str:
    """argparse type of --target: HOST:PORT (or a gRPC target with a scheme, e.g. unix:PATH, passed as it is)."""
    if text.startswith(_GRPC_SCHEMES):
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"takes HOST:PORT (e.g. {DEFAULT_TARGET}), port 1 to 65535; got {text!r}")
    return text


def tls_flags(sp, server: bool) -> None:
    """--tls-cert, --tls-key, --tls-ca, --tls-server-name; their defaults are filled in after parsing
    (:data:`CONNECTION_DEFAULTS`), so that the same flags before the subcommand count too."""
    who = "the router's (and the shards')" if server else "this client's, for mutual TLS"
    sp.add_argument("--tls-cert", default=argparse.SUPPRESS, metavar="PEM",
                    help=f"certificate chain: {who} (env LOOKALIKE_TLS_CERT; default: none)")
    sp.add_argument("--tls-key", default=argparse.SUPPRESS, metavar="PEM",
                    help="private key of --tls-cert (env LOOKALIKE_TLS_KEY; default: none)")
    sp.add_argument("--tls-ca", default=argparse.SUPPRESS, metavar="PEM",
                    help="CA bundle that signs the other end's certificate "
                    + ("(clients' with --tls-client-auth; the shards' and routers' inside the cluster)" if server
                       else "(the router's); giving it turns TLS on") + " (env LOOKALIKE_TLS_CA; default: none"
                    + ("" if server else ": plaintext, or the system's roots with --tls-cert") + ")")
    sp.add_argument("--tls-server-name", default=argparse.SUPPRESS, metavar="NAME",
                    help="check the peer's certificate for this name instead of its address"
                    + (" (inside the cluster: the name on the shards' certificate)" if server else "")
                    + " (env LOOKALIKE_TLS_SERVER_NAME; default: the address's host)")


def connection_flags(sp) -> None:
    """The flags of a client command's connection to the router (also accepted before the subcommand)."""
    sp.add_argument("--target", type=grpc_target, default=argparse.SUPPRESS, metavar="HOST:PORT",
                    help=f"the router to talk to (env LOOKALIKE_TARGET; default {DEFAULT_TARGET})")
    tls_flags(sp, server=False)
    sp.add_argument("--token-file", default=argparse.SUPPRESS, metavar="FILE",
                    help="file holding the bearer token (env LOOKALIKE_TOKEN_FILE, or the token itself in "
                         "LOOKALIKE_TOKEN; default: no token)")


def with_target(sp):
    """A subcommand that talks to a router: it takes the connection flags."""
    connection_flags(sp)
    sp.set_defaults(connects=True)
    return sp


def connection_defaults(parser: argparse.ArgumentParser, args) -> None:
    """Fills in the connection flags not given (they may come before or after the subcommand); refuses them for a
    command that talks to no router."""
    if not getattr(args, "connects", False):
        flags = ("target", "token_file") if args.command == "serve" else tuple(CONNECTION_DEFAULTS)
        given = [f"--{dest.replace('_', '-')}" for dest in flags if getattr(args, dest, None) is not None]
        if given:
            what = "serve takes --host and --port" if args.command == "serve" else "it talks to no router"
            parser.error(f"{', '.join(given)}: `lookalike {args.command}` takes no connection flags ({what})")
    for dest, default in CONNECTION_DEFAULTS.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, default)
    if getattr(args, "connects", False) and args.target == DEFAULT_TARGET and os.environ.get("LOOKALIKE_TARGET"):
        try:
            args.target = grpc_target(os.environ["LOOKALIKE_TARGET"])
        except argparse.ArgumentTypeError as err:
            parser.error(f"LOOKALIKE_TARGET {err}")
