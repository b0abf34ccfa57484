"""`lookalike serve`: the router with its cluster, an embedded Ray (or joining one), until SIGINT or SIGTERM: the
security flags checked before anything starts, a graceful drain, and a stop that cannot hang on a Ray that is gone.

May use: the base package (lookalike), control (the cluster on Ray), router (its server) and tools.cli.common and
tools.cli.flags.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import pathlib
import signal
import socket
import ssl
import sys
import threading
import time

import numpy as np
import psutil
import ray

from control.link import ControlPlaneLink
from control.ray_cluster import (connect_router, no_implicit_connect, shards_phrase, start_cluster, start_jobs,
                                 stop_cluster, stop_jobs)
from control.ray_encoders import RayEncoderPool
from control.state import stored_shards
from lookalike import logs, tracing
from lookalike.balancing import connection_age_options
from lookalike.config import RPC, ClusterConfig, MovePolicy, storage_path
from lookalike.datadir import DataDirInUse, DataDirLock, embedded_ray_env
from lookalike.metrics import check_metrics_bind
from lookalike.net import create_health_server, set_serving
from lookalike.security import AuthInterceptor, TokenTable, is_loopback
from router.core import Router
from router.metrics import serve_router_metrics
from router.server import SERVICE_NAME, create_router_server
from router.shard_client import GrpcShardClient
from tools.cli.common import UserError, parse_bytes, tls_config
from tools.cli.flags import (byte_size, non_negative_int, number, port_number, positive_int, shard_gpus,
                             tls_flags)

log = logging.getLogger("lookalike")


def _serve_security(args):
    """(tls, auth interceptor or None, host to bind) of serve's flags and environment.

    Plaintext only when asked for: without TLS files the router binds loopback (the embedded default on a
    laptop); beyond loopback, or in a Ray cluster, it takes --insecure.

    Raises:
        ValueError: flags that do not fit together, unreadable files (the message says which).
    """
    tls = tls_config(args, server=True)
    if tls is not None:
        tls.server_credentials()  # readable, and a key with the certificate
        _check_key_pair(tls.cert, tls.key)
        tls.internal().server_credentials()  # the shards' mutual TLS (LOOKALIKE_INTERNAL_TLS_*, else these files)
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
    shards = max(args.shards, args.max_shards, stored_shards(data_dir))
    return max(os.cpu_count() or 1, int(np.ceil(shards * args.shard_cpus)) + max(1, args.encoders))


def _check_key_pair(cert: str, key: str) -> None:
    """The key file holds the private key of the certificate (gRPC itself only finds out when a server binds: the
    shards would crash-loop on "Failed to bind").

    Raises:
        ValueError: naming the file at fault.
    """
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
    embedded = args.address is None
    args.port = serve_port(args, os.environ)
    try:
        data_dir = storage_path(args.data)
        tls, auth, host = _serve_security(args)
        log_format = logs.log_format(args.log_format)
        tracing.setup("lookalike-router")  # the OTEL_* environment (off when it names no exporter)
        metrics_port, metrics_host = metrics_flags(args, os.environ, tls)
        connection_age = (args.max_connection_age, args.max_connection_age_grace)
        connection_age_options(*connection_age)  # within bounds (a sentence if not), before anything starts
        # One storage, one server: the embedded cluster's shards write this directory. (Routers joining a Ray
        # cluster share its storage with the cluster's other routers: the cluster's controller owns it there.)
        lock = DataDirLock(data_dir).acquire() if embedded else None
        ray_env = embedded_ray_env(data_dir) if embedded else {}
        # the shard actors log as the router does (Ray's processes inherit this environment, OTEL_* included)
        ray_env[logs.ENV_FORMAT] = log_format
    except (ValueError, DataDirInUse) as err:  # lookalike.errors.InvalidArgument is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Before ray.init: every process Ray starts inherits this environment (Ray read RAY_AUTH_MODE when imported:
    # _refresh_ray_auth_mode makes it read it again).
    _set_environ(ray_env)

    shard_memory = parse_bytes(args.shard_memory)
    cfg = ClusterConfig(data_dir=data_dir, shards=args.shards, cluster_name=args.cluster,
                        shard_num_cpus=args.shard_cpus, shard_memory=shard_memory,
                        # in a Ray cluster the router may run on another node: shards listen on their node's address
                        shard_host="127.0.0.1" if args.address is None else "auto",
                        shard_gpus=args.shard_gpus if args.shard_gpus == "auto" else float(args.shard_gpus),
                        policy=MovePolicy(max_shards=args.max_shards, copy_mb_s=args.copy_mb_s,
                                          autoscale_s=args.autoscale if shard_memory else 0.0),
                        tls=tls.internal() if tls else None, shard_metrics_port=0 if metrics_port >= 0 else -1,
                        shards_per_process=args.shards_per_process)
    if embedded:
        # Ray's token authentication on, whatever the environment said: the GCS, the raylet and every worker listen
        # on all interfaces (docs/SECURITY.md, "What listens where"), and the token is what keeps others out.
        _refresh_ray_auth_mode()
        ray.init(address="local", namespace=cfg.namespace, include_dashboard=False, log_to_driver=args.verbose,
                 num_cpus=_embedded_num_cpus(args, data_dir))
        no_implicit_connect()
        embedded_ray = _EmbeddedRay(ray.get_runtime_context().gcs_address)
        link = None
        try:  # start_cluster logs how many shards start (on a restart: those the storage holds, whatever --shards says)
            handle, control = start_cluster(cfg)
        except TimeoutError as err:  # its message names the shards that cannot be placed, and why
            print(f"error: {err}", file=sys.stderr)
            _within(ray.shutdown, 15.0)
            return 1
        jobs = start_jobs(cfg)
        encoders = RayEncoderPool(args.encoders) if args.encoders else None
    else:
        # Joined to a cluster, the router keeps its link to the control plane up: lost (the Ray head restarted), it
        # reports NOT_SERVING, answers searches from the shard maps it holds, and connects again (control/link.py).
        link = ControlPlaneLink(functools.partial(connect_router, args.address, cfg, args.encoders, args.verbose),
                                f"the Ray cluster at {args.address}")
        try:
            link.start()
        except (ConnectionError, RuntimeError, TimeoutError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        control, jobs = link.control, link.jobs
        encoders = link.encoders if args.encoders else None
    router = Router(control, encoders=encoders, connect=functools.partial(GrpcShardClient, tls=cfg.tls))
    server, port, health = create_router_server(router, f"{host}:{args.port}", args.router_threads,
                                                batch_wait_s=args.batch_wait_us * 1e-6,
                                                batch_inflight=args.batch_inflight, jobs=jobs, tls=tls, auth=auth,
                                                max_concurrent_rpcs=args.max_concurrent_rpcs or None,
                                                connection_age=connection_age)
    healths = [health]
    metrics = serve_router_metrics(router, metrics_host, metrics_port, tls) if metrics_port >= 0 else None
    if metrics is not None:
        print(f"Prometheus metrics on {'https' if tls else 'http'}://{metrics.address}/metrics (the shards' at /sd)",
              flush=True)
    if args.health_port:  # plaintext health alone, for probes that cannot speak TLS
        probe_server, probe_port, probe_health = create_health_server(f"{host}:{args.health_port}")
        server.health_checker.add(probe_health)  # the router's readiness and liveness (lookalike.health)
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
    server.health_checker.stop()
    for h in healths:
        set_serving(h, [SERVICE_NAME], False)
    server.stop(grace=args.grace).wait()
    if metrics is not None:
        metrics.close()
    if args.health_port:
        probe_server.stop(None)
    if link is not None:
        link.close()
    router.close()
    tracing.flush()
    if embedded:
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
        return port_number(environ.get("LOOKALIKE_PORT") or "50051")
    except argparse.ArgumentTypeError as err:
        raise UserError(f"LOOKALIKE_PORT {err}") from None


def metrics_flags(args, environ, tls) -> tuple[int, str]:
    """(port, host) of serve's metrics endpoint: --metrics-port or LOOKALIKE_METRICS_PORT (-1: none), and
    --metrics-host or LOOKALIKE_METRICS_HOST (default 127.0.0.1; beyond loopback only with TLS and a client CA).

    Raises:
        ValueError: a port that is not one, or a bind beyond loopback without TLS (the sentence says so).
    """
    port = args.metrics_port
    if port is None:
        try:
            port = port_number(environ["LOOKALIKE_METRICS_PORT"]) if environ.get("LOOKALIKE_METRICS_PORT") else -1
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"LOOKALIKE_METRICS_PORT {err}") from None
    host = args.metrics_host or environ.get("LOOKALIKE_METRICS_HOST") or "127.0.0.1"
    if port >= 0:
        check_metrics_bind(host, tls)
    return port, host


def _exit_soon(status: int, after_s: float = 5.0) -> None:
    """Ends this process ``after_s`` seconds from now unless it ends by itself first. Everything is stopped by then,
    but a gRPC handler thread caught by the stop can stay blocked (an abort on a stopped server waits forever), and
    Python's exit waits for every such thread: serve stopped but never exited."""
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
        self.gcs_address = gcs_address
        self.daemons = [p for p in psutil.Process().children() if p.name() in ("gcs_server", "raylet")]

    def alive(self) -> bool:
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


