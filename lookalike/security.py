"""TLS, bearer tokens with scopes, and per-token request rates: everything a gRPC hop needs to be private and
authenticated. lookalike.net builds every server and channel with these, so they apply in one place.

Hops (docs/SECURITY.md):

- client -> router: TLS (``TLSConfig`` with cert and key; mutual TLS when ``client_auth``), and a bearer token in
  the ``authorization`` metadata, checked by :class:`AuthInterceptor` against a :class:`TokenTable`.
- router -> shard: mutual TLS with the cluster's internal certificate (``LOOKALIKE_INTERNAL_TLS_*``, else the
  public one): a shard accepts calls only from a peer whose certificate its CA signed (no tokens on this hop: the
  shards' service is internal).
- router -> encoders, controller, jobs: Ray's own RPC, under Ray's token auth (on in cluster mode).

Secrets (keys, tokens) come from files or environment variables, never from the command line; they are never
logged (a token is known by its name in logs and errors).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import secrets
import threading
import time

import grpc

from lookalike.errors import InvalidArgument, retry_trailers

log = logging.getLogger(__name__)

ENV_PREFIX = "LOOKALIKE_"
SCOPES = ("read", "write", "admin")
# Methods of lookalike.Lookalike and the scope each needs ("admin" grants every scope). A method not listed
# needs admin: a new method is closed until it is classified here.
METHOD_SCOPES = {
    "ListCollections": "read", "DescribeCollection": "read", "Get": "read", "Search": "read",
    "SearchByImage": "read", "ClusterStatus": "read", "Sample": "read", "GetJob": "read", "ListJobs": "read",
    "DedupGroups": "read",
    "Upsert": "write", "UpsertStream": "write", "Delete": "write", "UpsertImages": "write",
    "CreateCollection": "admin", "DropCollection": "admin", "Rebalance": "admin", "TrainIndex": "admin", "StartJob": "admin",
    "CancelJob": "admin", "Export": "admin",  # Export: the whole catalog, for a backup
}
# Reachable without a token: Kubernetes probes and tools (grpcurl) need them.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
TOKEN_PREFIX = "lk_"
_PUBLIC_PREFIX = "/lookalike.v1.Lookalike/"


# --- TLS --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """Certificate files of one end of a hop (paths, read when a server or channel is built).

    Attributes:
        cert, key: this end's PEM certificate chain and private key (a server's identity; a client's in mutual
            TLS).
        ca: PEM bundle of the CAs that sign the other end (a client: the server's; a server: its clients', when
            ``client_auth``). Empty on a client: the system's roots.
        client_auth: a server requires and verifies client certificates (mutual TLS).
        server_name: a client checks the server's certificate for this name instead of the target's host (shards
            listen on node addresses no certificate names: they share one name, e.g. ``lookalike-internal``).
    """

    cert: str = ""
    key: str = ""
    ca: str = ""
    client_auth: bool = False
    server_name: str = ""

    @classmethod
    def from_env(cls, env=None) -> TLSConfig | None:
        """``LOOKALIKE_TLS_CERT``, ``_KEY``, ``_CA``, ``_CLIENT_AUTH`` (1/true), ``_SERVER_NAME``; None when none is
        set."""
        env = os.environ if env is None else env
        get = lambda k: env.get(f"{ENV_PREFIX}TLS_{k}", "")  # noqa: E731
        if not any(get(k) for k in ("CERT", "KEY", "CA")):
            return None
        return cls(get("CERT"), get("KEY"), get("CA"), get("CLIENT_AUTH").lower() in ("1", "true", "yes"),
                   get("SERVER_NAME"))

    def _read(self, path: str, what: str) -> bytes:
        try:
            data = pathlib.Path(path).read_bytes()
        except OSError as err:
            raise InvalidArgument(f"cannot read the TLS {what} {path!r}: {err.strerror or err}") from None
        if b"-----BEGIN" not in data:
            raise InvalidArgument(f"the TLS {what} {path!r} is not a PEM file")
        return data

    def server_credentials(self) -> grpc.ServerCredentials:
        if not (self.cert and self.key):
            raise InvalidArgument("a TLS server needs a certificate and a key (--tls-cert and --tls-key, or "
                                  "LOOKALIKE_TLS_CERT and LOOKALIKE_TLS_KEY)")
        if self.client_auth and not self.ca:
            raise InvalidArgument("mutual TLS needs the CA that signs client certificates (--tls-ca)")
        pair = (self._read(self.key, "key"), self._read(self.cert, "certificate"))
        roots = self._read(self.ca, "CA bundle") if self.ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=self.client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        roots = self._read(self.ca, "CA bundle") if self.ca else None
        key = self._read(self.key, "key") if self.key else None
        cert = self._read(self.cert, "certificate") if self.cert else None
        if (key is None) != (cert is None):
            raise InvalidArgument("a client certificate needs its key, and a key its certificate")
        return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=cert)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def internal(self, env=None) -> TLSConfig:
        """The config of the cluster's internal hop (router -> shards, mutual TLS).

        The internal certificate of ``LOOKALIKE_INTERNAL_TLS_CERT``, ``_KEY``, ``_CA`` when they are set (its own
        CA: the shards then accept only peers holding it, and the public key stays off the shards' nodes;
        ``LOOKALIKE_INTERNAL_TLS_SERVER_NAME``, else this config's server name, is the name the router checks);
        else this config's own files (one certificate for both hops)."""
        own = internal_tls_from_env(env)
        if own is not None:
            return own if own.server_name else dataclasses.replace(own, server_name=self.server_name)
        if not (self.cert and self.key and self.ca):
            raise InvalidArgument("TLS inside the cluster (router -> shards, mutual) needs a certificate, its key "
                                  "and the CA that signed it (--tls-cert, --tls-key, --tls-ca)")
        return dataclasses.replace(self, client_auth=True)


def internal_tls_from_env(env=None) -> TLSConfig | None:
    """The internal hop's own certificate: ``LOOKALIKE_INTERNAL_TLS_CERT``, ``_KEY``, ``_CA`` (all three) and
    ``_SERVER_NAME`` (optional), as a mutual-TLS config; None when none of the three is set.

    Raises:
        InvalidArgument: some of the three set, not all.
    """
    env = os.environ if env is None else env
    names = [f"{ENV_PREFIX}INTERNAL_TLS_{k}" for k in ("CERT", "KEY", "CA")]
    values = [env.get(n, "") for n in names]
    if not any(values):
        return None
    if not all(values):
        missing = ", ".join(n for n, v in zip(names, values) if not v)
        raise InvalidArgument(f"the internal certificate needs {', '.join(names)}: {missing} is not set")
    return TLSConfig(*values, client_auth=True, server_name=env.get(f"{ENV_PREFIX}INTERNAL_TLS_SERVER_NAME", ""))


# --- tokens -----------------------------------------------------------------------------------------------------
def new_token() -> str:
    """A fresh random bearer token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Token:
    """An entry of the token table: who (``name``, shown in logs and errors), what (``scopes``), how often
    (``rate`` requests per second, ``burst`` at once; 0: the server's default)."""

    name: str
    scopes: frozenset
    rate: float = 0.0
    burst: int = 0

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


def parse_tokens(text: str, source: str = "tokens file") -> dict[str, Token]:
    """The tokens of a tokens file, by digest. The file is JSON::

        {"tokens": [{"name": "search-api", "scopes": ["read"], "sha256": "<hex>", "rate": 200, "burst": 400}]}

    Each entry holds the SHA-256 of its token, not the token (``lookalike token create`` writes both).

    Raises:
        InvalidArgument: not that shape (the message names the entry).
    """
    try:
        doc = json.loads(text)
    except ValueError as err:
        raise InvalidArgument(f"{source} is not JSON: {err}") from None
    entries = doc.get("tokens") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise InvalidArgument(f'{source} must hold {{"tokens": [...]}}')
    out: dict[str, Token] = {}
    for n, e in enumerate(entries):
        where = f"{source}, entry {n}"
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"]:
            raise InvalidArgument(f"{where}: needs a name")
        digest = str(e.get("sha256", "")).lower().removeprefix("sha256:")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise InvalidArgument(f"{where} ({e['name']}): sha256 must be 64 hex digits")
        scopes = e.get("scopes")
        if not isinstance(scopes, list) or not scopes or any(s not in SCOPES for s in scopes):
            raise InvalidArgument(f"{where} ({e['name']}): scopes must be a non-empty list of {', '.join(SCOPES)}")
        rate, burst = e.get("rate", 0), e.get("burst", 0)
        if not isinstance(rate, (int, float)) or rate < 0 or not isinstance(burst, int) or burst < 0:
            raise InvalidArgument(f"{where} ({e['name']}): rate and burst must be numbers >= 0")
        out["sha256:" + digest] = Token(e["name"], frozenset(scopes), float(rate), burst)
    return out


class TokenTable:
    """The tokens a router accepts, from a file re-read when it changes (rotation without a restart)."""

    def __init__(self, path: str, check_every_s: float = 2.0):
        self.path = pathlib.Path(path)
        self._check_every = check_every_s
        self._lock = threading.Lock()
        self._mtime = None
        self._checked = 0.0
        self._tokens = self._load()  # a bad file at start is an error; later, the last good table stays

    def _load(self) -> dict[str, Token]:
        try:
            st = self.path.stat()
            text = self.path.read_text()
        except OSError as err:
            raise InvalidArgument(f"cannot read the tokens file {str(self.path)!r}: {err.strerror or err}") from None
        tokens = parse_tokens(text, f"tokens file {str(self.path)!r}")
        self._mtime = (st.st_mtime_ns, st.st_size)
        return tokens

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self._check_every:
            return
        with self._lock:
            self._checked = now
            try:
                st = self.path.stat()
                if (st.st_mtime_ns, st.st_size) == self._mtime:
                    return
                self._tokens = self._load()
                log.info("tokens file %s reloaded: %d tokens", self.path, len(self._tokens))
            except (OSError, InvalidArgument) as err:
                log.error("tokens file %s not reloaded, the previous tokens stay: %s", self.path, err)

    def lookup(self, token: str) -> Token | None:
        """The entry of a presented token (found by its hash: the table holds no token), or None."""
        self._maybe_reload()
        return self._tokens.get(token_hash(token))


class RateLimiter:
    """Token buckets per caller: ``rate`` requests per second, up to ``burst`` at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._buckets: dict[str, list[float]] = {}  # name -> [level, last time]

    def take(self, name: str, rate: float, burst: int) -> float:
        """0 when a request may go now, else the seconds until one may."""
        if rate <= 0:
            return 0.0
        cap = float(max(burst, 1))
        now = time.monotonic()
        with self._lock:
            level, last = self._buckets.get(name, (cap, now))
            level = min(cap, level + (now - last) * rate)
            if level >= 1.0:
                self._buckets[name] = [level - 1.0, now]
                return 0.0
            self._buckets[name] = [level, now]
            return (1.0 - level) / rate


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call of the public server: the bearer token (UNAUTHENTICATED without a valid one), its scope
    for the method (PERMISSION_DENIED), its request rate (RESOURCE_EXHAUSTED with a retry hint). Health and
    reflection pass without a token.

    Args:
        tokens: the token table; None: no authentication (only the rate limit, if set, for all callers together).
        rate, burst: the default request rate of a token without its own (0: unlimited).
    """

    def __init__(self, tokens: TokenTable | None, rate: float = 0.0, burst: int = 0):
        self.tokens = tokens
        self.rate = rate
        self.burst = burst
        self.limiter = RateLimiter()

    def check(self, method: str, metadata) -> tuple[grpc.StatusCode, str, tuple] | None:
        """None when the call may go on, else (status, message, trailing metadata)."""
        if method.startswith(OPEN_SERVICES):
            return None
        name, rate, burst = "", self.rate, self.burst
        if self.tokens is not None:
            header = next((v for k, v in metadata or () if k == "authorization"), None)
            if header is None:
                return (grpc.StatusCode.UNAUTHENTICATED, "this server needs a bearer token: send the metadata "
                        "'authorization: Bearer <token>' (the CLI reads it from --token-file or LOOKALIKE_TOKEN)", ())
            scheme, _, value = str(header).partition(" ")
            token = self.tokens.lookup(value.strip()) if scheme.lower() == "bearer" else None
            if token is None:
                return grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid (unknown or revoked)", ()
            short = method.rsplit("/", 1)[-1]
            need = METHOD_SCOPES.get(short, "admin") if method.startswith(_PUBLIC_PREFIX) else "admin"
            if not token.allows(need):
                return (grpc.StatusCode.PERMISSION_DENIED, f"token {token.name!r} (scopes "
                        f"{', '.join(sorted(token.scopes))}) may not call {short}: it needs the {need!r} scope", ())
            name, rate, burst = token.name, token.rate or self.rate, token.burst or self.burst
        if rate > 0:
            wait = self.limiter.take(name, rate, burst or max(1, int(rate)))
            if wait > 0:
                who = f"token {name!r}" if name else "this server"
                msg = f"request rate over {rate:g}/s for {who}; retry in {wait:.3f} s"
                return grpc.StatusCode.RESOURCE_EXHAUSTED, msg, retry_trailers(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, msg, wait)
        return None

    async def intercept_service(self, continuation, handler_call_details):
        refusal = self.check(handler_call_details.method, handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if refusal is None or handler is None:
            return handler
        return _refusing(handler, *refusal)


def _refusing(handler, code, message, trailers):
    """A handler of the same shape as ``handler`` that ends the call with ``code``."""

    async def unary(request, context):
        await context.abort(code, message, trailing_metadata=trailers)

    async def stream(request, context):
        await context.abort(code, message, trailing_metadata=trailers)
        yield  # pragma: no cover (an async generator: abort raises)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


# --- the client side --------------------------------------------------------------------------------------------
def read_token(path: str | None = None, env=None) -> str | None:
    """A client's bearer token: the file ``path`` (or ``LOOKALIKE_TOKEN_FILE``), else ``LOOKALIKE_TOKEN``; None
    when none is given."""
    env = os.environ if env is None else env
    path = path or env.get(f"{ENV_PREFIX}TOKEN_FILE")
    if path:
        try:
            token = pathlib.Path(path).read_text().strip()
        except OSError as err:
            raise InvalidArgument(f"cannot read the token file {path!r}: {err.strerror or err}") from None
        if not token:
            raise InvalidArgument(f"the token file {path!r} is empty")
        return token
    return env.get(f"{ENV_PREFIX}TOKEN") or None


class TokenMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the bearer token to every call's metadata (TLS channels, and plaintext ones to loopback only)."""

    def __init__(self, token: str):
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, d):
        return d._replace(metadata=[*(d.metadata or ()), self._md])

    def intercept_unary_unary(self, cont, d, request):
        return cont(self._details(d), request)

    def intercept_unary_stream(self, cont, d, request):
        return cont(self._details(d), request)

    def intercept_stream_unary(self, cont, d, it):
        return cont(self._details(d), it)

    def intercept_stream_stream(self, cont, d, it):
        return cont(self._details(d), it)


class AioTokenMetadata(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor,
                        grpc.aio.StreamUnaryClientInterceptor, grpc.aio.StreamStreamClientInterceptor):
    """:class:`TokenMetadata` for asyncio channels."""

    def __init__(self, token: str):
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, d):
        md = grpc.aio.Metadata(*(d.metadata or ()), self._md)
        return d._replace(metadata=md)

    async def intercept_unary_unary(self, cont, d, request):
        return await cont(self._details(d), request)

    async def intercept_unary_stream(self, cont, d, request):
        return await cont(self._details(d), request)

    async def intercept_stream_unary(self, cont, d, it):
        return await cont(self._details(d), it)

    async def intercept_stream_stream(self, cont, d, it):
        return await cont(self._details(d), it)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")
