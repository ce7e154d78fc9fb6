"""Who may call what: bearer tokens with scopes, checked by a server interceptor.

Scopes nest: ``admin`` ⊇ ``edit`` ⊇ ``infer``.

- ``infer``: generate, score, OIP inference and metadata, reading the ledger;
- ``edit``: submit edits and traces, read and cancel jobs;
- ``admin``: rollback, revert, adding and removing protected facts (and ``factpatch ledger
  import`` on the command line).

Tokens travel as gRPC metadata ``authorization: Bearer <token>``.  The server keeps only their
sha256 (from ``FACTPATCH_TOKENS_FILE``: a JSON list of ``{"name", "sha256", "scopes"}``; from
``FACTPATCH_ADMIN_TOKEN``, hashed on start; and, for ``factpatch up``, an admin token generated on
first start into the data directory with owner-only permissions).  A presented token is hashed
and compared with every stored hash with ``hmac.compare_digest`` (constant time, and all entries
are compared so the time does not say which matched).  The token's name is the actor recorded
in the ledger.  Health checks need no token (probes); an unknown method needs ``admin``.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

SCOPES = ("infer", "edit", "admin")
IMPLIED = {"admin": {"admin", "edit", "infer"}, "edit": {"edit", "infer"}, "infer": {"infer"}}

_INFER = "infer"
_EDIT = "edit"
_ADMIN = "admin"
#: Fully qualified method → the scope it needs (None: open).  Anything else needs admin.
METHOD_SCOPES: dict[str, str | None] = {
    **{
        f"/factpatch.v1.EditService/{m}": _EDIT
        for m in ("SubmitEdits", "GetJob", "WatchJob", "CancelJob", "ListJobs")
    },
    "/factpatch.v1.TraceService/SubmitTrace": _EDIT,
    **{
        f"/factpatch.v1.LedgerService/{m}": _INFER
        for m in (
            "GetHead",
            "ListVersions",
            "GetVersion",
            "WatchHead",
            "GetServed",
            "ListReplicas",
            "GetEdit",
            "ListProtected",
        )
    },
    **{
        f"/factpatch.v1.LedgerService/{m}": _ADMIN
        for m in ("Rollback", "RevertEdit", "AddProtected", "RemoveProtected")
    },
    "/factpatch.v1.GenerateService/Generate": _INFER,
    "/factpatch.v1.GenerateService/Score": _INFER,
    **{
        f"/inference.GRPCInferenceService/{m}": _INFER
        for m in (
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelInfer",
        )
    },
    **{
        f"/factpatch.v1.TokenService/{m}": _ADMIN for m in ("AddToken", "RevokeToken", "ListTokens")
    },
    "/grpc.health.v1.Health/Check": None,
    "/grpc.health.v1.Health/Watch": None,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _INFER,
}

#: The caller of the RPC being served (set by the interceptor; "anonymous" without auth).
current_actor: contextvars.ContextVar[str] = contextvars.ContextVar("actor", default="anonymous")


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Token:
    name: str
    sha256: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return any(scope in IMPLIED[s] for s in self.scopes)


class TokenStore:
    """The bootstrap tokens (file, environment, data dir) and, once :meth:`attach` is called,
    the tokens issued while the service runs (:class:`IssuedTokens`)."""

    def __init__(self, tokens: list[Token]) -> None:
        for t in tokens:
            bad = set(t.scopes) - set(SCOPES)
            if bad:
                raise ValueError(f"tokens: {t.name!r} has unknown scopes {sorted(bad)}")
        self.tokens = tokens
        self.issued: IssuedTokens | None = None

    def attach(self, issued: IssuedTokens) -> None:
        self.issued = issued

    def authenticate(self, presented: str) -> Token | None:
        digest = token_sha256(presented)
        found = None
        issued = self.issued.current if self.issued is not None else []
        for t in [*self.tokens, *issued]:  # compare with every entry: no early exit
            if hmac.compare_digest(digest, t.sha256):
                found = t
        return found


class UnknownTokenError(KeyError):
    pass


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class IssuedTokens:
    """Tokens added and revoked while the service runs, kept hashed in Redis beside the ledger.

    Every server reads them with :meth:`refresh` (its health loop calls it every 0.2 s: one GET
    of the revision counter, the hash re-read only when it moved), so a token added through one
    server works on every server, and a revoked one is refused, within a second.  Each change is
    appended to the ledger's audit stream.  Redis layout (same hash tag as the ledger)::

        factpatch:{NAME}:tokens       hash    name -> {name, sha256, scopes, actor, created}
        factpatch:{NAME}:tokens:rev   string  bumped by every change
    """

    def __init__(self, client: Any, ledger_name: str) -> None:
        self.redis = client
        prefix = f"factpatch:{{{ledger_name}}}"
        self.k_tokens, self.k_rev = f"{prefix}:tokens", f"{prefix}:tokens:rev"
        self.k_audit = f"{prefix}:audit"
        self.current: list[Token] = []
        self._rev: bytes | None = None

    def add(self, name: str, scopes: list[str], actor: str) -> str:
        """Issue a new token; returns it (the only time it exists in clear)."""
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError("name: 1–64 letters, digits or . _ @ -, first a letter or digit")
        if not scopes or set(scopes) - set(SCOPES):
            raise ValueError(f"scopes: one or more of {SCOPES}, got {list(scopes)}")
        token = secrets.token_urlsafe(32)
        entry = {
            "name": name,
            "sha256": token_sha256(token),
            "scopes": sorted(set(scopes)),
            "actor": actor,
            "created": time.time(),
        }
        if not self.redis.hsetnx(self.k_tokens, name, json.dumps(entry)):
            raise FileExistsError(f"name: a token named {name!r} exists; revoke it first")
        self._changed("token-add", name, actor)
        return token

    def revoke(self, name: str, actor: str) -> dict[str, Any]:
        text = self.redis.hget(self.k_tokens, name)
        if text is None or not self.redis.hdel(self.k_tokens, name):
            raise UnknownTokenError(f"name: no issued token named {name!r}")
        self._changed("token-revoke", name, actor)
        return _public(json.loads(text))

    def list(self) -> list[dict[str, Any]]:
        entries = [json.loads(t) for t in self.redis.hvals(self.k_tokens)]
        return sorted((_public(e) for e in entries), key=lambda e: e["created"])

    def refresh(self) -> None:
        """Re-read the tokens if the revision moved (Redis away: keep the last known set)."""
        rev = self.redis.get(self.k_rev)
        if rev == self._rev and self._rev is not None:
            return
        entries = [json.loads(t) for t in self.redis.hvals(self.k_tokens)]
        self.current = [Token(e["name"], e["sha256"], frozenset(e["scopes"])) for e in entries]
        self._rev = rev

    def _changed(self, action: str, name: str, actor: str) -> None:
        self.redis.incr(self.k_rev)
        entry = {"action": action, "id": name, "actor": actor, "time": repr(time.time())}
        self.redis.xadd(self.k_audit, entry, maxlen=100_000, approximate=True)


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ("name", "scopes", "actor", "created")}


def load_tokens(tokens_file: str | None = None, data_dir: str | Path | None = None) -> TokenStore:
    """Tokens from the environment, a tokens file and the data dir's generated admin token."""
    tokens = []
    admin = os.environ.get("FACTPATCH_ADMIN_TOKEN")
    if admin:
        tokens.append(Token("admin", token_sha256(admin), frozenset({"admin"})))
    path = tokens_file or os.environ.get("FACTPATCH_TOKENS_FILE")
    if path:
        try:
            entries = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"tokens_file: cannot read {path} ({err})") from err
        for e in entries:
            tokens.append(Token(e["name"], e["sha256"].lower(), frozenset(e["scopes"])))
    if data_dir is not None:
        stored = Path(data_dir) / "admin.token"
        if stored.exists():
            digest = token_sha256(stored.read_text().strip())
            tokens.append(Token("admin", digest, frozenset({"admin"})))
    return TokenStore(tokens)


