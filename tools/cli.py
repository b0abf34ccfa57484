"""`lookalike`: the command line for people. The only module (with the Ray actors) that configures logging and
reads flags and the environment.

Errors: a mistake in what was given (a flag, a file, a value), or a server that refuses or cannot be reached, is
one line on stderr and a non-zero exit status (2: a mistake on the command line or in a file; 130: Ctrl-C; 1:
anything else). An exception nobody expected (a bug) is one line too, naming it, and ``LOOKALIKE_DEBUG=1`` shows its
traceback instead (main(), the last resort).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import pickle
import re
import signal
import socket
import ssl
import sys
import tomllib
from importlib import metadata

import numpy as np

log = logging.getLogger("lookalike")

DEFAULT_TARGET = "localhost:50051"
# The connection flags of client commands (dest: default), accepted before the subcommand too.
_CONNECTION_DEFAULTS = {"target": DEFAULT_TARGET, "tls_cert": "", "tls_key": "", "tls_ca": "", "tls_server_name": "",
                        "token_file": None}


class UserError(Exception):
    """What the user gave cannot work (a flag, a file, a value): ``str(err)`` is the one sentence to print.

    Args:
        status: the exit status (2: the command line or a file; 1: the cluster's state).
    """

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def _tls(args, server: bool = False):
    """The TLS files of the flags, else of LOOKALIKE_TLS_* (lookalike.security.TLSConfig); None: plaintext."""
    from lookalike.security import TLSConfig

    env = TLSConfig.from_env() or TLSConfig()
    cert, key, ca = args.tls_cert or env.cert, args.tls_key or env.key, args.tls_ca or env.ca
    if not (cert or key or ca):
        return None
    client_auth = server and (args.tls_client_auth or env.client_auth)
    return TLSConfig(cert, key, ca, client_auth, args.tls_server_name or env.server_name)


def _conn(args) -> dict:
    """Client keyword arguments of the connection flags: tls and the bearer token (a file or the environment)."""
    from lookalike.errors import InvalidArgument
    from lookalike.security import read_token

    try:
        return {"tls": _tls(args), "token": read_token(args.token_file)}
    except InvalidArgument as err:
        raise UserError(str(err)) from None


def _client(args, conn: dict | None = None):
    from lookalike.errors import InvalidArgument
    from lookalike.client import Client

    try:  # the channel reads the TLS files, and refuses a token in plaintext beyond loopback
        return Client(args.target, **(conn if conn is not None else _conn(args)))
    except (InvalidArgument, ValueError) as err:
        raise UserError(str(err)) from None


# --- errors -----------------------------------------------------------------------------------------------------
# How gRPC's client describes a connection it could not make (the call never reached a server), as opposed to an
# UNAVAILABLE a server answered with a sentence of its own.
_TRANSPORT_FAILURES = ("failed to connect to all addresses", "DNS resolution failed", "Socket closed",
                       "Connection reset", "Connection refused", "Tls handshake failed", "Ssl handshake failed")


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _rpc_error_line(err, args) -> str:
    """The one line that says what a failed call means: the server's status and sentence, or, when the call never
    reached a server, why not (with a TLS hint only where TLS is what differs)."""
    import grpc

    code, details = err.code(), _one_line(err.details() or "")
    if code == grpc.StatusCode.UNAVAILABLE and details.startswith(_TRANSPORT_FAILURES):
        return _unreachable(getattr(args, "target", DEFAULT_TARGET), details, _tls(args) is not None)
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


def _os_error(err: OSError, what: str = "") -> str:
    """``--ids x.txt: no such file`` from an OSError (``what``: the flag or argument that named the file)."""
    reason = {FileNotFoundError: "no such file", IsADirectoryError: "a folder, not a file",
              NotADirectoryError: "a path through something that is not a folder",
              PermissionError: "permission denied"}.get(type(err)) or (err.strerror or str(err)).lower()
    named = " ".join(str(x) for x in (what, err.filename) if x not in (None, ""))
    return f"{named}: {reason}" if named else reason


def _load_npy(path: str, what: str, mmap: bool = False) -> np.ndarray:
    """A .npy file as an array, or a UserError naming ``what`` (the flag or argument) and the file."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except OSError as err:
        raise UserError(_os_error(err, what)) from None
    except (ValueError, EOFError, pickle.UnpicklingError) as err:
        raise UserError(f"{what} {path}: not a .npy array of numbers ({_one_line(err)}); write it with "
                        "numpy.save") from None


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        raise UserError(_os_error(err, what)) from None
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path}: not UTF-8 text (byte {err.start})") from None


def _read_lines(path: str, what: str) -> list[str]:
    """The non-empty lines of a text file (ids), or a UserError naming ``what`` and the file."""
    return [line.rstrip("\r") for line in _read_text(path, what).split("\n") if line.strip()]


def _read_payloads(path: str, what: str = "--payload") -> list[dict]:
    """One JSON object per non-empty line; a UserError names the file and the line that is not one."""
    out = []
    for number, line in enumerate(_read_text(path, what).split("\n"), 1):
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


# --- serve ------------------------------------------------------------------------------------------------------
def _serve_security(args):
    """(tls, auth interceptor or None, host to bind) of serve's flags and environment.

    Plaintext only when asked for: without TLS files the router binds loopback (the embedded default on a
    laptop); beyond loopback, or in a Ray cluster, it takes --insecure.

    Raises:
        ValueError: flags that do not fit together, unreadable files (the message says which).
    """
    from lookalike.security import AuthInterceptor, TokenTable, is_loopback

    tls = _tls(args, server=True)
    if tls is not None:
        tls.server_credentials()  # readable, and a key with the certificate
        _check_key_pair(tls.cert, tls.key)
        tls.internal()            # the shards' mutual TLS needs the CA too
    elif args.tls_client_auth:
        raise ValueError("--tls-client-auth needs TLS: give --tls-cert, --tls-key and --tls-ca")
    host = args.host or ("[::]" if tls or args.insecure else "127.0.0.1")
    if tls is None and not args.insecure:
        if args.address is not None:
            raise ValueError("in a Ray cluster the router and shards talk across the network: give --tls-cert, "
                             "--tls-key and --tls-ca (or LOOKALIKE_TLS_*), or --insecure to run them in plaintext")
        if not is_loopback(host):
            raise ValueError(f"refusing to serve plaintext on {host}: give --tls-cert and --tls-key (or "
                             "LOOKALIKE_TLS_*), or --insecure")
    if args.address is not None and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        # The embedded cluster turns it on itself; a cluster started apart must have it, and this router its token.
        if not args.insecure:
            raise ValueError("in a Ray cluster, Ray's token authentication must be on: set RAY_AUTH_MODE=token and "
                             "the cluster's token (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH), as on every Ray node, or "
                             "--insecure to join a cluster without it")
        log.warning("joining a Ray cluster without Ray's token authentication (RAY_AUTH_MODE=%s): anyone who "
                    "reaches its ports can run code in it", os.environ.get("RAY_AUTH_MODE", "unset"))
    tokens_file = args.tokens or os.environ.get("LOOKALIKE_TOKENS_FILE")
    tokens = TokenTable(tokens_file) if tokens_file else None
    if tokens is not None and tls is None and not is_loopback(host):
        log.warning("bearer tokens over plaintext: anyone on the network can read them; use TLS")
    if args.rate_limit < 0 or args.rate_burst < 0:
        raise ValueError("--rate-limit and --rate-burst must be >= 0")
    auth = AuthInterceptor(tokens, args.rate_limit, args.rate_burst) if tokens or args.rate_limit else None
    return tls, auth, host


def _embedded_num_cpus(args, data_dir) -> int:
    """CPUs the embedded Ray offers: room for every shard the cluster may run (those in storage, --shards, and
    growth up to --max-shards) and the encoders, else a shard added later is never placed and the moves onto it
    wait forever.

    Ray's CPUs are a scheduling count, not threads (a shard runs ``int(--shard-cpus)`` FAISS threads whatever
    Ray offers), and an idle logical CPU costs nothing: Ray starts no worker per CPU (measured: the same processes
    and RSS with 3 and 65 CPUs). So shards keep whole CPUs, which Ray's placement on a real cluster needs, rather
    than fractions of the machine's count.
    """
    from control.state import stored_shards

    shards = max(args.shards, args.max_shards, stored_shards(data_dir))
    return max(os.cpu_count() or 1, int(np.ceil(shards * args.shard_cpus)) + max(1, args.encoders))


def _check_key_pair(cert: str, key: str) -> None:
    """The key file holds the private key of the certificate (gRPC itself only finds out when a server binds: the
    shards would crash-loop on "Failed to bind").

    Raises:
        ValueError: naming the file at fault.
    """
    import ssl

    def no_password():
        raise ValueError(f"the TLS key {key!r} is encrypted: give it unencrypted (mode 600)")

    key_pem = pathlib.Path(key).read_bytes()
    if b"PRIVATE KEY-----" not in key_pem:
        holds = " (it holds a certificate: give the key file)" if b"BEGIN CERTIFICATE" in key_pem else ""
        raise ValueError(f"the TLS key {key!r} holds no PEM private key{holds}")
    if b"BEGIN CERTIFICATE" not in pathlib.Path(cert).read_bytes():
        raise ValueError(f"the TLS certificate {cert!r} holds no PEM certificate")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"the TLS key {key!r} is not the key of the certificate {cert!r}") from None
        raise ValueError(f"the TLS certificate {cert!r} and key {key!r} do not load: {err}") from None