def add_serve(sub) -> None:
    """The `serve` subcommand."""
    s = sub.add_parser("serve", help="start controller, shards and router (embedded local Ray by default)")
    s.add_argument("--data", default="./lookalike-data",
                   help="storage URI: a directory or file://DIR, the same on every node (default %(default)s)")
    s.add_argument("--port", type=port_number, default=None,
                   help="port the router listens on (env LOOKALIKE_PORT; default 50051; 0: any free port, printed)")
    s.add_argument("--host", default=None, help="address the router binds (default: all interfaces with TLS or "
                   "--insecure, else 127.0.0.1)")
    tls_flags(s, server=True)
    s.add_argument("--tls-client-auth", action="store_true",
                   help="mutual TLS for clients too: they need a certificate --tls-ca signed (env "
                        "LOOKALIKE_TLS_CLIENT_AUTH=1)")
    s.add_argument("--insecure", action="store_true",
                   help="serve plaintext beyond loopback (no TLS on any hop): only inside a network you trust")
    s.add_argument("--tokens", default=None, metavar="FILE",
                   help="JSON file of accepted bearer tokens and their scopes (env LOOKALIKE_TOKENS_FILE; see "
                        "`lookalike token create`); default: none, the API needs no token")
    s.add_argument("--rate-limit", type=number(float, low=0), default=0.0,
                   help="requests per second per token (or for all callers, without tokens) unless a token sets "
                        "its own (default 0: no limit)")
    s.add_argument("--rate-burst", type=non_negative_int, default=0,
                   help="requests at once above --rate-limit (default 0: one second's worth)")
    s.add_argument("--health-port", type=port_number, default=0,
                   help="also serve grpc.health.v1 alone, in plaintext, on this port: for probes that cannot speak "
                        "TLS, e.g. Kubernetes' (default 0: none)")
    s.add_argument("--log-format", choices=logs.FORMATS, default=None,
                   help="text, or json: one JSON object a line, with the trace id of the call it is about (env "
                        "LOOKALIKE_LOG_FORMAT, passed on to the shards; default text)")
    s.add_argument("--metrics-port", type=port_number, default=None,
                   help="serve Prometheus metrics over HTTP on this port (env LOOKALIKE_METRICS_PORT; 0: any free "
                        "port; default: none); the shards then serve theirs too, listed at /sd for Prometheus' "
                        "http_sd_configs (docs/OPERATIONS.md)")
    s.add_argument("--metrics-host", default=None,
                   help="address the metrics bind (env LOOKALIKE_METRICS_HOST; default 127.0.0.1); beyond loopback "
                        "only with --tls-cert, --tls-key and --tls-ca: HTTPS, scrapers need a client certificate")
    s.add_argument("--shards", type=positive_int, default=2, help="shards to start on new storage (default %(default)s)")
    s.add_argument("--shard-cpus", type=number(float, above=0), default=1.0,
                   help="Ray CPUs per shard actor (default %(default)s)")
    s.add_argument("--shards-per-process", type=positive_int, default=1,
                   help="shards that share one process: one search call per process for all of its shards, which "
                        "costs less CPU a search the more shards a node holds; a process that fails takes its shards "
                        "with it until Ray restarts it (default %(default)s: a process each)")
    s.add_argument("--address", default=None,
                   help="join this Ray cluster (host:port or ray://host:port) instead of starting a local one "
                        "(default: start one)")
    s.add_argument("--cluster", default="lookalike", help="cluster name (actor names; default %(default)s)")
    s.add_argument("--grace", type=number(float, low=0), default=5.0,
                   help="seconds the router lets calls in flight finish on Ctrl-C or SIGTERM before it stops "
                        "(default %(default)s)")
    s.add_argument("--shard-memory", type=byte_size, default="0",
                   help="memory each shard may fill, e.g. 8Gi (its capacity; writes past it get RESOURCE_EXHAUSTED; "
                        "default 0: no limit)")
    s.add_argument("--shard-gpus", type=shard_gpus, default="auto",
                   help="GPUs per shard actor: auto (one each, or a share, when the Ray cluster has GPUs; else none), "
                        "0 for CPU shards, or a number (default %(default)s)")
    s.add_argument("--max-shards", type=positive_int, default=64, help="automatic growth stops here (default %(default)s)")
    s.add_argument("--copy-mb-s", type=number(float, low=0), default=0.0,
                   help="rate limit of a bucket move's copy in MB/s (default 0: none); lower it to leave more CPU to "
                        "searches while the cluster grows")
    s.add_argument("--autoscale", type=number(float, low=0), default=30.0,
                   help="seconds between checks of shard memory against 80%% of --shard-memory; past it a shard is "
                        "added and buckets rebalanced (default %(default)s; 0: off; needs --shard-memory)")
    s.add_argument("--encoders", type=non_negative_int, default=0,
                   help="encoder actors on Ray (a GPU each when the cluster has them); default 0: encode in the router")
    s.add_argument("--batch-inflight", type=positive_int, default=1,
                   help="batches of one kind of search running at once; searches arriving meanwhile gather into the "
                        "next batch (default %(default)s; a lone search never waits)")
    s.add_argument("--batch-wait-us", type=number(float, low=-1), default=300.0,
                   help="with --batch-inflight > 1: how long a batch gathers while another runs, in microseconds "
                        "(default %(default)s); -1: no batching")
    s.add_argument("--max-concurrent-rpcs", type=non_negative_int, default=RPC.max_concurrent_rpcs,
                   help="calls the router runs or queues at once; beyond, they get RESOURCE_EXHAUSTED at once "
                        "(default %(default)s; 0: no bound)")
    s.add_argument("--max-connection-age", type=number(float, low=0), default=RPC.max_connection_age_s,
                   metavar="SECONDS",
                   help="send GOAWAY to a client connection this old: the client reconnects, so that routers added "
                        "behind a Service get calls too (default %(default)g; 0: never; docs/DEPLOY.md)")
    s.add_argument("--max-connection-age-grace", type=number(float, low=0), default=RPC.max_connection_age_grace_s,
                   metavar="SECONDS",
                   help="how long calls in flight on such a connection may still run (default: as long as they take; "
                        "a shorter grace cuts long bulk-load streams)")
    s.add_argument("--router-threads", type=positive_int, default=64,
                   help="threads serving the router's calls other than searches (default %(default)s)")
    s.set_defaults(func=cmd_serve)
