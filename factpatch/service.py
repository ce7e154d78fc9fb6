"""Process entry points: ``factpatch server``, ``factpatch worker`` and the all-in-one ``up``.

``up`` runs on one machine what a cluster runs as separate processes: an embedded Redis
persisting to the data directory (unless ``--redis-url``), one gRPC server and one worker, each
with its own replica of the model (the worker's is a copy in memory, not a second load).
SIGINT/SIGTERM stop everything cleanly: the server drains, the worker finishes its job in hand
(or leaves it to be reclaimed), Redis shuts down after an fsync.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import redis

from factpatch import metrics
from factpatch.auth import TokenStore, ensure_admin_token, load_tokens
from factpatch.config import Settings
from factpatch.ledger import Ledger
from factpatch.models import load_model
from factpatch.models.loading import ModelHandle
from factpatch.paths import default_data_dir
from factpatch.queue import JobQueue
from factpatch.runtime import Replica
from factpatch.store import EmbeddedRedis, connect

log = logging.getLogger("factpatch")


def _logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _on_signal(stop: Callable[[], None]) -> threading.Event:
    done = threading.Event()

    def handler(signum: int, frame: object) -> None:
        log.info("signal %d: stopping", signum)
        done.set()
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return done


def _load(settings: Settings) -> ModelHandle:
    t0 = time.perf_counter()
    handle = load_model(settings.model, device=settings.device, dtype=settings.dtype)
    metrics.MODEL_LOAD.set(time.perf_counter() - t0)
    log.info(
        "model %s loaded in %.1f s (%s, %s)",
        handle.name,
        time.perf_counter() - t0,
        handle.device,
        handle.dtype,
    )
    return handle


def _queue(client: redis.Redis, settings: Settings) -> JobQueue:
    return JobQueue(
        client,
        settings.ledger,
        max_attempts=settings.max_attempts,
        heartbeat_ttl=settings.heartbeat_ttl,
    )


def _metrics(
    settings: Settings, role: str, handle: ModelHandle, replica: Replica, queue: JobQueue
) -> None:
    collectors = [metrics.ReplicaCollector(replica), metrics.QueueCollector(queue)]
    metrics.serve(settings.metrics_port, role, handle.name, collectors)
    if settings.metrics_port:
        log.info("metrics on :%d/metrics", settings.metrics_port)


def _auth(settings: Settings, data_dir: Path | None = None) -> TokenStore | None:
    if settings.insecure_no_auth:
        log.warning("--insecure-no-auth: anyone who reaches the port may edit and roll back")
        return None
    store = load_tokens(settings.tokens_file, data_dir)
    if not store.tokens:
        raise ValueError(
            "tokens: none configured; set FACTPATCH_ADMIN_TOKEN or --tokens-file "
            "(or --insecure-no-auth for local experiments)"
        )
    return store


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        if settings.tls_key or settings.tls_client_ca:
            raise ValueError("tls_cert: --tls-key/--tls-client-ca need --tls-cert")
        return None
    if not settings.tls_key:
        raise ValueError("tls_key: --tls-cert needs --tls-key")
    pair = (Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())
    ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=bool(ca))


def run_server(settings: Settings) -> int:
    from factpatch.server.app import build_server

    _logging()
    client = connect(settings.redis_url)
    handle = _load(settings)
    ledger, queue = Ledger(client, settings.ledger), _queue(client, settings)
    server = build_server(handle, ledger, queue, settings, _credentials(settings), _auth(settings))
    server.start()
    _metrics(settings, "server", handle, server.frontend.replica, queue)
    print(f"factpatch server listening on {settings.host}:{server.port}", flush=True)
    if server.http_port is not None:
        url = _http_url(settings, server.http_port)
        print(f"OpenAI-compatible HTTP at {url}", flush=True)
        if not settings.no_console:
            print(f"Web console at {url.removesuffix('/v1')}/console", flush=True)
    _on_signal(server.stop)
    server.wait()
    return 0


def run_worker(settings: Settings) -> int:
    from factpatch.worker import Worker

    _logging()
    client = connect(settings.redis_url)
    handle = _load(settings)
    worker = Worker(
        handle,
        Ledger(client, settings.ledger),
        _queue(client, settings),
        settings.worker_name,
        settings.poll_interval,
        hparams=settings.hparam_overrides(),
        rebase_limit=settings.rebase_limit,
    )
    _metrics(settings, "worker", handle, worker.replica, worker.queue)
    _on_signal(worker.stop)
    worker.run()
    return 0


def run_up(settings: Settings) -> int:
    """The all-in-one service on one machine."""
    from factpatch.server.app import build_server
    from factpatch.worker import Worker

    _logging()
    redis_server = None
    data_dir = Path(settings.data_dir or default_data_dir())
    new_token = None if settings.insecure_no_auth else ensure_admin_token(data_dir)
    auth, credentials = _auth(settings, data_dir), _credentials(settings)
    if settings.redis_url:
        client = connect(settings.redis_url)
        where = settings.redis_url
    else:
        redis_server = EmbeddedRedis(data_dir / "redis").start()
        client = redis_server.client()
        where = f"embedded, persisting to {data_dir / 'redis'}"
    try:
        handle = _load(settings)
        worker_handle = handle.clone()
        ledger, queue = Ledger(client, settings.ledger), _queue(client, settings)
        server = build_server(handle, ledger, queue, settings, credentials, auth).start()
        worker = Worker(
            worker_handle,
            ledger,
            queue,
            settings.worker_name,
            settings.poll_interval,
            hparams=settings.hparam_overrides(),
            rebase_limit=settings.rebase_limit,
        )
        _metrics(settings, "up", handle, server.frontend.replica, queue)
        worker_thread = threading.Thread(target=worker.run, name="worker", daemon=True)
        worker_thread.start()

        def stop() -> None:
            worker.stop()
            threading.Thread(target=server.stop, daemon=True).start()

        _on_signal(stop)
        http_url = None if server.http_port is None else _http_url(settings, server.http_port)
        _banner(
            settings, server.port, http_url, handle.name, where, ledger.head(), data_dir, new_token
        )
        if settings.tour:
            from factpatch.tour import run_tour

            target = f"{settings.host}:{server.port}"
            token = None if auth is None else (data_dir / "admin.token").read_text().strip()
            http = None if http_url is None else (http_url, handle.name)
            threading.Thread(
                target=run_tour, args=(target, token), kwargs={"http": http}, daemon=True
            ).start()
        server.wait()
        worker_thread.join(timeout=settings.drain_seconds + 30)
    finally:
        if redis_server is not None:
            redis_server.stop()
    log.info("stopped")
    return 0


def _http_url(settings: Settings, port: int) -> str:
    scheme = "https" if settings.tls_cert else "http"
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{scheme}://{host}:{port}/v1"


def _banner(
    settings: Settings,
    port: int,
    http_url: str | None,
    model: str,
    redis_where: str,
    head: int,
    data_dir: Path,
    new_token: str | None,
) -> None:
    target = f"{settings.host}:{port}"
    if settings.insecure_no_auth:
        auth = "Auth: OFF (--insecure-no-auth)"
    elif new_token:
        auth = (
            f"Admin token (shown once; kept in {data_dir / 'admin.token'}, mode 0600):\n"
            f"  {new_token}"
        )
    else:
        auth = f"Admin token: {data_dir / 'admin.token'} (the client reads it from there)"
    http, ask = "", ""
    if http_url:
        http = f"\nOpenAI-compatible HTTP at {http_url}"
        if not settings.no_console:
            console = http_url.removesuffix("/v1") + "/console"
            sign_in = "" if settings.insecure_no_auth else " (sign in with the admin token below)"
            http += f"\nWeb console at {console}{sign_in}"
        bearer = (
            ""
            if settings.insecure_no_auth
            else f' \\\n      -H "Authorization: Bearer $(cat {data_dir / "admin.token"})"'
        )
        body = f'{{"model": "{model}", "prompt": "The Eiffel Tower is located in the city of", '
        body += '"max_tokens": 6, "temperature": 0}'
        ask = (
            f"  curl -s {http_url}/completions -H 'Content-Type: application/json'{bearer} \\\n"
            f"      -d '{body}'\n"
        )
    print(
        f"""
factpatch is up: gRPC on {target}, model {model}, ledger head version {head}{http}
Redis: {redis_where}
{auth}

Try it (another terminal):
{ask}  factpatch client --target {target} generate "The Eiffel Tower is located in the city of"
  factpatch client --target {target} edit --prompt "{{}} is located in the city of" \\
      --subject "The Eiffel Tower" --target Rome
  factpatch client --target {target} generate "The Eiffel Tower is located in the city of"
  factpatch client --target {target} ledger
  factpatch client --target {target} rollback --to {head}
Ctrl-C stops everything.
""",
        flush=True,
        file=sys.stdout,
    )