def cmd_serve(args) -> int:
    import functools

    from lookalike.config import ClusterConfig, MovePolicy, storage_path
    from lookalike.datadir import DataDirInUse, DataDirLock, embedded_ray_env

    embedded = args.address is None
    args.port = serve_port(args, os.environ)
    try:
        data_dir = storage_path(args.data)
        tls, auth, host = _serve_security(args)
        # One storage, one server: the embedded cluster's shards write this directory. (Routers joining a Ray
        # cluster share its storage with the cluster's other routers: the cluster's controller owns it there.)
        lock = DataDirLock(data_dir).acquire() if embedded else None
        ray_env = embedded_ray_env(data_dir) if embedded else {}
    except (ValueError, DataDirInUse) as err:  # lookalike.errors.InvalidArgument is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Before Ray is imported: Ray reads RAY_AUTH_MODE once, and every process it starts inherits this environment.
    _set_environ(ray_env)

    import ray

    from lookalike.net import create_health_server, set_serving
    from control.ray_cluster import join_ray, shards_phrase, start_cluster, start_jobs
    from control.ray_encoders import RayEncoderPool
    from router.core import Router
    from router.server import SERVICE_NAME, create_router_server
    from router.shard_client import GrpcShardClient

    shard_memory = parse_bytes(args.shard_memory)
    cfg = ClusterConfig(data_dir=data_dir, shards=args.shards, cluster_name=args.cluster,
                        shard_num_cpus=args.shard_cpus, shard_memory=shard_memory,
                        # in a Ray cluster the router may run on another node: shards listen on their node's address
                        shard_host="127.0.0.1" if args.address is None else "auto",
                        shard_gpus=args.shard_gpus if args.shard_gpus == "auto" else float(args.shard_gpus),
                        policy=MovePolicy(max_shards=args.max_shards, copy_mb_s=args.copy_mb_s,
                                          autoscale_s=args.autoscale if shard_memory else 0.0),
                        tls=tls.internal() if tls else None)
    if embedded:
        # Ray's token authentication on, whatever the environment said: the GCS, the raylet and every worker listen
        # on all interfaces (docs/SECURITY.md, "What listens where"), and the token is what keeps others out.
        _refresh_ray_auth_mode()
        ray.init(address="local", namespace=cfg.namespace, include_dashboard=False, log_to_driver=args.verbose,
                 num_cpus=_embedded_num_cpus(args, data_dir))
    else:
        try:
            join_ray(args.address, cfg.namespace, log_to_driver=args.verbose)
        except (ConnectionError, RuntimeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    embedded_ray = _EmbeddedRay(ray.get_runtime_context().gcs_address) if embedded else None
    try:  # start_cluster logs how many shards start (on a restart: those the storage holds, whatever --shards says)
        handle, control = start_cluster(cfg)
    except TimeoutError as err:  # its message names the shards that cannot be placed, and why
        print(f"error: {err}", file=sys.stderr)
        if embedded:
            _within(ray.shutdown, 15.0)
        return 1
    jobs = start_jobs(cfg)
    router = Router(control, encoders=RayEncoderPool(args.encoders) if args.encoders else None,
                    connect=functools.partial(GrpcShardClient, tls=cfg.tls))
    server, port, health = create_router_server(router, f"{host}:{args.port}", args.router_threads,
                                                batch_wait_s=args.batch_wait_us * 1e-6,
                                                batch_inflight=args.batch_inflight, jobs=jobs, tls=tls, auth=auth)
    healths = [health]
    if args.health_port:  # plaintext health alone, for probes that cannot speak TLS
        probe_server, probe_port, probe_health = create_health_server(f"{host}:{args.health_port}")
        set_serving(probe_health, [SERVICE_NAME])
        healths.append(probe_health)
        log.info("plaintext health (grpc.health.v1 only) on %s:%d", host, probe_port)
    how = ("mutual TLS" if tls.client_auth else "TLS") if tls else "plaintext"
    print(f"lookalike serving on {host}:{port} ({how}{', bearer tokens' if auth and auth.tokens else ''}; "
          f"{shards_phrase(control.shards())}, storage {os.path.abspath(data_dir)}); Ctrl-C stops", flush=True)
    # Wait for SIGINT/SIGTERM on a pipe that the interpreter's C-level handler writes to (set_wakeup_fd): that
    # works whichever thread the signal lands on (Ray and gRPC threads included) and takes no lock, so a second
    # signal during shutdown cannot deadlock it (Event.set in a handler did).
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    os.read(wake_r, 1)
    log.info("stopping: draining calls in flight")
    for h in healths:
        set_serving(h, [SERVICE_NAME], False)
    server.stop(grace=args.grace).wait()
    if args.health_port:
        probe_server.stop(None)
    router.close()
    if embedded:
        from control.ray_cluster import stop_cluster, stop_jobs

        # Bounded, and abandoned as soon as Ray's GCS or raylet is gone: a stop signal to the whole process group
        # (a terminal's job control) or cgroup (systemd) stops them too, and then every Ray call, ray.shutdown()
        # and Ray's exit handler included, waits a minute for a GCS that will not come back.
        if not (_within(lambda: (stop_jobs(jobs), stop_cluster(handle)), 30.0, alive=embedded_ray.alive)
                and _within(ray.shutdown, 15.0)):
            log.info("Ray's GCS is gone (or Ray did not stop in time): exiting without Ray's shutdown; what is "
                     "left of the embedded Ray ends with this process (Ray ties its processes to it)")
            print("lookalike stopped", flush=True)
            sys.stderr.flush()
            os._exit(0)
        lock.release()
    print("lookalike stopped", flush=True)
    _exit_soon(0)
    return 0


def serve_port(args, environ) -> int:
    """The port serve's router listens on: --port, else LOOKALIKE_PORT in ``environ``, else 50051."""
    if args.port is not None:
        return args.port
    try:
        return _port(environ.get("LOOKALIKE_PORT") or "50051")
    except argparse.ArgumentTypeError as err:
        raise UserError(f"LOOKALIKE_PORT {err}") from None


def _exit_soon(status: int, after_s: float = 5.0) -> None:
    """Ends this process ``after_s`` seconds from now unless it ends by itself first. Everything is stopped by then,
    but a gRPC handler thread caught by the stop can stay blocked (an abort on a stopped server waits forever), and
    Python's exit waits for every such thread: serve stopped but never exited."""
    import threading
    import time

    def end():
        time.sleep(after_s)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    threading.Thread(target=end, daemon=True, name="serve-exit").start()


def _set_environ(env: dict[str, str | None]) -> None:
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _refresh_ray_auth_mode() -> None:
    """Makes Ray read RAY_AUTH_MODE again if it was imported before it was set (a caller that imported Ray first):
    Ray caches its config when imported, and refreshes it this way itself when ray.init turns token auth on."""
    try:
        from ray._raylet import AuthenticationMode, Config, get_authentication_mode
    except ImportError:  # a Ray without token auth (before 2.52): nothing to refresh
        return
    if os.environ.get("RAY_AUTH_MODE") == "token" and get_authentication_mode() != AuthenticationMode.TOKEN:
        Config.initialize("")


class _EmbeddedRay:
    """Whether the embedded Ray still lives: its GCS and raylet processes (children of this process) run and the GCS
    takes connections. On SIGTERM the GCS closes its port at once but its process lingers for seconds."""

    def __init__(self, gcs_address: str):
        import psutil

        self.gcs_address = gcs_address
        self.daemons = [p for p in psutil.Process().children() if p.name() in ("gcs_server", "raylet")]

    def alive(self) -> bool:
        import socket

        import psutil

        try:
            if not all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in self.daemons):
                return False
        except psutil.Error:
            return False
        host, _, port = self.gcs_address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
        except OSError:
            return False
        return True


def _within(func, timeout: float, alive=lambda: True) -> bool:
    """Runs ``func`` in a thread and waits for it at most ``timeout`` seconds, and only while ``alive()``.
    True: it returned (an exception is logged) and ``alive()`` still holds."""
    import threading
    import time

    done = threading.Event()

    def run():
        try:
            func()
        except Exception as err:  # logged: serve stops anyway
            log.warning("stopping: %s", err)
        finally:
            done.set()

    if not alive():
        return False
    threading.Thread(target=run, daemon=True, name="serve-stop").start()
    deadline = time.monotonic() + timeout
    while not done.wait(0.1):
        if not alive():
            return False
        if time.monotonic() > deadline:
            log.warning("stopping: %s did not return within %.0f s", getattr(func, "__name__", func), timeout)
            return False
    return alive()


