"""The gRPC server process: one model replica, every service, health and reflection.

The same process serves the OpenAI-compatible HTTP API (:mod:`factpatch.server.http_api`) from
the same replica, unless ``no_http``.

Start-up: load the model, connect to Redis, start the gRPC listener with health NOT_SERVING,
create/check version 0, catch up to the head (verifying hashes), follow the ledger; health turns
SERVING only when the replica is ready.  It goes back to NOT_SERVING whenever the replica is not
ready (a hash fault) and while draining.  On SIGTERM/SIGINT: NOT_SERVING, stop accepting new
RPCs, give running ones ``drain_seconds``, stop.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from factpatch import metrics
from factpatch.auth import AuthInterceptor, TokenStore
from factpatch.config import Settings
from factpatch.ledger import Ledger
from factpatch.ledger.replicas import ReplicaStatus
from factpatch.models.loading import ModelHandle
from factpatch.queue import JobQueue
from factpatch.runtime import Batcher, Replica
from factpatch.server.http_api import HttpServer
from factpatch.server.servicers import Frontend, add_servicers

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Server:
    """A running gRPC server; ``port`` is the bound port (useful with ``port=0``)."""

    grpc_server: grpc.Server
    frontend: Frontend
    health: health.HealthServicer
    services: list[str]
    port: int
    http: HttpServer | None = None  # the OpenAI-compatible API; None with no_http
    _stop: threading.Event = field(default_factory=threading.Event)
    _watcher: threading.Thread | None = None

    @property
    def http_port(self) -> int | None:
        return None if self.http is None else self.http.port

    def start(self) -> Server:
        self.grpc_server.start()
        if self.http is not None:
            self.http.start()
        replica, settings = self.frontend.replica, self.frontend.settings
        replica.start()
        if settings.max_running > 0:  # every request of every protocol decodes in one batch
            replica.batcher = Batcher(replica, settings.max_running).start()
        replica.follow(settings.poll_interval)
        self._watcher = threading.Thread(target=self._watch_health, daemon=True)
        self._watcher.start()
        log.info("serving version %d on port %d", self.frontend.replica.version, self.port)
        return self

    @property
    def name(self) -> str:
        """How this server is listed among the replicas: host:gRPC port."""
        return f"{socket.gethostname()}:{self.port}"

    def _watch_health(self) -> None:
        """Every 0.2 s: the health status, and the issued tokens (a change made through any
        server is in force here within a second); every second, this replica's version on the
        replica board (factpatch/ledger/replicas.py)."""
        reported = 0.0
        while not self._stop.is_set():
            ok = self.frontend.replica.ready and not self.frontend.draining
            status = SERVING if ok else NOT_SERVING
            for name in ["", *self.services]:
                self.health.set(name, status)
            try:
                self.frontend.tokens.refresh()
                if time.monotonic() - reported >= 1.0:
                    self.frontend.replicas.report(self._status())
                    reported = time.monotonic()
            except (redis.RedisError, ConnectionError) as err:  # keep the last known tokens
                log.warning("Redis unreachable (%s); keeping the last known tokens", err)
            self._stop.wait(0.2)

    def _status(self) -> ReplicaStatus:
        replica = self.frontend.replica
        return ReplicaStatus(
            server=self.name,
            version=replica.version,
            ready=replica.ready and not self.frontend.draining,
            fault=replica.fault or ("draining" if self.frontend.draining else ""),
            seen=time.time(),
            gate=replica.gate,
        )

    @property
    def serving(self) -> bool:
        return self.frontend.replica.ready and not self.frontend.draining

    def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING at once, refuse new RPCs, let running ones finish (``grace`` s)."""
        self.frontend.draining = True
        for name in ["", *self.services]:
            self.health.set(name, NOT_SERVING)
        grace = self.frontend.settings.drain_seconds if grace is None else grace
        self.grpc_server.stop(grace).wait()
        if self.http is not None:  # new HTTP requests are refused (503) since draining began
            self.http.stop()
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        with contextlib.suppress(redis.RedisError, ConnectionError):  # else listed for 10 s
            self.frontend.replicas.remove(self.name)
        if self.frontend.replica.batcher is not None:
            self.frontend.replica.batcher.stop()
        self.frontend.replica.stop()

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


def build_server(
    handle: ModelHandle,
    ledger: Ledger,
    queue: JobQueue,
    settings: Settings,
    credentials: grpc.ServerCredentials | None = None,
    auth: TokenStore | None = None,
    max_workers: int = 16,
) -> Server:
    """A server for ``handle``; ``auth=None`` serves without tokens (tests, --insecure-no-auth)."""
    frontend = Frontend(Replica(handle, ledger, gate=settings.gate), ledger, queue, settings)
    if auth is not None:
        frontend.tokens.refresh()  # the issued tokens are in force from the first call
        auth.attach(frontend.tokens)
    metrics.watch_replica(frontend.replica)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        # Metrics outermost, so that refused calls are counted with their status code.
        interceptors=[
            metrics.RpcMetrics(),
            AuthInterceptor(auth, settings.max_streams_per_client),
        ],
    )
    services = add_servicers(server, frontend)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *services]:
        health_servicer.set(name, NOT_SERVING)  # until the replica has caught up
    reflection.enable_server_reflection(
        [
            *services,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    address = f"{settings.host}:{settings.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"port: could not bind {address}")
    http = None
    if not settings.no_http:
        http = HttpServer(frontend, auth, settings.host, settings.http_port, _http_tls(settings))
    return Server(server, frontend, health_servicer, services, port, http)


def _http_tls(settings: Settings) -> dict | None:
    """uvicorn's TLS settings from the gRPC ones: the same certificate, key and client CA."""
    if not settings.tls_cert:
        return None
    tls = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
    if settings.tls_client_ca:
        tls |= {"ssl_ca_certs": settings.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return tls