def ensure_admin_token(data_dir: str | Path) -> str | None:
    """Create ``DATA_DIR/admin.token`` (mode 0600) on first start; returns the new token, or
    None when one exists already (it is printed only once, when created)."""
    path = Path(data_dir) / "admin.token"
    if path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


class Denied(Exception):
    """A call refused by :func:`authorize`: UNAUTHENTICATED or PERMISSION_DENIED."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def authorize(store: TokenStore | None, header: str, scope: str | None) -> str:
    """The caller's name if the ``Authorization`` header's bearer token has ``scope``
    (``None``: open to all; ``store`` None: no authentication, the caller is anonymous).
    The one check behind every protocol: gRPC (the interceptor), the OpenAI-compatible API and
    the console's JSON API."""
    if store is None or scope is None:
        return "anonymous"
    if not header.startswith("Bearer ") or not header[7:].strip():
        raise Denied(
            grpc.StatusCode.UNAUTHENTICATED, "authorization: a 'Bearer <token>' header is required"
        )
    token = store.authenticate(header[7:].strip())
    if token is None:
        raise Denied(grpc.StatusCode.UNAUTHENTICATED, "authorization: unknown token")
    if not token.allows(scope):
        raise Denied(
            grpc.StatusCode.PERMISSION_DENIED,
            f"authorization: token {token.name!r} lacks the {scope!r} scope",
        )
    return token.name


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticate, authorise by :data:`METHOD_SCOPES`, cap concurrent streams per caller, and
    make the caller's name the actor of whatever the RPC records."""

    def __init__(self, store: TokenStore | None, max_streams_per_client: int = 8) -> None:
        self.store = store  # None: no authentication (--insecure-no-auth)
        self.max_streams = max_streams_per_client
        self.streams: dict[str, int] = {}
        self.lock = threading.Lock()

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        scope = METHOD_SCOPES.get(details.method, _ADMIN)
        metadata = dict(details.invocation_metadata or ())
        header = metadata.get("authorization", "")
        try:
            actor = authorize(self.store, header, scope)
        except Denied as err:
            return _deny(handler, err.code, err.message)
        presented = header[7:].strip() if self.store is not None and scope is not None else None
        if handler.unary_unary:
            return handler._replace(unary_unary=_as(actor, handler.unary_unary))
        if handler.unary_stream:
            stream = self._stream(actor, presented, handler.unary_stream)
            return handler._replace(unary_stream=stream)
        if handler.stream_stream:  # reflection
            return handler._replace(stream_stream=_as_stream(actor, handler.stream_stream))
        return handler

    def _stream(
        self, actor: str, presented: str | None, fn: Callable[..., Any]
    ) -> Callable[..., Any]:
        """Cap the caller's open streams; before each message, check that its token still
        authenticates (a token revoked mid-stream ends the stream, UNAUTHENTICATED)."""

        def call(request: Any, context: Any) -> Any:
            with self.lock:
                if self.streams.get(actor, 0) >= self.max_streams:
                    context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"max-streams-per-client: {actor!r} already has {self.max_streams} open",
                    )
                self.streams[actor] = self.streams.get(actor, 0) + 1
            try:
                current_actor.set(actor)
                for message in fn(request, context):
                    if presented is not None and self.store.authenticate(presented) is None:
                        context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: revoked")
                    yield message
            finally:
                with self.lock:
                    self.streams[actor] -= 1

        return call


def _as(actor: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(request: Any, context: Any) -> Any:
        current_actor.set(actor)
        return fn(request, context)

    return call


def _as_stream(actor: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(requests: Any, context: Any) -> Any:
        current_actor.set(actor)
        yield from fn(requests, context)

    return call


def _deny(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    def unary(request: Any, context: Any) -> Any:
        context.abort(code, message)

    def stream(request: Any, context: Any) -> Any:
        context.abort(code, message)
        yield  # pragma: no cover

    if handler.unary_unary:
        return handler._replace(unary_unary=unary)
    if handler.unary_stream:
        return handler._replace(unary_stream=stream)
    if handler.stream_stream:
        return handler._replace(stream_stream=stream)
    return handler
