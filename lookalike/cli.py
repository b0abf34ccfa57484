"""`lookalike`: the command line for people. The only module (with the Ray actors) that configures logging and
reads flags and the environment."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import signal
import sys

import numpy as np

log = logging.getLogger("lookalike")

DEFAULT_TARGET = "localhost:50051"


def _tls(args, server: bool = False):
    """The TLS files of the flags, else of LOOKALIKE_TLS_* (lookalike.security.TLSConfig); None: plaintext."""
    from lookalike.security import TLSConfig

    env = TLSConfig.from_env() or TLSConfig()
    cert, key, ca = args.tls_cert or env.cert, args.tls_key or env.key, args.tls_ca or env.ca
    if not (cert or key or ca):
        return None
    client_auth = server and (args.tls_client_auth or env.client_auth)
    return TLSConfig(cert, key, ca, client_auth, args.tls_server_name or env.server_name)


class _ConnError(Exception):
    """Connection flags that cannot work (an unreadable certificate or token file, a token in plaintext)."""


def _conn(args) -> dict:
    """Client keyword arguments of the connection flags: tls and the bearer token (a file or the environment)."""
    from lookalike.errors import InvalidArgument
    from lookalike.security import read_token

    try:
        return {"tls": _tls(args), "token": read_token(args.token_file)}
    except InvalidArgument as err:
        raise _ConnError(str(err)) from None


def _client(args, conn: dict | None = None):
    from lookalike.errors import InvalidArgument
    from router.client import Client

    try:  # the channel reads the TLS files, and refuses a token in plaintext beyond loopback
        return Client(args.target, **(conn if conn is not None else _conn(args)))
    except (InvalidArgument, ValueError) as err:
        raise _ConnError(str(err)) from None


def _rpc_errors(func):
    """Prints a gRPC error as one line and exits 1, instead of a traceback."""

    def wrapper(args):
        import grpc

        try:
            return func(args)
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            if err.code() == grpc.StatusCode.UNAVAILABLE and hasattr(args, "tls_ca") and _tls(args) is None:
                print("hint: if the router serves TLS, give --tls-ca (or LOOKALIKE_TLS_CA)", file=sys.stderr)
            return 1
        except _ConnError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return wrapper


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
    from lookalike.controller import stored_shards

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
    from lookalike.ray_cluster import RayEncoderPool, join_ray, start_cluster, start_jobs
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
    log.info("starting %d shard(s) on storage %s", args.shards, os.path.abspath(data_dir))
    try:
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
          f"{len(control.shards())} shards, storage {os.path.abspath(data_dir)}); Ctrl-C stops", flush=True)
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
        from lookalike.ray_cluster import stop_cluster, stop_jobs

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
    return 0


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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def cmd_token(args) -> int:
    from lookalike.errors import InvalidArgument
    from lookalike.security import SCOPES, new_token, parse_tokens, token_hash

    path = pathlib.Path(args.tokens)
    try:
        text = path.read_text() if path.exists() else '{"tokens": []}'
        parse_tokens(text, f"tokens file {str(path)!r}")  # checks every entry
    except (OSError, InvalidArgument) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    entries = json.loads(text)["tokens"]
    if args.action == "list":
        for e in entries:
            extra = f"\trate={e['rate']}/s" if e.get("rate") else ""
            print(f"{e['name']}\t{','.join(e['scopes'])}{extra}")
        return 0
    if args.action == "revoke":
        kept = [e for e in entries if e["name"] != args.name]
        if len(kept) == len(entries):
            print(f"error: no token named {args.name!r} in {path}", file=sys.stderr)
            return 1
        _write_private(path, json.dumps({"tokens": kept}, indent=1) + "\n")
        print(f"revoked {args.name} (a router re-reads {path} within seconds)")
        return 0
    scopes = sorted({s.strip() for s in args.scopes.split(",") if s.strip()})
    if not scopes or any(s not in SCOPES for s in scopes):
        print(f"error: --scopes takes {', '.join(SCOPES)}, got {args.scopes!r}", file=sys.stderr)
        return 2
    if any(e["name"] == args.name for e in entries):
        print(f"error: a token named {args.name!r} exists; revoke it first", file=sys.stderr)
        return 1
    token = new_token()
    entry = {"name": args.name, "scopes": scopes, "sha256": token_hash(token).removeprefix("sha256:")}
    if args.rate:
        entry["rate"] = args.rate
    if args.burst:
        entry["burst"] = args.burst
    _write_private(path, json.dumps({"tokens": [*entries, entry]}, indent=1) + "\n")
    if args.out:
        _write_private(pathlib.Path(args.out), token + "\n")
        print(f"token {args.name} ({','.join(scopes)}) written to {args.out}; its hash added to {path}")
    else:
        print(token)
    return 0


# --- collections ------------------------------------------------------------------------------------------------
@_rpc_errors
def cmd_collection(args) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as c:
        if args.action == "create":
            info = c.create_collection(args.name, args.dim, args.metric, args.index, args.buckets, args.replication,
                                       encoder=args.encoder, gpu_float16=args.gpu_float16)
            print(json.dumps(MessageToDict(info.spec)))
        elif args.action == "list":
            for info in c.list_collections():
                s = info.spec
                print(f"{s.name}\tdim={s.dim}\tmetric={_metric_name(s.metric)}\tindex={s.index}\tbuckets={s.buckets}")
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
def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


@_rpc_errors
def cmd_upsert(args) -> int:
    from tqdm import tqdm

    xb = np.load(args.vectors, mmap_mode="r")
    if xb.ndim != 2:
        print(f"error: {args.vectors} holds an array of shape {xb.shape}; expected (n, d)", file=sys.stderr)
        return 2
    n = len(xb)
    ids = _read_lines(args.ids) if args.ids else [str(i) for i in range(n)]
    if len(ids) != n:
        print(f"error: {len(ids)} ids for {n} vectors", file=sys.stderr)
        return 2
    payloads = [json.loads(line) for line in _read_lines(args.payload)] if args.payload else None
    if payloads is not None and len(payloads) != n:
        print(f"error: {len(payloads)} payload lines for {n} vectors", file=sys.stderr)
        return 2
    bar = tqdm(total=n, unit="vec", desc=f"upsert {args.name}", disable=args.quiet)

    def batches():
        for i in range(0, n, args.batch):
            j = min(n, i + args.batch)
            x = np.ascontiguousarray(xb[i:j])
            x = x if x.dtype == np.uint8 else x.astype(np.float32)
            yield ids[i:j], x, (payloads[i:j] if payloads else None)
            bar.update(j - i)

    with _client(args) as c:
        count = c.upsert_stream(args.name, batches())
    bar.close()
    print(f"upserted {count} vectors into {args.name}")
    return 0


@_rpc_errors
def cmd_delete(args) -> int:
    ids = args.ids if args.ids else []
    if args.ids_file:
        ids += _read_lines(args.ids_file)
    with _client(args) as c:
        removed, missing = c.delete(args.name, ids)
    print(f"deleted {removed}, {missing} not found")
    return 0


@_rpc_errors
def cmd_search(args) -> int:
    if (args.queries is None) == (not args.image):
        print("error: give either QUERIES.npy or --image FILE", file=sys.stderr)
        return 2
    include_payloads = args.payloads or bool(args.sheet)  # the sheet finds neighbour images by payload uri
    with _client(args) as c:
        if args.image:
            images = [pathlib.Path(path).read_bytes() for path in args.image]
            res = c.search_by_image(args.name, images, k=args.k, nprobe=args.nprobe, include_payloads=include_payloads,
                                    min_coverage=args.min_coverage)
        else:
            images = None
            xq = np.load(args.queries)
            xq = xq[None, :] if xq.ndim == 1 else xq
            xq = xq if xq.dtype == np.uint8 else xq.astype(np.float32)
            res = c.search(args.name, xq, k=args.k, nprobe=args.nprobe, include_payloads=include_payloads,
                           min_coverage=args.min_coverage)
    if args.sheet:
        from lookalike.sheet import contact_sheet, read_uri

        rows = [[(uid, float(res.D[q, j]), read_uri(res.payloads[q][j].get("uri"))) for j, uid in enumerate(ids)]
                for q, ids in enumerate(res.ids)]
        with open(args.sheet, "wb") as f:
            f.write(contact_sheet(images or [None] * len(rows), rows))
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


@_rpc_errors
def cmd_get(args) -> int:
    with _client(args) as c:
        ids, vectors, payloads = c.get(args.name, args.ids, include_vectors=args.vectors)
    for i, uid in enumerate(ids):
        row = {"id": uid, "payload": payloads[i]}
        if vectors is not None:
            row["vector"] = vectors[i].tolist()
        print(json.dumps(row))
    return 0


@_rpc_errors
def cmd_ingest(args) -> int:
    from lookalike.ingest import ingest

    if not os.path.isdir(args.dir):
        print(f"error: {args.dir} is not a folder", file=sys.stderr)
        return 2
    with _client(args) as c:
        report = ingest(c, args.name, args.dir, batch=args.batch, uri_prefix=args.uri_prefix,
                        progress=not args.quiet)
    print(report.summary())
    if args.report:
        import dataclasses

        pathlib.Path(args.report).write_text(json.dumps(dataclasses.asdict(report), indent=1))
    return 0


def cmd_train_encoder(args) -> int:
    from encoder.train import load_folder, train_encoder

    images = load_folder(args.dir)
    print(f"training a {args.method} encoder on {len(images)} images from {args.dir}", file=sys.stderr)
    try:
        losses = train_encoder(images, args.out, method=args.method, epochs=args.epochs, batch_size=args.batch,
                               dim=args.dim, seed=args.seed, progress=not args.quiet)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"saved {args.out} (loss {losses[0]:.4f} -> {losses[-1]:.4f}); use it with "
          f"`lookalike collection create NAME --encoder torchscript:{os.path.abspath(args.out)}`")
    return 0


@_rpc_errors
def cmd_status(args) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as c:
        st = c.status()
    if args.json:
        print(json.dumps(MessageToDict(st, always_print_fields_with_no_presence=True)))
        return 0
    print(f"epoch {st.epoch}, {len(st.shards)} shard(s), {len(st.collections)} collection(s)")
    print(f"{'shard':<10} {'serving':<8} {'address':<22} {'buckets':>8} {'joining':>8} {'vectors':>10} "
          f"{'index MiB':>10} {'RSS MiB':>8} {'cap MiB':>8}")
    for s in st.shards:
        cap = f"{s.capacity_bytes / 2**20:.0f}" if s.capacity_bytes else "-"
        print(f"{s.shard_id:<10} {str(s.serving):<8} {s.address:<22} {s.buckets:>8} {s.joining:>8} {s.vectors:>10} "
              f"{s.index_bytes / 2**20:>10.1f} {s.memory_bytes / 2**20:>8.1f} {cap:>8}")
        for d in s.damaged:  # storage files kept aside (docs/ARCHITECTURE.md, Storage)
            print(f"  DAMAGED {d}")
        if s.problem:  # e.g. Ray cannot place it: the moves onto it wait
            print(f"  {s.shard_id} {s.problem}")
    for info in st.collections:
        print(f"collection {info.spec.name}: dim {info.spec.dim}, {_metric_name(info.spec.metric)}, {info.spec.index}, "
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
    left = len(st.moves)
    return (f"bucket moves: {st.moves_done} move(s) done, {st.moves_failed} failed and retried, "
            f"{left} bucket(s) still to move")


@_rpc_errors
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


@_rpc_errors
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
            for st in _follow_moves(c, args.timeout, args.add_shards > 0):
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


def _follow_moves(c, timeout: float, shards_added: bool):
    """Yields the cluster status about twice a second, with a progress bar, until no bucket is left to move (and,
    with ``shards_added``, every shard serves), a shard cannot start, or ``timeout`` seconds have passed."""
    import time

    from tqdm import tqdm

    deadline = time.monotonic() + timeout
    st = c.status()
    total = len(st.moves)
    with tqdm(total=total, unit="bucket", desc="moving", disable=None) as bar:
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


@_rpc_errors
def cmd_dedup(args) -> int:
    from lookalike.catalog_report import groups_sheet, write_groups
    from protos import lookalike_pb2

    with _client(args) as c:
        job = c.start_dedup(args.name, args.threshold, k=args.k, nprobe=args.nprobe, batch=args.batch,
                            job_id=args.job or "")
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


@_rpc_errors
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


@_rpc_errors
def cmd_job(args) -> int:
    from protos import lookalike_pb2

    with _client(args) as c:
        if args.action == "list":
            jobs = c.list_jobs()
        elif args.action == "cancel":
            jobs = [c.cancel_job(args.id)]
        else:
            jobs = [c.get_job(args.id)]
    for j in jobs:
        print(f"{j.id:<40} {j.kind:<8} {j.collection:<16} {lookalike_pb2.Job.State.Name(j.state):<10} "
              f"{j.done:>10}/{j.total:<10} {j.elapsed_s:>8.1f}s {j.message or j.summary_json}")
    return 0


@_rpc_errors
def cmd_map(args) -> int:
    from lookalike.catalog import cluster_space
    from lookalike.catalog_report import draw_map, project
    from lookalike.sheet import read_uri

    with _client(args) as c:
        coll = c.describe_collection(args.name).spec
        ids, x, payloads = c.sample(args.name, args.sample, seed=args.seed)
    if not ids:
        print(f"error: collection {args.name} is empty", file=sys.stderr)
        return 1
    metric = _metric_name(coll.metric)
    coords, method = project(cluster_space(x, metric), args.method, seed=args.seed)
    labels = [p.get(args.field) for p in payloads]
    thumbs = [read_uri(p.get("uri")) for p in payloads] if args.thumbnails else None
    draw_map(coords, labels, args.out, args.width, args.height, thumbs=thumbs,
             title=f"{args.name}: {len(ids)} items, {method.upper()}"
                   + (f", coloured by {args.field}" if any(v is not None for v in labels) else ""))
    print(f"map of {len(ids)} items ({method}): {args.out}")
    return 0


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
@_rpc_errors
def cmd_loadtest(args) -> int:
    from lookalike import loadtest
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
        print(f"error: {err}", file=sys.stderr)
        return 2
    with _client(args, conn) as client:
        spec = client.describe_collection(args.name).spec
    metric = _METRIC_FROM_PROTO.get(spec.metric, "l2")
    queries = np.load(args.queries) if args.queries else None
    data = np.load(args.data, mmap_mode="r") if args.data else None
    data_ids = None
    if args.ids:
        with open(args.ids) as f:
            data_ids = [line.rstrip("\n") for line in f]
    for what, x in (("queries", queries), ("data", data)):
        if x is not None and (x.ndim != 2 or x.shape[1] != (spec.dim // 8 if metric == "hamming" else spec.dim)):
            print(f"error: --{what} has shape {x.shape}; collection {args.name!r} holds "
                  f"{'codes of ' + str(spec.dim) + ' bits' if metric == 'hamming' else str(spec.dim) + '-d vectors'}",
                  file=sys.stderr)
            return 2
    if data is not None:
        data = np.ascontiguousarray(data)
    try:
        queries, mean, std = loadtest.prepare(
            cfg, queries, data, n_queries=args.query_count, noise=args.noise,
            fetch=lambda n: loadtest.fetch_stored(args.target, args.name, n, args.seed, conn))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report, rec = loadtest.run(cfg, queries, mean, std, data, data_ids, metric, show_progress=not args.quiet)
    print(loadtest.format_report(report))
    if args.out:
        loadtest.save(report, args.out)
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
    from lookalike import sizing

    try:
        p = sizing.plan(args.vectors, args.dim, args.index, args.metric, args.replicas, parse_bytes(args.node_memory),
                        args.shards_per_node, args.headroom, parse_bytes(args.reserve), args.id_bytes,
                        args.payload_bytes, parse_bytes(args.gpu_memory) if args.gpu_memory else 0, args.gpu_float16)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(sizing.report(p, args.dim, args.index))
    if args.kustomize:
        try:
            files = sizing.write_kustomize(p, args.kustomize, args.overlay)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"overlay: {', '.join(files)} (kubectl apply -k {args.kustomize})")
    return 0


# --- parser -----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lookalike", description="Sharded similarity search for image catalogs.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", required=True)

    def tls_flags(sp, server: bool):
        who = "the router's (and the shards')" if server else "this client's, for mutual TLS"
        sp.add_argument("--tls-cert", default="", help=f"PEM certificate chain: {who} (env LOOKALIKE_TLS_CERT)")
        sp.add_argument("--tls-key", default="", help="PEM private key of --tls-cert (env LOOKALIKE_TLS_KEY)")
        sp.add_argument("--tls-ca", default="", help="PEM CA bundle that signs the other end's certificate "
                        + ("(clients' with --tls-client-auth; the shards' and routers' inside the cluster)" if server
                           else "(the router's; default: the system's roots)") + " (env LOOKALIKE_TLS_CA)")
        sp.add_argument("--tls-server-name", default="",
                        help="check the peer's certificate for this name instead of its address"
                        + (" (inside the cluster: the name on the shards' certificate)" if server else "")
                        + " (env LOOKALIKE_TLS_SERVER_NAME)")

    def with_target(sp):
        sp.add_argument("--target", default=DEFAULT_TARGET, help=f"router host:port (default {DEFAULT_TARGET})")
        tls_flags(sp, server=False)
        sp.add_argument("--token-file", default=None,
                        help="file holding the bearer token (env LOOKALIKE_TOKEN_FILE, or the token itself in "
                             "LOOKALIKE_TOKEN)")
        return sp

    s = sub.add_parser("serve", help="start controller, shards and router (embedded local Ray by default)")
    s.add_argument("--data", default="./lookalike-data",
                   help="storage URI: a directory or file://DIR, the same on every node (default ./lookalike-data)")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--host", default=None, help="address the router binds (default: all interfaces with TLS or "
                   "--insecure, else 127.0.0.1)")
    tls_flags(s, server=True)
    s.add_argument("--tls-client-auth", action="store_true",
                   help="mutual TLS for clients too: they need a certificate --tls-ca signed (env "
                        "LOOKALIKE_TLS_CLIENT_AUTH=1)")
    s.add_argument("--insecure", action="store_true",
                   help="serve plaintext beyond loopback (no TLS on any hop): only inside a network you trust")
    s.add_argument("--tokens", default=None,
                   help="JSON file of accepted bearer tokens and their scopes (env LOOKALIKE_TOKENS_FILE; see "
                        "`lookalike token create`); without it the API needs no token")
    s.add_argument("--rate-limit", type=float, default=0.0,
                   help="requests per second per token (or for all callers, without tokens) unless a token sets "
                        "its own; 0: no limit (default)")
    s.add_argument("--rate-burst", type=int, default=0, help="requests at once above --rate-limit (default: 1 s)")
    s.add_argument("--health-port", type=int, default=0,
                   help="also serve grpc.health.v1 alone, in plaintext, on this port: for probes that cannot speak "
                        "TLS, e.g. Kubernetes' (default 0: none)")
    s.add_argument("--shards", type=int, default=2, help="shards to start on new storage (default 2)")
    s.add_argument("--shard-cpus", type=float, default=1.0, help="Ray CPUs per shard actor (default 1)")
    s.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    s.add_argument("--cluster", default="lookalike", help="cluster name (actor names; default lookalike)")
    s.add_argument("--grace", type=float, default=5.0, help="seconds to drain calls on shutdown")
    s.add_argument("--shard-memory", default="0",
                   help="memory each shard may fill, e.g. 8Gi (its capacity; writes past it get RESOURCE_EXHAUSTED; "
                        "default: no limit)")
    s.add_argument("--shard-gpus", default="auto",
                   help="GPUs per shard actor: auto (one each, or a share, when the Ray cluster has GPUs; else none), "
                        "0 for CPU shards, or a number")
    s.add_argument("--max-shards", type=int, default=64, help="automatic growth stops here (default 64)")
    s.add_argument("--copy-mb-s", type=float, default=0.0,
                   help="rate limit of a bucket move's copy in MB/s (default 0: none); lower it to leave more CPU to "
                        "searches while the cluster grows")
    s.add_argument("--autoscale", type=float, default=30.0,
                   help="seconds between checks of shard memory against 80%% of --shard-memory; past it a shard is "
                        "added and buckets rebalanced (0: off; needs --shard-memory)")
    s.add_argument("--encoders", type=int, default=0,
                   help="encoder actors on Ray (a GPU each when the cluster has them); 0: encode in the router")
    s.add_argument("--batch-inflight", type=int, default=1,
                   help="batches of one kind of search running at once; searches arriving meanwhile gather into the "
                        "next batch (default 1; a lone search never waits)")
    s.add_argument("--batch-wait-us", type=float, default=300.0,
                   help="with --batch-inflight > 1: how long a batch gathers while another runs, in microseconds "
                        "(default 300); -1: no batching")
    s.add_argument("--router-threads", type=int, default=64,
                   help="threads serving the router's calls other than searches (default 64)")
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("token", help="bearer tokens of a router's tokens file: create, list, revoke")
    tsub = t.add_subparsers(dest="action", required=True)
    tc = tsub.add_parser("create", help="a new random token: its SHA-256 goes into the tokens file, the token to "
                         "--out (or stdout)")
    tc.add_argument("name", help="who holds it (shown in logs and errors, never the token)")
    tc.add_argument("--scopes", required=True, help="comma-separated: read (search, get, status), write (upsert, "
                    "delete), admin (collections, rebalance, jobs; grants every scope)")
    tc.add_argument("--rate", type=float, default=0.0, help="requests per second for this token (0: the server's)")
    tc.add_argument("--burst", type=int, default=0, help="requests at once above --rate (0: the server's)")
    tc.add_argument("--out", default=None, help="write the token to this file (mode 600) instead of stdout")
    for action in ("list", "revoke"):
        tp = tsub.add_parser(action)
        if action == "revoke":
            tp.add_argument("name")
    for tp in tsub.choices.values():
        tp.add_argument("--tokens", default=os.environ.get("LOOKALIKE_TOKENS_FILE", "lookalike-tokens.json"),
                        help="the tokens file (env LOOKALIKE_TOKENS_FILE; default lookalike-tokens.json)")
    t.set_defaults(func=cmd_token)

    c = sub.add_parser("collection", help="create, list, describe, drop collections")
    csub = c.add_subparsers(dest="action", required=True)
    cc = with_target(csub.add_parser("create"))
    cc.add_argument("name")
    cc.add_argument("--dim", type=int, default=0, help="components per vector (bits for hamming); with --encoder, "
                    "the encoder's")
    cc.add_argument("--metric", choices=["l2", "ip", "cosine", "hamming"], default="",
                    help="default l2, or the encoder's")
    cc.add_argument("--encoder", default="", help="encoder for images: phash, phash:16")
    cc.add_argument("--index", default="Flat", help="FAISS factory string (default Flat)")
    cc.add_argument("--buckets", type=int, default=0, help="buckets (default 1024)")
    cc.add_argument("--replication", type=int, default=0, help="copies of each bucket (default 1)")
    cc.add_argument("--gpu-float16", action="store_true",
                    help="on GPU shards: float16 vectors (Flat) or lookup tables (IVF-PQ)")
    with_target(csub.add_parser("list"))
    for action in ("describe", "drop"):
        with_target(csub.add_parser(action)).add_argument("name")
    c.set_defaults(func=cmd_collection)

    u = with_target(sub.add_parser("upsert", help="bulk-load vectors from a .npy file"))
    u.add_argument("name")
    u.add_argument("vectors", help=".npy of shape (n, d) float32 (or uint8 codes)")
    u.add_argument("--ids", help="text file, one id per line (default: row numbers)")
    u.add_argument("--payload", help="JSONL file, one object of strings per line")
    u.add_argument("--batch", type=int, default=5000)
    u.add_argument("--quiet", action="store_true", help="no progress bar")
    u.set_defaults(func=cmd_upsert)

    d = with_target(sub.add_parser("delete", help="delete items by id"))
    d.add_argument("name")
    d.add_argument("ids", nargs="*")
    d.add_argument("--ids-file")
    d.set_defaults(func=cmd_delete)

    g = with_target(sub.add_parser("get", help="fetch items by id (JSON lines)"))
    g.add_argument("name")
    g.add_argument("ids", nargs="+")
    g.add_argument("--vectors", action="store_true", help="include vectors")
    g.set_defaults(func=cmd_get)

    q = with_target(sub.add_parser("search", help="k-NN search for the queries in a .npy file"))
    q.add_argument("name")
    q.add_argument("queries", nargs="?", help=".npy of shape (nq, d) or (d,)")
    q.add_argument("--image", action="append", metavar="FILE",
                   help="query image (repeatable); the collection's encoder turns it into a vector")
    q.add_argument("--sheet", metavar="OUT.png", help="write a contact sheet of the queries and their neighbours")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--nprobe", type=int, default=0)
    q.add_argument("--min-coverage", type=float, default=None)
    q.add_argument("--payloads", action="store_true")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_search)

    i = with_target(sub.add_parser("ingest", help="encode and store every image under a folder (resumable)"))
    i.add_argument("name", help="a collection with an encoder")
    i.add_argument("dir")
    i.add_argument("--batch", type=int, default=64, help="images per request (default 64)")
    i.add_argument("--uri-prefix", help="payload uri = PREFIX + relative path (default: the file's absolute path)")
    i.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    i.set_defaults(func=cmd_ingest)

    t = sub.add_parser("train-encoder", help="train a small CNN encoder on a folder of images (CPU, minutes)")
    t.add_argument("dir")
    t.add_argument("--out", required=True, help="TorchScript file to write (plus OUT.json)")
    t.add_argument("--method", choices=["triplet", "autoencoder"], default="triplet")
    t.add_argument("--epochs", type=int, default=None,
                   help="passes over the images (default 30, more for small folders: at least 400 steps)")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--dim", type=int, default=128, help="embedding size (default 128)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train_encoder)

    dd = with_target(sub.add_parser("dedup", help="near-duplicate groups over a whole collection (a cluster job)"))
    dd.add_argument("name")
    dd.add_argument("--threshold", type=float, required=True,
                    help="l2: squared distance at most T; hamming: bits at most T; ip/cosine: similarity at least T")
    dd.add_argument("-k", "--k", type=int, default=10, help="neighbours looked at per item (default 10)")
    dd.add_argument("--nprobe", type=int, default=0)
    dd.add_argument("--batch", type=int, default=0, help="items per search batch (default 4096)")
    dd.add_argument("--out", help="write OUT.csv, OUT.jsonl and OUT.png (default dedup-NAME)")
    dd.add_argument("--sheet", help="contact sheet PNG path (default OUT.png; 'none': no sheet)")
    dd.add_argument("--sheet-groups", type=int, default=12, help="largest groups on the sheet (default 12)")
    dd.add_argument("--show", type=int, default=10, help="groups to print (default 10)")
    dd.add_argument("--job", help="job id (default: derived from the arguments, so the same command resumes)")
    dd.add_argument("--no-wait", action="store_true", help="start the job and return")
    dd.add_argument("--quiet", action="store_true", help="no progress bar")
    dd.set_defaults(func=cmd_dedup)

    cl = with_target(sub.add_parser("cluster", help="k-means over a collection; each item's cluster in its payload"))
    cl.add_argument("name")
    cl.add_argument("-k", "--k", type=int, required=True, help="number of clusters")
    cl.add_argument("--sample", type=int, default=0, help="training sample (default min(count, 256 k))")
    cl.add_argument("--field", default="", help="payload field (default cluster)")
    cl.add_argument("--niter", type=int, default=0, help="k-means iterations (default 20)")
    cl.add_argument("--seed", type=int, default=0)
    cl.add_argument("--job", help="job id (default: derived from the arguments)")
    cl.add_argument("--no-wait", action="store_true", help="start the job and return")
    cl.add_argument("--json", action="store_true")
    cl.add_argument("--quiet", action="store_true", help="no progress bar")
    cl.set_defaults(func=cmd_cluster)

    jb = with_target(sub.add_parser("job", help="catalog jobs: list, status ID, cancel ID"))
    jb.add_argument("action", choices=["list", "status", "cancel"])
    jb.add_argument("id", nargs="?", default="")
    jb.set_defaults(func=cmd_job)

    mp = with_target(sub.add_parser("map", help="a 2-D map of a sample of the collection as a PNG"))
    mp.add_argument("name")
    mp.add_argument("--out", required=True, help="PNG to write")
    mp.add_argument("--sample", type=int, default=2000, help="items to draw (default 2000, at most 10000)")
    mp.add_argument("--method", choices=["auto", "tsne", "pca"], default="auto",
                    help="auto: t-SNE up to 3000 items, PCA above")
    mp.add_argument("--field", default="cluster", help="payload field to colour by (default cluster)")
    mp.add_argument("--thumbnails", action="store_true", help="draw images (payload uri) at their points")
    mp.add_argument("--width", type=int, default=1200, help="pixels (default 1200)")
    mp.add_argument("--height", type=int, default=900, help="pixels (default 900)")
    mp.add_argument("--seed", type=int, default=0)
    mp.set_defaults(func=cmd_map)

    st = with_target(sub.add_parser("status", help="shards, buckets, vectors, memory, bucket moves"))
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    tr = with_target(sub.add_parser(
        "train", help="train a collection's index again (IVF centroids, PQ/SQ codebooks) on a fresh sample, as a new "
                      "version the shards move into while they serve"))
    tr.add_argument("name", help="collection")
    tr.add_argument("--no-wait", action="store_true", help="return once the training is asked for")
    tr.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds to follow it before giving up with exit status 1 (default 3600)")
    tr.set_defaults(func=cmd_train)

    rb = with_target(sub.add_parser("rebalance", help="add shards and move buckets until the load is even"))
    rb.add_argument("name", nargs="?", default="", help="collection (default: every collection)")
    rb.add_argument("--add-shards", type=int, default=0, help="shards to start first (default 0)")
    rb.add_argument("--no-wait", action="store_true", help="return once the moves are queued")
    rb.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds to follow the moves before giving up with exit status 1 (default 3600); a shard "
                         "that cannot start ends it at once")
    rb.set_defaults(func=cmd_rebalance)

    lt = with_target(sub.add_parser("loadtest", help="load a running cluster; report rate, latency, errors, recall"))
    lt.add_argument("name", help="collection")
    lt.add_argument("--mode", choices=["open", "closed"], default=None,
                    help="open: send at --rate whatever the server does; closed: --concurrency requests in flight "
                         "(default: open when --rate is given)")
    lt.add_argument("--rate", type=float, default=0.0, help="open loop: requests per second, all processes together")
    lt.add_argument("--arrivals", choices=["uniform", "poisson"], default="uniform",
                    help="open loop: evenly spaced or Poisson send times")
    lt.add_argument("--concurrency", type=int, default=8, help="closed loop: requests in flight (default 8)")
    lt.add_argument("--duration", type=float, default=10.0, help="seconds of load (default 10)")
    lt.add_argument("--requests", type=int, default=0, help="stop after this many requests (default: no count)")
    lt.add_argument("--mix", default="search=1",
                    help="shares of search, upsert, delete (default search=1), e.g. search=0.9,upsert=0.08,delete=0.02")
    lt.add_argument("-k", type=int, default=10)
    lt.add_argument("--batch", type=int, default=1, help="queries (or items) per request (default 1)")
    lt.add_argument("--nprobe", type=int, default=0)
    lt.add_argument("--ef-search", type=int, default=0)
    lt.add_argument("--processes", type=int, default=2, help="client processes (default 2)")
    lt.add_argument("--timeout", type=float, default=10.0, help="deadline of each request in seconds (default 10)")
    lt.add_argument("--queries", help=".npy of query vectors")
    lt.add_argument("--data", help=".npy of the vectors loaded: queries are its rows plus noise, and recall@k is "
                                    "measured against exact search over it")
    lt.add_argument("--ids", help="with --data: its ids, one per line (default: row numbers)")
    lt.add_argument("--noise", type=float, default=0.05,
                    help="query noise, times the data's deviation (hamming: bit-flip probability; default 0.05)")
    lt.add_argument("--query-count", type=int, default=10000, help="distinct queries to draw (default 10000)")
    lt.add_argument("--recall-sample", type=int, default=100, help="queries checked against exact (default 100)")
    lt.add_argument("--keep-writes", action="store_true", help="keep the items the test wrote (default: deleted)")
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--out", default="loadtest.json", help="JSON report (default loadtest.json; '' for none)")
    lt.add_argument("--plot", default="loadtest.png", help="PNG of latency over time and its distribution "
                                                         "(default loadtest.png; '' for none)")
    lt.add_argument("--quiet", action="store_true", help="no progress bar")
    lt.set_defaults(func=cmd_loadtest)

    sz = sub.add_parser("size", help="memory per vector, shards, nodes and memory requests for a catalog")
    sz.add_argument("--vectors", type=int, required=True)
    sz.add_argument("--dim", type=int, required=True, help="components (bits for hamming)")
    sz.add_argument("--index", default="Flat", help="FAISS factory string (default Flat)")
    sz.add_argument("--metric", choices=["l2", "ip", "cosine", "hamming"], default="l2")
    sz.add_argument("--replicas", type=int, default=1, help="copies of each item (default 1)")
    sz.add_argument("--node-memory", default="64Gi", help="memory of each shard node (pod) (default 64Gi)")
    sz.add_argument("--shards-per-node", type=int, default=1, help="shards on each node (default 1)")
    sz.add_argument("--reserve", default="2Gi", help="memory of a node kept for Ray itself (default 2Gi)")
    sz.add_argument("--headroom", type=float, default=0.3, help="room left for growth (default 0.3)")
    sz.add_argument("--id-bytes", type=int, default=16, help="mean id length in bytes (default 16)")
    sz.add_argument("--payload-bytes", type=int, default=0, help="mean serialized payload bytes (default 0)")
    sz.add_argument("--gpu-memory", default="", help="memory of each GPU, for GPU shards (e.g. 80Gi)")
    sz.add_argument("--gpu-float16", action="store_true", help="float16 vectors on the GPU (Flat)")
    sz.add_argument("--kustomize", metavar="DIR", help="write a kustomize overlay with these sizes to DIR")
    sz.add_argument("--overlay", choices=["cpu", "gpu"], default="cpu", help="the overlay it builds on")
    sz.set_defaults(func=cmd_size)

    sub.add_parser("bench", add_help=False,
                   help="cluster vs in-process FAISS benchmark; `lookalike bench --help` (docs/BENCHMARKS.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark has its own flags
        from bench.cluster_bench import main as bench_main

        return int(bench_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "serve" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it picked: noise here
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `lookalike search ... | head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())

