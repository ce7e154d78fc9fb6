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
import secrets
import threading
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
    def __init__(self, tokens: list[Token]) -> None:
        for t in tokens:
            bad = set(t.scopes) - set(SCOPES)
            if bad:
                raise ValueError(f"tokens: {t.name!r} has unknown scopes {sorted(bad)}")
        self.tokens = tokens

    def authenticate(self, presented: str) -> Token | None:
        digest = token_sha256(presented)
        found = None
        for t in self.tokens:  # compare with every entry: no early exit
            if hmac.compare_digest(digest, t.sha256):
                found = t
        return found


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
        actor = "anonymous"
        if self.store is not None and scope is not None:
            metadata = dict(details.invocation_metadata or ())
            header = metadata.get("authorization", "")
            if not header.startswith("Bearer ") or not header[7:].strip():
                return _deny(
                    handler,
                    grpc.StatusCode.UNAUTHENTICATED,
                    "authorization: a 'Bearer <token>' header is required",
                )
            token = self.store.authenticate(header[7:].strip())
            if token is None:
                return _deny(
                    handler, grpc.StatusCode.UNAUTHENTICATED, "authorization: unknown token"
                )
            if not token.allows(scope):
                return _deny(
                    handler,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"authorization: token {token.name!r} lacks the {scope!r} scope",
                )
            actor = token.name
        if handler.unary_unary:
            return handler._replace(unary_unary=_as(actor, handler.unary_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._stream(actor, handler.unary_stream))
        if handler.stream_stream:  # reflection
            return handler._replace(stream_stream=_as_stream(actor, handler.stream_stream))
        return handler

    def _stream(self, actor: str, fn: Callable[..., Any]) -> Callable[..., Any]:
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
                yield from fn(request, context)
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