# --- tokens -----------------------------------------------------------------------------------------------------
def _write_private(path: pathlib.Path, text: str) -> None:
    """Writes a file only its owner can read, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as err:
        err.filename = str(path)  # not the temporary file's name
        raise UserError(f"cannot write {_os_error(err)}") from None


_TOKEN_EXAMPLE = "lookalike token create ci --scopes read,write --tokens tokens.json --out ci.token"


def cmd_token(args) -> int:
    from lookalike.errors import InvalidArgument
    from lookalike.security import SCOPES, new_token, parse_tokens, token_hash

    path = pathlib.Path(args.tokens)
    if args.action == "create" and (not args.name or args.scopes is None):
        missing = " and ".join(w for w, gone in (("a NAME (who holds it)", not args.name),
                                                 ("--scopes", args.scopes is None)) if gone)
        raise UserError(f"token create needs {missing}, e.g. `{_TOKEN_EXAMPLE}` (scopes: {', '.join(SCOPES)}; "
                        f"--tokens: the tokens file `lookalike serve --tokens` reads; --out: where the token goes)")
    if args.action != "create" and not path.exists():
        raise UserError(f"no tokens file {str(path)!r} (--tokens FILE names it; `{_TOKEN_EXAMPLE}` makes one)", 1)
    try:
        text = path.read_text() if path.exists() else '{"tokens": []}'
        parse_tokens(text, f"tokens file {str(path)!r}")  # checks every entry
    except (OSError, InvalidArgument) as err:
        raise UserError(_os_error(err, "--tokens") if isinstance(err, OSError) else str(err)) from None
    entries = json.loads(text)["tokens"]
    if args.action == "list":
        for e in entries:
            extra = f"\trate={e['rate']}/s" if e.get("rate") else ""
            print(f"{e['name']}\t{','.join(e['scopes'])}{extra}")
        return 0
    if args.action == "revoke":
        kept = [e for e in entries if e["name"] != args.name]
        if len(kept) == len(entries):
            names = ", ".join(e["name"] for e in entries) or "none"
            raise UserError(f"no token named {args.name!r} in {path} (its tokens: {names})", 1)
        _write_private(path, json.dumps({"tokens": kept}, indent=1) + "\n")
        print(f"revoked {args.name} (a router re-reads {path} within seconds)")
        return 0
    scopes = sorted({s.strip() for s in args.scopes.split(",") if s.strip()})
    if not scopes or any(s not in SCOPES for s in scopes):
        raise UserError(f"--scopes takes a comma-separated list of {', '.join(SCOPES)} (e.g. --scopes read,write), "
                        f"got {args.scopes!r}")
    if any(e["name"] == args.name for e in entries):
        raise UserError(f"a token named {args.name!r} exists in {path}; revoke it first (`lookalike token revoke "
                        f"{args.name} --tokens {path}`) or pick another name", 1)
    token = new_token()
    entry = {"name": args.name, "scopes": scopes, "sha256": token_hash(token).removeprefix("sha256:")}
    if args.rate:
        entry["rate"] = args.rate
    if args.burst:
        entry["burst"] = args.burst
    # the token first: a hash in the tokens file whose token could not be written would be of no use
    if args.out:
        _write_private(pathlib.Path(args.out), token + "\n")
    _write_private(path, json.dumps({"tokens": [*entries, entry]}, indent=1) + "\n")
    if args.out:
        print(f"token {args.name} ({','.join(scopes)}) written to {args.out}; its hash added to {path}")
    else:
        print(token)
    return 0


# --- collections ------------------------------------------------------------------------------------------------
def cmd_collection(args) -> int:
    from google.protobuf.json_format import MessageToDict

    if args.action == "create" and not args.dim and not args.encoder:
        raise UserError(f"--dim is required for a collection without --encoder: the components of each vector (bits "
                        f"for --metric hamming), e.g. `lookalike collection create {args.name} --dim 128`; or give "
                        "--encoder (its dimension is the encoder's)")
    with _client(args) as c:
        if args.action == "create":
            info = c.create_collection(args.name, args.dim, args.metric, args.index, args.buckets, args.replication,
                                       nprobe=args.nprobe, ef_search=args.ef_search, encoder=args.encoder,
                                       gpu_float16=args.gpu_float16)
            print(json.dumps(MessageToDict(info.spec)))
        elif args.action == "list":
            for info in c.list_collections():
                s = info.spec
                print(f"{s.name}\titems={info.count}\tdim={s.dim}\tmetric={_metric_name(s.metric)}\tindex={s.index}\t"
                      f"buckets={s.buckets}")
        elif args.action == "describe":
            info = c.describe_collection(args.name)
            print(json.dumps({**MessageToDict(info.spec), "count": info.count, "epoch": info.epoch,
                              "training": MessageToDict(info.training)}))
        elif args.action == "drop":
            c.drop_collection(args.name)
            print(f"dropped {args.name}")
    return 0


def _metric_name(m: int) -> str:
    from protos import common_pb2

    return common_pb2.Metric.Name(m).lower()


# --- items ------------------------------------------------------------------------------------------------------
def cmd_upsert(args) -> int:
    from tqdm import tqdm

    xb = _load_npy(args.vectors, "vectors file", mmap=True)
    if xb.ndim != 2:
        raise UserError(f"{args.vectors} holds an array of shape {xb.shape}; expected (n, d): one vector a row")
    n = len(xb)
    ids = _read_lines(args.ids, "--ids") if args.ids else [str(i) for i in range(n)]
    if len(ids) != n:
        raise UserError(f"--ids {args.ids}: {len(ids)} ids for the {n} vectors of {args.vectors}; give one id a line")
    payloads = _read_payloads(args.payload) if args.payload else None
    if payloads is not None and len(payloads) != n:
        raise UserError(f"--payload {args.payload}: {len(payloads)} payload lines for the {n} vectors of "
                        f"{args.vectors}; give one JSON object a line")
    # no bar where stderr is not a terminal (a log, a pipe): it would be a line per update among the errors
    bar = tqdm(total=n, unit="vec", desc=f"upsert {args.name}", disable=True if args.quiet else None)

    def batches():
        for i in range(0, n, args.batch):
            j = min(n, i + args.batch)
            x = np.ascontiguousarray(xb[i:j])
            x = x if x.dtype == np.uint8 else x.astype(np.float32)
            yield ids[i:j], x, (payloads[i:j] if payloads else None)
            bar.update(j - i)

    try:
        with _client(args) as c:
            count = c.upsert_stream(args.name, batches())
    except KeyboardInterrupt:
        bar.close()  # before the sentence
        print(f"\nstopped: up to {bar.n} of {n} vectors were sent; run the same command again to load them all "
              "(an upsert replaces the item of the same id)", file=sys.stderr)
        return 130
    finally:
        bar.close()  # before any error is printed
    print(f"upserted {count} vectors into {args.name}")
    return 0


def cmd_delete(args) -> int:
    ids = list(args.ids or [])
    if args.ids_file:
        ids += _read_lines(args.ids_file, "--ids-file")
    if not ids:
        raise UserError(f"give the ids to delete: `lookalike delete {args.name} ID [ID ...]` or --ids-file FILE "
                        "(one id a line)")
    with _client(args) as c:
        removed, missing = c.delete(args.name, ids)
    print(f"deleted {removed}, {missing} not found")
    return 0


def _read_images(paths: list[str]) -> list[bytes]:
    out = []
    for path in paths:
        try:
            out.append(pathlib.Path(path).read_bytes())
        except OSError as err:
            raise UserError(_os_error(err, "--image")) from None
    return out


def _search_images(c, args, images: list[bytes], include_payloads: bool):
    """search_by_image; the server's "query image N: ..." becomes "--image FILE: ..." (the file the user named)."""
    import grpc  # here, as everywhere in this module: gRPC loads only for the commands that talk to a router

    try:
        return c.search_by_image(args.name, images, k=args.k, nprobe=args.nprobe, ef_search=args.ef_search,
                                 include_payloads=include_payloads, min_coverage=args.min_coverage)
    except grpc.RpcError as err:
        m = re.match(r"query image (\d+): (.*)", err.details() or "", re.S)
        if err.code() == grpc.StatusCode.INVALID_ARGUMENT and m and int(m[1]) < len(args.image):
            raise UserError(f"--image {args.image[int(m[1])]}: {_one_line(m[2])}") from None
        raise


def cmd_search(args) -> int:
    if (args.queries is None) == (not args.image):
        raise UserError("give either QUERIES.npy (one query vector a row) or --image FILE (repeatable), not "
                        f"{'both' if args.image else 'neither'}")
    include_payloads = args.payloads or bool(args.sheet)  # the sheet finds neighbour images by payload uri
    images = _read_images(args.image) if args.image else None
    xq = None
    if images is None:
        xq = _load_npy(args.queries, "queries file")
        if xq.ndim not in (1, 2):
            raise UserError(f"{args.queries} holds an array of shape {xq.shape}; expected (nq, d) or (d,)")
        xq = xq[None, :] if xq.ndim == 1 else xq
        xq = xq if xq.dtype == np.uint8 else xq.astype(np.float32)
    encoder_spec = ""  # the collection's encoder: its rule of what counts as a match, drawn on the sheet
    with _client(args) as c:
        if images is not None:
            res = _search_images(c, args, images, include_payloads)
            if args.sheet:
                encoder_spec = c.describe_collection(args.name).spec.encoder
        else:
            res = c.search(args.name, xq, k=args.k, nprobe=args.nprobe, ef_search=args.ef_search,
                           include_payloads=include_payloads, min_coverage=args.min_coverage)
    if args.sheet:
        from encoder.match import default_match
        from tools.sheet import contact_sheet, read_uri

        rows = [[(uid, float(res.D[q, j]), read_uri(res.payloads[q][j].get("uri"))) for j, uid in enumerate(ids)]
                for q, ids in enumerate(res.ids)]
        sheet = contact_sheet(images or [None] * len(rows), rows, labels=args.image or None,
                              match=default_match(encoder_spec))
        try:
            pathlib.Path(args.sheet).write_bytes(sheet)
        except OSError as err:
            raise UserError(_os_error(err, "--sheet")) from None
        print(f"contact sheet: {args.sheet}", file=sys.stderr)
    if args.json:
        out = [{"ids": ids, "distances": [float(d) for d in res.D[q, :len(ids)]],
                **({"payloads": res.payloads[q]} if args.payloads else {})} for q, ids in enumerate(res.ids)]
        print(json.dumps({"coverage": res.coverage, "results": out}))
        return 0
    for q, ids in enumerate(res.ids):
        print(f"query {q}" + (f": {args.image[q]}" if args.image else ""))
        for rank, uid in enumerate(ids):
            extra = f"\t{json.dumps(res.payloads[q][rank])}" if args.payloads else ""
            print(f"  {rank + 1:>3}  {uid:<24} {res.D[q, rank]:.6g}{extra}")
    if res.coverage < 1:
        print(f"coverage {res.coverage:.3f}: some shards did not answer", file=sys.stderr)
    return 0


