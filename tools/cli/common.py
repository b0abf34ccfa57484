"""What every command of the CLI shares: :class:`UserError` (a one-line mistake of the user's), the connection to
the router (TLS, bearer token, the client), the one line that says why a call failed, and the readers of the files
the user names (.npy arrays, id lists, JSON-lines payloads).

May use: the base package (lookalike) and protos.
"""

from __future__ import annotations

import json
import pickle
import socket
import ssl

import grpc
import numpy as np

from lookalike.client import Client
from lookalike.errors import InvalidArgument
from lookalike.security import TLSConfig, read_token
from protos import common_pb2


DEFAULT_TARGET = "localhost:50051"
# The connection flags of client commands (dest: default), accepted before the subcommand too.
CONNECTION_DEFAULTS = {"target": DEFAULT_TARGET, "tls_cert": "", "tls_key": "", "tls_ca": "", "tls_server_name": "",
                       "token_file": None}


class UserError(Exception):
    """What the user gave cannot work (a flag, a file, a value): ``str(err)`` is the one sentence to print.

    Args:
        status: the exit status (2: the command line or a file; 1: the cluster's state).
    """

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def tls_config(args, server: bool = False):
    """The TLS files of the flags, else of LOOKALIKE_TLS_* (lookalike.security.TLSConfig); None: plaintext."""
    env = TLSConfig.from_env() or TLSConfig()
    cert, key, ca = args.tls_cert or env.cert, args.tls_key or env.key, args.tls_ca or env.ca
    if not (cert or key or ca):
        return None
    client_auth = server and (args.tls_client_auth or env.client_auth)
    return TLSConfig(cert, key, ca, client_auth, args.tls_server_name or env.server_name)


def connection(args) -> dict:
    """Client keyword arguments of the connection flags: tls and the bearer token (a file or the environment)."""
    try:
        return {"tls": tls_config(args), "token": read_token(args.token_file)}
    except InvalidArgument as err:
        raise UserError(str(err)) from None


def open_client(args, conn: dict | None = None):
    try:  # the channel reads the TLS files, and refuses a token in plaintext beyond loopback
        return Client(args.target, **(conn if conn is not None else connection(args)))
    except (InvalidArgument, ValueError) as err:
        raise UserError(str(err)) from None


# --- errors -----------------------------------------------------------------------------------------------------
# How gRPC's client describes a connection it could not make (the call never reached a server), as opposed to an
# UNAVAILABLE a server answered with a sentence of its own.
_TRANSPORT_FAILURES = ("failed to connect to all addresses", "DNS resolution failed", "Socket closed",
                       "Connection reset", "Connection refused", "Tls handshake failed", "Ssl handshake failed")


def one_line(text) -> str:
    return " ".join(str(text).split())


def rpc_error_line(err, args) -> str:
    """The one line that says what a failed call means: the server's status and sentence, or, when the call never
    reached a server, why not (with a TLS hint only where TLS is what differs)."""
    code, details = err.code(), one_line(err.details() or "")
    if code == grpc.StatusCode.UNAVAILABLE and details.startswith(_TRANSPORT_FAILURES):
        return _unreachable(getattr(args, "target", DEFAULT_TARGET), details, tls_config(args) is not None)
    return f"error: {code.name}: {details}"


def _unreachable(target: str, details: str, client_tls: bool) -> str:
    """One sentence for a router this client could not talk to. The TLS hints come from asking the address itself
    whether it speaks TLS (:func:`_speaks_tls`), not from guessing."""
    where = f"cannot reach the router at {target}"
    if "DNS resolution failed" in details:
        return f"error: {where}: its host name does not resolve (--target HOST:PORT names the router)"
    if "connection refused" in details.lower():
        return (f"error: {where}: connection refused (is `lookalike serve` running there? --target HOST:PORT "
                "names another router)")
    speaks = _speaks_tls(target)
    if speaks and not client_tls:
        return (f"error: {where}: it speaks TLS and this client plaintext; give the CA that signed its certificate "
                "with --tls-ca CA.pem (or LOOKALIKE_TLS_CA)")
    if speaks is False and client_tls:
        return (f"error: {where}: it serves plaintext and this client speaks TLS; drop --tls-ca, --tls-cert and "
                "--tls-key (and LOOKALIKE_TLS_*)")
    if client_tls and "CERTIFICATE_VERIFY_FAILED" in details:
        return (f"error: {where}: its certificate is not signed by the CA of --tls-ca, or does not name the host of "
                "--target (--tls-server-name NAME checks another name)")
    return f"error: {where}: {details.rsplit(': ', 1)[-1] or details}"


def _speaks_tls(target: str, timeout: float = 2.0) -> bool | None:
    """Whether the server at ``target`` (host:port) answers a TLS handshake: True, False, or None when it cannot
    be told (no connection, or not a host:port target)."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a probe: whether it speaks TLS at all, not whom to trust
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw:
            with ctx.wrap_socket(raw) as tls:
                tls.do_handshake()
        return True
    except ssl.SSLError as err:
        # an alert from the server (e.g. it wants a client certificate) is TLS too
        return "ALERT" in (err.reason or "").upper()
    except OSError:
        return None


def os_error(err: OSError, what: str = "") -> str:
    """``--ids x.txt: no such file`` from an OSError (``what``: the flag or argument that named the file)."""
    reason = {FileNotFoundError: "no such file", IsADirectoryError: "a folder, not a file",
              NotADirectoryError: "a path through something that is not a folder",
              PermissionError: "permission denied"}.get(type(err)) or (err.strerror or str(err)).lower()
    named = " ".join(str(x) for x in (what, err.filename) if x not in (None, ""))
    return f"{named}: {reason}" if named else reason


def load_npy(path: str, what: str, mmap: bool = False) -> np.ndarray:
    """A .npy file as an array, or a UserError naming ``what`` (the flag or argument) and the file."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except OSError as err:
        raise UserError(os_error(err, what)) from None
    except (ValueError, EOFError, pickle.UnpicklingError) as err:
        raise UserError(f"{what} {path}: not a .npy array of numbers ({one_line(err)}); write it with "
                        "numpy.save") from None


def read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        raise UserError(os_error(err, what)) from None
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path}: not UTF-8 text (byte {err.start})") from None


def read_lines(path: str, what: str) -> list[str]:
    """The non-empty lines of a text file (ids), or a UserError naming ``what`` and the file."""
    return [line.rstrip("\r") for line in read_text(path, what).split("\n") if line.strip()]


def read_payloads(path: str, what: str = "--payload") -> list[dict]:
    """One JSON object per non-empty line; a UserError names the file and the line that is not one."""
    out = []
    for number, line in enumerate(read_text(path, what).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{what} {path} line {number}: not JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{what} {path} line {number}: a JSON {type(obj).__name__}, not an object "
                            '({"field": "value", ...})')
        out.append(obj)
    return out


def parse_bytes(text: str) -> int:
    """'8Gi', '512Mi', '2G', '1000000' -> bytes (Kubernetes quantity suffixes)."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "K": 10**3, "M": 10**6, "G": 10**9,
             "T": 10**12}
    text = str(text).strip()
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return int(float(text[:-len(suffix)]) * factor)
    return int(float(text))


def metric_name(m: int) -> str:
    return common_pb2.Metric.Name(m).lower()