def cmd_get(args) -> int:
    with _client(args) as c:
        ids, vectors, payloads = c.get(args.name, args.ids, include_vectors=args.vectors)
    for i, uid in enumerate(ids):
        row = {"id": uid, "payload": payloads[i]}
        if vectors is not None:
            row["vector"] = vectors[i].tolist()
        print(json.dumps(row))
    return 0


def cmd_ingest(args) -> int:
    """Exits 1 when any image was not stored (the last line says how many), 0 when all were."""
    from tools.ingest import ingest

    if not os.path.isdir(args.dir):
        raise UserError(f"folder {args.dir}: {'not a folder' if os.path.exists(args.dir) else 'no such folder'}")
    with _client(args) as c:
        report = ingest(c, args.name, args.dir, batch=args.batch, uri_prefix=args.uri_prefix,
                        progress=not args.quiet)
    print(report.summary())
    if args.report:
        import dataclasses

        try:
            pathlib.Path(args.report).write_text(json.dumps(dataclasses.asdict(report), indent=1))
        except OSError as err:
            raise UserError(_os_error(err, "--report")) from None
    if report.failed:
        where = f"; {args.report} lists them all" if args.report else " (--report FILE.json lists them all)"
        print(f"error: {len(report.failed)} of {report.files - report.not_images} image file(s) failed{where}",
              file=sys.stderr)
        return 1
    return 0


def cmd_train_encoder(args) -> int:
    from encoder.train import load_folder, train_encoder

    if not os.path.isdir(args.dir):
        raise UserError(f"folder {args.dir}: {'not a folder' if os.path.exists(args.dir) else 'no such folder'}")
    images = load_folder(args.dir)
    print(f"training a {args.method} encoder on {len(images)} images from {args.dir}", file=sys.stderr)
    try:
        losses = train_encoder(images, args.out, method=args.method, epochs=args.epochs, batch_size=args.batch,
                               dim=args.dim, seed=args.seed, progress=not args.quiet)
    except ModuleNotFoundError as err:
        raise UserError(f"train-encoder needs PyTorch ({err.name} is not installed): pip install torch (the CPU "
                        "build: see the README), or pip install -e '.[torch]'") from None
    except ValueError as err:
        raise UserError(_one_line(err)) from None
    print(f"saved {args.out} (loss {losses[0]:.4f} -> {losses[-1]:.4f}); use it with "
          f"`lookalike collection create NAME --encoder torchscript:{os.path.abspath(args.out)}`")
    return 0


def cmd_status(args) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as c:
        st = c.status()
    if args.json:
        print(json.dumps(MessageToDict(st, always_print_fields_with_no_presence=True)))
        return 0
    print(f"epoch {st.epoch}, {len(st.shards)} shard(s), {len(st.collections)} collection(s)")
    print(f"{'shard':<10} {'serving':<8} {'address':<22} {'vectors':>10} {'index MiB':>10} {'RSS MiB':>8} "
          f"{'cap MiB':>8}")
    for s in st.shards:
        cap = f"{s.capacity_bytes / 2**20:.0f}" if s.capacity_bytes else "-"
        print(f"{s.shard_id:<10} {str(s.serving):<8} {s.address:<22} {s.vectors:>10} "
              f"{s.index_bytes / 2**20:>10.1f} {s.memory_bytes / 2**20:>8.1f} {cap:>8}")
        for c in s.collections:  # bucket counts are per collection: each collection has buckets of its own
            joining = f", {c.joining} joining" if c.joining else ""
            print(f"  {c.collection}: {c.buckets} bucket(s){joining}, {c.vectors} vectors")
        for d in s.damaged:  # storage files kept aside (docs/ARCHITECTURE.md, Storage)
            print(f"  DAMAGED {d}")
        if s.problem:  # e.g. Ray cannot place it: the moves onto it wait
            print(f"  {s.shard_id} {s.problem}")
    for info in st.collections:
        print(f"collection {info.spec.name}: {info.count} items, dim {info.spec.dim}, "
              f"{_metric_name(info.spec.metric)}, {info.spec.index}, {info.spec.buckets} buckets, "
              f"replication {info.spec.replication or 1}")
        if info.training.state not in (0, info.training.NOT_NEEDED):  # IVF/PQ/SQ: where its training stands
            print(f"  index: {info.training.message}")
    if st.moves or st.moves_done or st.moves_failed:
        print(_move_summary(st))
        groups: dict[tuple, list[int]] = {}
        for m in st.moves:
            groups.setdefault((m.collection, m.source, m.target, m.phase), []).append(m.bucket)
        for (coll, src, dst, phase), buckets in groups.items():
            print(f"  {coll}: {len(buckets)} bucket(s) {src} -> {dst} [{phase}]")
    return 0


def _move_summary(st) -> str:
    """ClusterStatus's move counts, labelled as what they are: moves_done and moves_failed count moves (each of one
    or more buckets) since the controller started, not since this rebalance; st.moves lists buckets."""
    return (f"bucket moves: {len(st.moves)} bucket(s) still to move; since the controller started, "
            f"{st.moves_done} move(s) done and {st.moves_failed} failed and retried (a move carries one or more "
            "buckets)")


def cmd_train(args) -> int:
    """Asks for a new trained version of the collection's index, then (unless --no-wait) follows it until every
    shard uses it. Exits 1 after --timeout; Ctrl-C stops following (the training goes on in the cluster)."""
    import time

    with _client(args) as c:
        info = c.train(args.name)
        version = info.training.next_version
        print(f"training {args.name} ({info.spec.index}) as version {version}: {info.training.message}")
        if args.no_wait:
            return 0
        deadline = time.monotonic() + args.timeout
        last = ""
        try:
            while time.monotonic() < deadline:
                t = c.describe_collection(args.name).training
                if t.message != last:
                    print(f"  {t.message}")
                    last = t.message
                if t.version >= version and t.shards_ready == t.shards:
                    return 0
                time.sleep(0.5)
        except KeyboardInterrupt:
            print(f"\nstopped following: the training of {args.name} goes on in the cluster (`lookalike collection "
                  f"describe {args.name}` shows it)", file=sys.stderr)
            return 130
    print(f"error: version {version} of {args.name} not in use on every shard after {args.timeout:g}s: {last}",
          file=sys.stderr)
    return 1


def cmd_rebalance(args) -> int:
    """Queues the moves (after starting --add-shards shards), then follows them (unless --no-wait) until none is
    left and the shards serve. Exits 1 instead when a shard cannot start (Ray cannot place it: the moves onto it
    would wait for it) or after --timeout; Ctrl-C stops following. The moves go on in the cluster either way."""
    st = None
    try:
        with _client(args) as c:
            resp = c.rebalance(args.name or "", args.add_shards)
            print(f"{resp.moves} move(s) queued over {resp.shards} shard(s) (epoch {resp.epoch})")
            if args.no_wait:
                return 0
            for st in _follow_moves(c, args.timeout, args.add_shards > 0, args.quiet):
                pass
    except KeyboardInterrupt:
        left = f"{len(st.moves)} bucket(s) still to move; " if st is not None else ""
        print(f"\nstopped following the rebalance: {left}the moves go on in the cluster (`lookalike status` shows "
              "them)", file=sys.stderr)
        return 130
    stuck = [s for s in st.shards if s.problem]
    starting = ", ".join(s.shard_id for s in st.shards if not s.serving)
    if not st.moves and not stuck and not (args.add_shards and starting):
        print(_move_summary(st))
        return 0
    for s in stuck:
        waiting = sum(m.target == s.shard_id or m.source == s.shard_id for m in st.moves)
        print(f"error: shard {s.shard_id} {s.problem}; {waiting} bucket(s) wait for it and move once it starts "
              "(free or add Ray resources: a restart of `lookalike serve` sizes its embedded Ray for the shards in "
              "storage)", file=sys.stderr)
    if not stuck:
        print(f"error: stopped waiting after {args.timeout:g}s: {len(st.moves)} bucket(s) still to move"
              f"{f' and shard(s) {starting} not serving yet' if starting else ''}; the moves go on in the cluster "
              "(`lookalike status` shows them)", file=sys.stderr)
    print(_move_summary(st), file=sys.stderr)
    return 1


def _follow_moves(c, timeout: float, shards_added: bool, quiet: bool = False):
    """Yields the cluster status about twice a second, with a progress bar, until no bucket is left to move (and,
    with ``shards_added``, every shard serves), a shard cannot start, or ``timeout`` seconds have passed."""
    import time

    from tqdm import tqdm

    deadline = time.monotonic() + timeout
    st = c.status()
    total = len(st.moves)
    with tqdm(total=total, unit="bucket", desc="moving buckets", disable=True if quiet else None) as bar:
        while True:
            yield st
            starting = [s.shard_id for s in st.shards if not s.serving]
            bar.n = max(0, total - len(st.moves))
            bar.set_postfix_str(f"{', '.join(starting)} starting" if starting else "", refresh=False)
            bar.refresh()
            if (not st.moves and not (shards_added and starting) or any(s.problem for s in st.shards)
                    or time.monotonic() >= deadline):
                return
            time.sleep(0.5)
            st = c.status()


# --- catalog jobs -----------------------------------------------------------------------------------------------
def _follow_job(c, job, quiet: bool = False):
    """A progress bar over a job until it ends. Ctrl-C leaves the job running in the cluster."""
    from tqdm import tqdm

    from protos import lookalike_pb2

    desc = f"{job.kind} {job.collection}"
    with tqdm(total=job.total or None, unit="item", desc=desc, disable=True if quiet else None) as bar:
        def show(j):
            bar.total = j.total or bar.total
            bar.n = j.done
            note = json.loads(j.summary_json or "{}")
            bar.set_postfix_str(j.message or ", ".join(f"{k} {v}" for k, v in note.items() if k != "sizes"),
                                refresh=False)
            bar.refresh()

        try:
            job = c.wait_job(job.id, on_progress=show)
        except KeyboardInterrupt:
            bar.close()
            print(f"\nleft job {job.id} running in the cluster: run the same command again to follow it, "
                  f"`lookalike job cancel {job.id}` to stop it", file=sys.stderr)
            raise SystemExit(130) from None
    if job.state != lookalike_pb2.Job.SUCCEEDED:
        state = lookalike_pb2.Job.State.Name(job.state)
        print(f"error: job {job.id} {state.lower()}: {job.message}", file=sys.stderr)
    return job


def cmd_dedup(args) -> int:
    from tools.catalog_report import groups_sheet, write_groups
    from protos import lookalike_pb2

    with _client(args) as c:
        job = c.start_dedup(args.name, args.threshold, k=args.k, nprobe=args.nprobe, ef_search=args.ef_search,
                            batch=args.batch, job_id=args.job or "")
        print(f"job {job.id}", file=sys.stderr)
        if args.no_wait:
            return 0
        job = _follow_job(c, job, args.quiet)
        if job.state != lookalike_pb2.Job.SUCCEEDED:
            return 1
        groups = list(c.dedup_groups(job.id))
        out = args.out or f"dedup-{args.name}"
        csv_path, jsonl_path = write_groups(groups, out)
        summary = json.loads(job.summary_json)
        print(f"{summary['groups']} group(s) of near-duplicates, {summary['grouped_items']} items, from "
              f"{summary['pairs']} pair(s) within {args.threshold:g}; {job.total} items in {job.elapsed_s:.1f}s "
              f"({job.total / max(job.elapsed_s, 1e-9):,.0f} items/s)")
        print(f"groups: {csv_path}, {jsonl_path}")
        if groups and args.sheet != "none":
            sheet = args.sheet or f"{out}.png"

            def payloads_of(ids):
                found, _, payloads = c.get(args.name, ids, include_vectors=False)
                by_id = dict(zip(found, payloads))
                return [by_id.get(i, {}) for i in ids]

            with open(sheet, "wb") as f:
                f.write(groups_sheet([(g.ids, g.distances) for g in groups], payloads_of, args.sheet_groups))
            print(f"contact sheet of the {min(len(groups), args.sheet_groups)} largest groups: {sheet}")
        for g in groups[:args.show]:
            print(f"  group {g.group} ({len(g.ids)}): {' '.join(g.ids[:10])}{' ...' if len(g.ids) > 10 else ''}")
    return 0


def cmd_cluster(args) -> int:
    from protos import lookalike_pb2

    with _client(args) as c:
        job = c.start_cluster(args.name, args.k, sample=args.sample, field=args.field, niter=args.niter,
                              seed=args.seed, job_id=args.job or "")
        print(f"job {job.id}", file=sys.stderr)
        if args.no_wait:
            return 0
        job = _follow_job(c, job, args.quiet)
        if job.state != lookalike_pb2.Job.SUCCEEDED:
            return 1
    summary = json.loads(job.summary_json)
    sizes = summary["sizes"]
    if args.json:
        print(json.dumps({"job": job.id, "field": summary["field"], "sizes": sizes}))
        return 0
    print(f"{len(sizes)} clusters of {sum(sizes)} items in payload field {summary['field']!r} ({job.elapsed_s:.1f}s)")
    print(f"{'cluster':>8} {'items':>10} {'share':>7}")
    for n, size in sorted(enumerate(sizes), key=lambda t: -t[1]):
        print(f"{n:>8} {size:>10} {size / max(sum(sizes), 1):>7.1%}")
    return 0


def cmd_job(args) -> int:
    from protos import lookalike_pb2

    if args.action != "list" and not args.id:
        raise UserError(f"job {args.action} needs the job's ID: `lookalike job {args.action} ID` (`lookalike job list` "
                        "shows them)")
    if args.action == "list" and args.id:
        raise UserError(f"job list takes no ID (`lookalike job status {args.id}` shows one job)")
    with _client(args) as c:
        if args.action == "list":
            jobs = c.list_jobs()
        elif args.action == "cancel":
            jobs = [c.cancel_job(args.id)]
        else:
            jobs = [c.get_job(args.id)]
    if args.action == "list" and not jobs:
        print("no jobs (`lookalike dedup` and `lookalike cluster` start them)")
        return 0
    print(f"{'job':<40} {'kind':<8} {'collection':<16} {'state':<10} {'done/total':>21} {'elapsed':>9} message")
    for j in jobs:
        print(f"{j.id:<40} {j.kind:<8} {j.collection:<16} {lookalike_pb2.Job.State.Name(j.state):<10} "
              f"{j.done:>10}/{j.total:<10} {j.elapsed_s:>8.1f}s {j.message or j.summary_json}")
    return 0


def cmd_map(args) -> int:
    from jobs import cluster_space
    from tools.catalog_report import draw_map, project
    from tools.sheet import read_uri

    _need_plot_extra("map")
    with _client(args) as c:
        coll = c.describe_collection(args.name).spec
        ids, x, payloads = c.sample(args.name, args.sample, seed=args.seed)
    if not ids:
        raise UserError(f"collection {args.name} is empty: nothing to map", 1)
    metric = _metric_name(coll.metric)
    coords, method = project(cluster_space(x, metric), args.method, seed=args.seed)
    labels = [p.get(args.field) for p in payloads]
    thumbs = [read_uri(p.get("uri")) for p in payloads] if args.thumbnails else None
    draw_map(coords, labels, args.out, args.width, args.height, thumbs=thumbs,
             title=f"{args.name}: {len(ids)} items, {method.upper()}"
                   + (f", coloured by {args.field}" if any(v is not None for v in labels) else ""))
    print(f"map of {len(ids)} items ({method}): {args.out}")
    return 0


def _need_plot_extra(command: str) -> None:
    """Checks, before any work, that the plot extra (matplotlib, scikit-learn) is installed."""
    for module in ("matplotlib", "sklearn"):
        try:
            __import__(module)  # here, not at the top: only the commands that draw need it
        except ImportError:
            raise UserError(f"`lookalike {command}` needs matplotlib and scikit-learn, and {module} is not installed: "
                            "pip install 'lookalike[plot]' (from a checkout: pip install -e '.[plot]')") from None


def parse_bytes(text: str) -> int:
    """'8Gi', '512Mi', '2G', '1000000' -> bytes (Kubernetes quantity suffixes)."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "K": 10**3, "M": 10**6, "G": 10**9,
             "T": 10**12}
    text = str(text).strip()
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return int(float(text[:-len(suffix)]) * factor)
    return int(float(text))


# --- loadtest ---------------------------------------------------------------------------------------------------
def cmd_loadtest(args) -> int:
    from tools import loadtest
    from router.server import _METRIC_FROM_PROTO

    conn = _conn(args)
    try:
        mix = loadtest.parse_mix(args.mix)
        mode = args.mode or ("open" if args.rate else "closed")
        cfg = loadtest.LoadConfig(
            target=args.target, collection=args.name, mode=mode, rate=args.rate or 0.0,
            concurrency=args.concurrency, duration=args.duration, requests=args.requests, mix=mix, k=args.k,
            batch=args.batch, nprobe=args.nprobe, ef_search=args.ef_search, processes=args.processes,
            timeout=args.timeout, arrivals=args.arrivals, recall_sample=args.recall_sample,
            keep_writes=args.keep_writes, seed=args.seed, **conn)
        cfg.check()
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.ids and not args.data:
        raise UserError("--ids names the ids of the vectors of --data: give --data FILE.npy too")
    queries = _load_npy(args.queries, "--queries") if args.queries else None
    data = _load_npy(args.data, "--data", mmap=True) if args.data else None
    data_ids = _read_lines(args.ids, "--ids") if args.ids else None
    if data_ids is not None and len(data_ids) != len(data):
        raise UserError(f"--ids {args.ids}: {len(data_ids)} ids for the {len(data)} vectors of --data {args.data}; "
                        "give the ids file the vectors were loaded with (one id a line)")
    with _client(args, conn) as client:
        spec = client.describe_collection(args.name).spec
        metric = _METRIC_FROM_PROTO.get(spec.metric, "l2")
        for what, x in (("queries", queries), ("data", data)):
            if x is not None and (x.ndim != 2 or x.shape[1] != (spec.dim // 8 if metric == "hamming" else spec.dim)):
                raise UserError(f"--{what} has shape {x.shape}; collection {args.name!r} holds "
                                + (f"codes of {spec.dim} bits" if metric == "hamming" else f"{spec.dim}-d vectors"))
        recall_off = None
        if data is not None and cfg.recall_sample > 0 and cfg.mix.get("search", 0) > 0:
            recall_off = loadtest.recall_ids_problem(client, args.name, len(data), data_ids, args.ids, args.seed)
    if recall_off:
        print(f"warning: {recall_off}", file=sys.stderr)
    if data is not None:
        data = np.ascontiguousarray(data)
    try:
        queries, mean, std = loadtest.prepare(
            cfg, queries, data, n_queries=args.query_count, noise=args.noise,
            fetch=lambda n: loadtest.fetch_stored(args.target, args.name, n, args.seed, conn))
    except ValueError as err:
        raise UserError(str(err)) from None
    report, rec = loadtest.run(cfg, queries, mean, std, data, data_ids, metric, show_progress=not args.quiet,
                               recall_off=recall_off)
    print(loadtest.format_report(report))
    if args.out:
        try:
            loadtest.save(report, args.out)
        except OSError as err:
            raise UserError(_os_error(err, "--out")) from None
        print(f"report: {args.out}")
    if args.plot:
        try:
            loadtest.plot(report, rec, args.plot)
            print(f"plot: {args.plot}")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install 'lookalike[plot]')", file=sys.stderr)
    return 0


# --- size -------------------------------------------------------------------------------------------------------
def cmd_size(args) -> int:
    from tools import sizing

    try:
        p = sizing.plan(args.vectors, args.dim, args.index, args.metric, args.replication, args.node_memory,
                        args.shards_per_node, args.headroom, args.reserve, args.id_bytes, args.payload_bytes,
                        args.gpu_memory, args.gpu_float16)
    except ValueError as err:  # lookalike.errors.InvalidArgument (a spec outside the grammar) is a ValueError
        raise UserError(_one_line(err)) from None
    print(sizing.report(p, args.dim, args.index))
    if args.kustomize:
        try:
            files = sizing.write_kustomize(p, args.kustomize, args.overlay)
        except ValueError as err:
            raise UserError(_one_line(err)) from None
        print(f"overlay: {', '.join(files)} (kubectl apply -k {args.kustomize})")
    return 0


# --- parser -----------------------------------------------------------------------------------------------------
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


class _Parser(argparse.ArgumentParser):
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
        self.exit(2, f"{self.prog}: error: {_one_line(message)}; `{self.prog} --help` says more\n")


class _Version(argparse.Action):
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
            toml = (pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
            return tomllib.loads(toml)["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown (not installed, and no pyproject.toml beside the source)"


# How each encoder of the registry is named on the command line (its argument after the colon); a name the
# registry adds later shows as it is.
_ENCODER_ARGS = {"phash": "phash[:N] (N x N-bit hash, default 8)", "face": "face[:strict]",
                 "torchscript": "torchscript:PATH (your TorchScript model, or `lookalike train-encoder`'s)"}


def _encoder_forms() -> str:
    from encoder.registry import available  # here: PIL and the decoder load only when the help is printed

    return ", ".join(_ENCODER_ARGS.get(name, name) for name in available())


def _number(kind, low=None, high=None, above=None):
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


_count = _number(int, low=1)        # something there must be at least one of
_optional = _number(int, low=0)     # 0: the default (the server's, the collection's, none)
_seconds = _number(float, above=0)
_port = _number(int, low=0, high=65535)


def _bytes(text: str) -> int:
    """argparse type of a memory size: '8Gi', '512Mi', '2G', '1000000' -> bytes."""
    try:
        value = parse_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a size such as 8Gi, 512Mi or 1000000 (bytes), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def _shard_gpus(text: str):
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


def _target(text: str) -> str:
    """argparse type of --target: HOST:PORT (or a gRPC target with a scheme, e.g. unix:PATH, passed as it is)."""
    if text.startswith(_GRPC_SCHEMES):
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"takes HOST:PORT (e.g. {DEFAULT_TARGET}), port 1 to 65535; got {text!r}")
    return text


def _tls_flags(sp, server: bool) -> None:
    """--tls-cert, --tls-key, --tls-ca, --tls-server-name; their defaults are filled in after parsing
    (:data:`_CONNECTION_DEFAULTS`), so that the same flags before the subcommand count too."""
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


def _connection_flags(sp) -> None:
    """The flags of a client command's connection to the router (also accepted before the subcommand)."""
    sp.add_argument("--target", type=_target, default=argparse.SUPPRESS, metavar="HOST:PORT",
                    help=f"the router to talk to (env LOOKALIKE_TARGET; default {DEFAULT_TARGET})")
    _tls_flags(sp, server=False)
    sp.add_argument("--token-file", default=argparse.SUPPRESS, metavar="FILE",
                    help="file holding the bearer token (env LOOKALIKE_TOKEN_FILE, or the token itself in "
                         "LOOKALIKE_TOKEN; default: no token)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lookalike", description="Sharded similarity search for image catalogs. The connection flags "
                "(--target, --tls-*, --token-file) go before or after the subcommand.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more (INFO)")
    p.add_argument("--version", action=_Version, help="print the version of lookalike and exit")
    _connection_flags(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_target(sp):
        _connection_flags(sp)
        sp.set_defaults(connects=True)
        return sp

    s = sub.add_parser("serve", help="start controller, shards and router (embedded local Ray by default)")
    s.add_argument("--data", default="./lookalike-data",
                   help="storage URI: a directory or file://DIR, the same on every node (default %(default)s)")
    s.add_argument("--port", type=_port, default=None,
                   help="port the router listens on (env LOOKALIKE_PORT; default 50051; 0: any free port, printed)")
    s.add_argument("--host", default=None, help="address the router binds (default: all interfaces with TLS or "
                   "--insecure, else 127.0.0.1)")
    _tls_flags(s, server=True)
    s.add_argument("--tls-client-auth", action="store_true",
                   help="mutual TLS for clients too: they need a certificate --tls-ca signed (env "
                        "LOOKALIKE_TLS_CLIENT_AUTH=1)")
    s.add_argument("--insecure", action="store_true",
                   help="serve plaintext beyond loopback (no TLS on any hop): only inside a network you trust")
    s.add_argument("--tokens", default=None, metavar="FILE",
                   help="JSON file of accepted bearer tokens and their scopes (env LOOKALIKE_TOKENS_FILE; see "
                        "`lookalike token create`); default: none, the API needs no token")
    s.add_argument("--rate-limit", type=_number(float, low=0), default=0.0,
                   help="requests per second per token (or for all callers, without tokens) unless a token sets "
                        "its own (default 0: no limit)")
    s.add_argument("--rate-burst", type=_optional, default=0,
                   help="requests at once above --rate-limit (default 0: one second's worth)")
    s.add_argument("--health-port", type=_port, default=0,
                   help="also serve grpc.health.v1 alone, in plaintext, on this port: for probes that cannot speak "
                        "TLS, e.g. Kubernetes' (default 0: none)")
    s.add_argument("--shards", type=_count, default=2, help="shards to start on new storage (default %(default)s)")
    s.add_argument("--shard-cpus", type=_number(float, above=0), default=1.0,
                   help="Ray CPUs per shard actor (default %(default)s)")
    s.add_argument("--address", default=None,
                   help="join this Ray cluster (host:port or ray://host:port) instead of starting a local one "
                        "(default: start one)")
    s.add_argument("--cluster", default="lookalike", help="cluster name (actor names; default %(default)s)")
    s.add_argument("--grace", type=_number(float, low=0), default=5.0,
                   help="seconds the router lets calls in flight finish on Ctrl-C or SIGTERM before it stops "
                        "(default %(default)s)")
    s.add_argument("--shard-memory", type=_bytes, default="0",
                   help="memory each shard may fill, e.g. 8Gi (its capacity; writes past it get RESOURCE_EXHAUSTED; "
                        "default 0: no limit)")
    s.add_argument("--shard-gpus", type=_shard_gpus, default="auto",
                   help="GPUs per shard actor: auto (one each, or a share, when the Ray cluster has GPUs; else none), "
                        "0 for CPU shards, or a number (default %(default)s)")
    s.add_argument("--max-shards", type=_count, default=64, help="automatic growth stops here (default %(default)s)")
    s.add_argument("--copy-mb-s", type=_number(float, low=0), default=0.0,
                   help="rate limit of a bucket move's copy in MB/s (default 0: none); lower it to leave more CPU to "
                        "searches while the cluster grows")
    s.add_argument("--autoscale", type=_number(float, low=0), default=30.0,
                   help="seconds between checks of shard memory against 80%% of --shard-memory; past it a shard is "
                        "added and buckets rebalanced (default %(default)s; 0: off; needs --shard-memory)")
    s.add_argument("--encoders", type=_optional, default=0,
                   help="encoder actors on Ray (a GPU each when the cluster has them); default 0: encode in the router")
    s.add_argument("--batch-inflight", type=_count, default=1,
                   help="batches of one kind of search running at once; searches arriving meanwhile gather into the "
                        "next batch (default %(default)s; a lone search never waits)")
    s.add_argument("--batch-wait-us", type=_number(float, low=-1), default=300.0,
                   help="with --batch-inflight > 1: how long a batch gathers while another runs, in microseconds "
                        "(default %(default)s); -1: no batching")
    s.add_argument("--router-threads", type=_count, default=64,
                   help="threads serving the router's calls other than searches (default %(default)s)")
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("token", help="bearer tokens of a router's tokens file: create, list, revoke",
                       description=f"Bearer tokens of a router's tokens file (`lookalike serve --tokens FILE`), e.g. "
                                   f"`{_TOKEN_EXAMPLE}`, then `lookalike status --token-file ci.token`.")
    tsub = t.add_subparsers(dest="action", required=True, metavar="ACTION")
    tc = tsub.add_parser("create", help="a new random token: its SHA-256 goes into the tokens file, the token to "
                         "--out (or stdout)", epilog=f"example: {_TOKEN_EXAMPLE}")
    tc.add_argument("name", nargs="?", help="who holds it (shown in logs and errors, never the token); required")
    tc.add_argument("--scopes", default=None, help="required: comma-separated read (search, get, status), write "
                    "(upsert, delete), admin (collections, rebalance, jobs; grants every scope)")
    tc.add_argument("--rate", type=_number(float, low=0), default=0.0,
                    help="requests per second for this token (default 0: the server's --rate-limit)")
    tc.add_argument("--burst", type=_optional, default=0,
                    help="requests at once above --rate (default 0: the server's)")
    tc.add_argument("--out", default=None, metavar="FILE",
                    help="write the token to this file (mode 600); default: print it on stdout")
    tsub.add_parser("list", help="the tokens' names, scopes and rates")
    tsub.add_parser("revoke", help="remove a token (routers re-read the file within seconds)").add_argument(
        "name", help="the token's name")
    for tp in tsub.choices.values():
        tp.add_argument("--tokens", default=os.environ.get("LOOKALIKE_TOKENS_FILE", "lookalike-tokens.json"),
                        metavar="FILE", help="the tokens file (env LOOKALIKE_TOKENS_FILE; default %(default)s)")
    t.set_defaults(func=cmd_token)

    c = sub.add_parser("collection", help="create, list, describe, drop collections")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    cc = with_target(csub.add_parser("create", help="a new collection: dimension, metric, index, buckets, copies"))
    cc.add_argument("name", help="the collection's name")
    cc.add_argument("--dim", type=_count, default=0,
                    help="components per vector (bits for hamming); required without --encoder, whose dimension it "
                         "is otherwise")
    cc.add_argument("--metric", choices=["l2", "ip", "cosine", "hamming"], default="",
                    help="distance (default l2, or the encoder's)")
    cc.add_argument("--encoder", default="", metavar="NAME",
                    help="encoder that turns images into this collection's vectors: %(encoders)s (default: none, "
                         "vectors only; docs/ENCODERS.md)")
    cc.add_argument("--index", default="Flat", help="FAISS factory string, e.g. Flat, IVF1024,Flat, IVF4096,PQ16, "
                    "HNSW32 (default %(default)s)")
    cc.add_argument("--buckets", type=_count, default=0, help="buckets the ids hash into, fixed for the collection's "
                    "life (default 0: the server's, 1024)")
    cc.add_argument("--replication", "--replicas", dest="replication", type=_count, default=0,
                    help="copies of each bucket, each on another shard (default 0: 1); --replicas is the same flag")
    cc.add_argument("--nprobe", type=_optional, default=0,
                    help="IVF indexes: inverted lists a search probes unless it asks for another number (default "
                         "0: the server's, 16)")
    cc.add_argument("--ef-search", type=_optional, default=0,
                    help="HNSW indexes: search breadth unless a search asks for another (default 0: the server's, 64)")
    cc.add_argument("--gpu-float16", action="store_true",
                    help="on GPU shards: float16 vectors (Flat) or lookup tables (IVF-PQ)")
    with_target(csub.add_parser("list", help="one line per collection"))
    with_target(csub.add_parser("describe", help="a collection's spec, count, epoch and training, as JSON")
                ).add_argument("name", help="the collection's name")
    with_target(csub.add_parser("drop", help="delete a collection and all its items")).add_argument(
        "name", help="the collection's name")
    c.set_defaults(func=cmd_collection)

    u = with_target(sub.add_parser("upsert", help="bulk-load vectors from a .npy file"))
    u.add_argument("name", help="the collection")
    u.add_argument("vectors", help=".npy of shape (n, d) float32 (or uint8 codes for hamming)")
    u.add_argument("--ids", metavar="FILE", help="text file, one id per line (default: row numbers 0, 1, ...)")
    u.add_argument("--payload", metavar="FILE.jsonl",
                   help="JSON lines, one object of fields per vector (default: no payloads)")
    u.add_argument("--batch", type=_count, default=5000, help="vectors per message of the stream (default %(default)s)")
    u.add_argument("--quiet", action="store_true", help="no progress bar")
    u.set_defaults(func=cmd_upsert)

    d = with_target(sub.add_parser("delete", help="delete items by id"))
    d.add_argument("name", help="the collection")
    d.add_argument("ids", nargs="*", help="ids to delete")
    d.add_argument("--ids-file", metavar="FILE", help="text file of more ids to delete, one per line")
    d.set_defaults(func=cmd_delete)

    g = with_target(sub.add_parser("get", help="fetch items by id (JSON lines)"))
    g.add_argument("name", help="the collection")
    g.add_argument("ids", nargs="+", help="ids to fetch")
    g.add_argument("--vectors", action="store_true", help="include vectors")
    g.set_defaults(func=cmd_get)

    q = with_target(sub.add_parser("search", help="k-NN search for the queries in a .npy file, or query images"))
    q.add_argument("name", help="the collection")
    q.add_argument("queries", nargs="?", help=".npy of shape (nq, d) or (d,) (or --image)")
    q.add_argument("--image", action="append", metavar="FILE",
                   help="query image (repeatable); the collection's encoder turns it into a vector")
    q.add_argument("--sheet", metavar="OUT.png", help="write a contact sheet of the queries and their neighbours")
    q.add_argument("-k", type=_count, default=10, help="neighbours per query (default %(default)s)")
    q.add_argument("--nprobe", type=_optional, default=0,
                   help="IVF indexes: inverted lists to probe (default 0: the collection's)")
    q.add_argument("--ef-search", type=_optional, default=0,
                   help="HNSW indexes: search breadth (default 0: the collection's)")
    q.add_argument("--min-coverage", type=_number(float, low=0, high=1), default=None,
                   help="fraction of buckets that must answer, 0 to 1, else the search fails with UNAVAILABLE "
                        "(default: all, 1)")
    q.add_argument("--payloads", action="store_true", help="show each neighbour's payload")
    q.add_argument("--json", action="store_true", help="print JSON (coverage, ids, distances) instead of a table")
    q.set_defaults(func=cmd_search)

    i = with_target(sub.add_parser("ingest", help="encode and store every image under a folder (resumable)"))
    i.add_argument("name", help="a collection with an encoder")
    i.add_argument("dir", help="folder of images (walked recursively; ids are paths relative to it)")
    i.add_argument("--batch", type=_count, default=64, help="images per request (default %(default)s)")
    i.add_argument("--uri-prefix", help="payload uri = PREFIX + relative path (default: the file's absolute path)")
    i.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    i.set_defaults(func=cmd_ingest)

    te = sub.add_parser("train-encoder", help="train a small CNN encoder on a folder of images (CPU, minutes)")
    te.add_argument("dir", help="folder of images to train on")
    te.add_argument("--out", required=True, help="TorchScript file to write (plus OUT.json)")
    te.add_argument("--method", choices=["triplet", "autoencoder"], default="triplet",
                    help="triplet: contrastive on augmentations; autoencoder: reconstruction (default %(default)s)")
    te.add_argument("--epochs", type=_count, default=None,
                    help="passes over the images (default 30, more for small folders: at least 400 steps)")
    te.add_argument("--batch", type=_count, default=32, help="images per training step (default %(default)s)")
    te.add_argument("--dim", type=_count, default=128, help="embedding size (default %(default)s)")
    te.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    te.add_argument("--quiet", action="store_true", help="no progress bar")
    te.set_defaults(func=cmd_train_encoder)

    dd = with_target(sub.add_parser("dedup", help="near-duplicate groups over a whole collection (a cluster job)"))
    dd.add_argument("name", help="the collection")
    dd.add_argument("--threshold", type=_number(float), required=True,
                    help="l2: squared distance at most T; hamming: bits at most T; ip/cosine: similarity at least T")
    dd.add_argument("-k", "--k", type=_count, default=10, help="neighbours looked at per item (default %(default)s)")
    dd.add_argument("--nprobe", type=_optional, default=0,
                    help="IVF indexes: inverted lists to probe (default 0: the collection's)")
    dd.add_argument("--ef-search", type=_optional, default=0,
                    help="HNSW indexes: search breadth (default 0: the collection's)")
    dd.add_argument("--batch", type=_optional, default=0, help="items per search batch (default 0: 4096)")
    dd.add_argument("--out", help="write OUT.csv, OUT.jsonl and OUT.png (default dedup-NAME)")
    dd.add_argument("--sheet", help="contact sheet PNG path (default OUT.png; 'none': no sheet)")
    dd.add_argument("--sheet-groups", type=_count, default=12, help="largest groups on the sheet (default %(default)s)")
    dd.add_argument("--show", type=_optional, default=10, help="groups to print (default %(default)s)")
    dd.add_argument("--job", help="job id (default: derived from the arguments, so the same command resumes)")
    dd.add_argument("--no-wait", action="store_true", help="start the job and return")
    dd.add_argument("--quiet", action="store_true", help="no progress bar")
    dd.set_defaults(func=cmd_dedup)

    cl = with_target(sub.add_parser("cluster", help="k-means over a collection; each item's cluster in its payload"))
    cl.add_argument("name", help="the collection")
    cl.add_argument("-k", "--k", type=_count, required=True, help="number of clusters (required)")
    cl.add_argument("--sample", type=_optional, default=0, help="training sample (default 0: min(count, 256 k))")
    cl.add_argument("--field", default="", help="payload field (default: cluster)")
    cl.add_argument("--niter", type=_optional, default=0, help="k-means iterations (default 0: 20)")
    cl.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    cl.add_argument("--job", help="job id (default: derived from the arguments)")
    cl.add_argument("--no-wait", action="store_true", help="start the job and return")
    cl.add_argument("--json", action="store_true", help="print the cluster sizes as JSON")
    cl.add_argument("--quiet", action="store_true", help="no progress bar")
    cl.set_defaults(func=cmd_cluster)

    jb = with_target(sub.add_parser("job", help="catalog jobs: list, status ID, cancel ID"))
    jb.add_argument("action", choices=["list", "status", "cancel"], help="list every job, or show or cancel one")
    jb.add_argument("id", nargs="?", default="", help="the job's id (status, cancel)")
    jb.set_defaults(func=cmd_job)

    mp = with_target(sub.add_parser("map", help="a 2-D map of a sample of the collection as a PNG (needs the plot "
                                                "extra)"))
    mp.add_argument("name", help="the collection")
    mp.add_argument("--out", required=True, help="PNG to write")
    mp.add_argument("--sample", type=_number(int, low=1, high=10000), default=2000,
                    help="items to draw (default %(default)s, at most 10000)")
    mp.add_argument("--method", choices=["auto", "tsne", "pca"], default="auto",
                    help="auto: t-SNE up to 3000 items, PCA above (default %(default)s)")
    mp.add_argument("--field", default="cluster", help="payload field to colour by (default %(default)s)")
    mp.add_argument("--thumbnails", action="store_true", help="draw images (payload uri) at their points")
    mp.add_argument("--width", type=_count, default=1200, help="pixels (default %(default)s)")
    mp.add_argument("--height", type=_count, default=900, help="pixels (default %(default)s)")
    mp.add_argument("--seed", type=int, default=0, help="random seed of the sample and the projection "
                    "(default %(default)s)")
    mp.set_defaults(func=cmd_map)

    st = with_target(sub.add_parser("status", help="shards, buckets, vectors, memory, bucket moves"))
    st.add_argument("--json", action="store_true", help="print the whole status as JSON")
    st.set_defaults(func=cmd_status)

    tr = with_target(sub.add_parser(
        "train", help="train a collection's index again (IVF centroids, PQ/SQ codebooks) on a fresh sample, as a new "
                      "version the shards move into while they serve"))
    tr.add_argument("name", help="the collection")
    tr.add_argument("--no-wait", action="store_true", help="return once the training is asked for")
    tr.add_argument("--timeout", type=_seconds, default=3600.0,
                    help="seconds to follow it before giving up with exit status 1 (default %(default)s)")
    tr.set_defaults(func=cmd_train)

    rb = with_target(sub.add_parser("rebalance", help="add shards and move buckets until the load is even"))
    rb.add_argument("name", nargs="?", default="", help="the collection (default: every collection)")
    rb.add_argument("--add-shards", type=_optional, default=0, help="shards to start first (default %(default)s)")
    rb.add_argument("--no-wait", action="store_true", help="return once the moves are queued")
    rb.add_argument("--timeout", type=_seconds, default=3600.0,
                    help="seconds to follow the moves before giving up with exit status 1 (default %(default)s); a "
                         "shard that cannot start ends it at once")
    rb.add_argument("--quiet", action="store_true", help="no progress bar")
    rb.set_defaults(func=cmd_rebalance)

    lt = with_target(sub.add_parser("loadtest", help="load a running cluster; report rate, latency, errors, recall"))
    lt.add_argument("name", help="the collection")
    lt.add_argument("--mode", choices=["open", "closed"], default=None,
                    help="open: send at --rate whatever the server does; closed: --concurrency requests in flight "
                         "(default: open when --rate is given)")
    lt.add_argument("--rate", type=_number(float, low=0), default=0.0,
                    help="open loop: requests per second, all processes together (default 0: closed loop)")
    lt.add_argument("--arrivals", choices=["uniform", "poisson"], default="uniform",
                    help="open loop: evenly spaced or Poisson send times (default %(default)s)")
    lt.add_argument("--concurrency", type=_count, default=8, help="closed loop: requests in flight (default "
                    "%(default)s)")
    lt.add_argument("--duration", type=_number(float, low=0), default=10.0,
                    help="seconds of load (default %(default)s; 0: until --requests)")
    lt.add_argument("--requests", type=_optional, default=0, help="stop after this many requests (default 0: no "
                    "count)")
    lt.add_argument("--mix", default="search=1",
                    help="shares of search, upsert, delete (default %(default)s), e.g. search=0.9,upsert=0.08,"
                         "delete=0.02")
    lt.add_argument("-k", type=_count, default=10, help="neighbours per search (default %(default)s)")
    lt.add_argument("--batch", type=_count, default=1, help="queries (or items) per request (default %(default)s)")
    lt.add_argument("--nprobe", type=_optional, default=0,
                    help="IVF indexes: inverted lists to probe (default 0: the collection's)")
    lt.add_argument("--ef-search", type=_optional, default=0,
                    help="HNSW indexes: search breadth (default 0: the collection's)")
    lt.add_argument("--processes", type=_count, default=2, help="client processes (default %(default)s)")
    lt.add_argument("--timeout", type=_seconds, default=10.0,
                    help="deadline of each request in seconds (default %(default)s)")
    lt.add_argument("--queries", metavar="FILE.npy", help=".npy of query vectors (default: rows of --data plus "
                    "noise, or stored vectors)")
    lt.add_argument("--data", metavar="FILE.npy",
                    help=".npy of the vectors loaded: queries are its rows plus noise, and recall@k is measured "
                         "against exact search over it (default: no recall)")
    lt.add_argument("--ids", metavar="FILE", help="with --data: the ids its rows were loaded with, one per line, as "
                    "given to `lookalike upsert --ids` (default: row numbers)")
    lt.add_argument("--noise", type=_number(float, low=0), default=0.05,
                    help="query noise, times the data's deviation (hamming: bit-flip probability; default "
                         "%(default)s)")
    lt.add_argument("--query-count", type=_count, default=10000, help="distinct queries to draw (default "
                    "%(default)s)")
    lt.add_argument("--recall-sample", type=_optional, default=100,
                    help="queries checked against exact search (default %(default)s; 0: none)")
    lt.add_argument("--keep-writes", action="store_true", help="keep the items the test wrote (default: deleted)")
    lt.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    lt.add_argument("--out", default="loadtest.json", help="JSON report (default %(default)s; '' for none)")
    lt.add_argument("--plot", default="loadtest.png", help="PNG of latency over time and its distribution "
                                                         "(default %(default)s; '' for none)")
    lt.add_argument("--quiet", action="store_true", help="no progress bar")
    lt.set_defaults(func=cmd_loadtest)

    sz = sub.add_parser("size", help="memory per vector, shards, nodes and memory requests for a catalog")
    sz.add_argument("--vectors", type=_optional, required=True, help="items in the catalog (required)")
    sz.add_argument("--dim", type=_count, required=True, help="components per vector, bits for hamming (required)")
    sz.add_argument("--index", default="Flat", help="FAISS factory string (default %(default)s)")
    sz.add_argument("--metric", choices=["l2", "ip", "cosine", "hamming"], default="l2",
                    help="distance (default %(default)s)")
    sz.add_argument("--replication", "--replicas", dest="replication", type=_count, default=1,
                    help="copies of each item, as `collection create --replication` (default %(default)s); "
                         "--replicas is the same flag")
    sz.add_argument("--node-memory", type=_bytes, default="64Gi",
                    help="memory of each shard node (pod) (default %(default)s)")
    sz.add_argument("--shards-per-node", type=_count, default=1, help="shards on each node (default %(default)s)")
    sz.add_argument("--reserve", type=_bytes, default="2Gi",
                    help="memory of a node kept for Ray itself (default %(default)s)")
    sz.add_argument("--headroom", type=_number(float, low=0, high=0.99), default=0.3,
                    help="share of room left for growth, 0 to 0.99 (default %(default)s)")
    sz.add_argument("--id-bytes", type=_optional, default=16, help="mean id length in bytes (default %(default)s)")
    sz.add_argument("--payload-bytes", type=_optional, default=0,
                    help="mean serialized payload bytes (default %(default)s)")
    sz.add_argument("--gpu-memory", type=_bytes, default="0",
                    help="memory of each GPU, for GPU shards, e.g. 80Gi (default 0: CPU shards)")
    sz.add_argument("--gpu-float16", action="store_true", help="float16 vectors on the GPU (Flat)")
    sz.add_argument("--kustomize", metavar="DIR", help="write a kustomize overlay with these sizes to DIR")
    sz.add_argument("--overlay", choices=["cpu", "gpu"], default="cpu",
                    help="the overlay it builds on (default %(default)s)")
    sz.set_defaults(func=cmd_size)

    sub.add_parser("bench", add_help=False,
                   help="cluster vs in-process FAISS benchmark; `lookalike bench --help` (docs/BENCHMARKS.md)")
    return p


def _connection_defaults(parser: argparse.ArgumentParser, args) -> None:
    """Fills in the connection flags not given (they may come before or after the subcommand); refuses them for a
    command that talks to no router."""
    if not getattr(args, "connects", False):
        flags = ("target", "token_file") if args.command == "serve" else tuple(_CONNECTION_DEFAULTS)
        given = [f"--{dest.replace('_', '-')}" for dest in flags if getattr(args, dest, None) is not None]
        if given:
            what = "serve takes --host and --port" if args.command == "serve" else "it talks to no router"
            parser.error(f"{', '.join(given)}: `lookalike {args.command}` takes no connection flags ({what})")
    for dest, default in _CONNECTION_DEFAULTS.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, default)
    if getattr(args, "connects", False) and args.target == DEFAULT_TARGET and os.environ.get("LOOKALIKE_TARGET"):
        try:
            args.target = _target(os.environ["LOOKALIKE_TARGET"])
        except argparse.ArgumentTypeError as err:
            parser.error(f"LOOKALIKE_TARGET {err}")


def _bench_main(argv: list[str]) -> int:
    from bench.cluster_bench import main as bench_main

    return int(bench_main(argv, prog="lookalike bench", parser_class=_Parser) or 0)


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit status (also for a command line argparse refuses: 2, or --help: 0)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        if argv[:1] == ["bench"]:  # the benchmark has its own flags
            return _bench_main(argv[1:])
        args = parser.parse_args(argv)
        _connection_defaults(parser, args)
    except SystemExit as stop:  # argparse: --help, --version, or a command line it refuses (one line on stderr)
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 2
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "serve" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it picked: noise here
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
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return err.status
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        print(f"error: {_os_error(err)}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as err:
        print(f"error: a file given is not UTF-8 text ({err.reason} at byte {err.start})", file=sys.stderr)
        return 2
    except Exception as err:
        grpc = sys.modules.get("grpc")
        if grpc is not None and isinstance(err, grpc.RpcError) and hasattr(err, "code"):
            print(_rpc_error_line(err, args), file=sys.stderr)
            return 1
        if os.environ.get("LOOKALIKE_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: unexpected {type(err).__name__}: {_one_line(err)} (a bug in lookalike, or a case it does not "
              "know: run again with LOOKALIKE_DEBUG=1 for the traceback, and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
