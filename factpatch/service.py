"""Process entry points: ``factpatch server``, ``factpatch worker`` and the all-in-one ``up``.

``up`` runs on one machine what a cluster runs as separate processes: an embedded Redis
persisting to the data directory (unless ``--redis-url``), one gRPC server and one worker, each
with its own replica of the model (the worker's is a copy in memory, not a second load).
SIGINT/SIGTERM stop everything cleanly: the server drains, the worker finishes its job in hand
(or leaves it to be reclaimed), Redis shuts down after an fsync.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from factpatch.config import Settings
from factpatch.ledger import Ledger
from factpatch.models import load_model
from factpatch.models.loading import ModelHandle
from factpatch.paths import default_data_dir
from factpatch.queue import JobQueue
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
    log.info(
        "model %s loaded in %.1f s (%s, %s)",
        handle.name,
        time.perf_counter() - t0,
        handle.device,
        handle.dtype,
    )
    return handle


def _queue(client, settings: Settings) -> JobQueue:
    return JobQueue(
        client,
        settings.ledger,
        max_attempts=settings.max_attempts,
        heartbeat_ttl=settings.heartbeat_ttl,
    )


def run_server(settings: Settings) -> int:
    from factpatch.server.app import build_server

    _logging()
    client = connect(settings.redis_url)
    handle = _load(settings)
    server = build_server(
        handle, Ledger(client, settings.ledger), _queue(client, settings), settings
    )
    server.start()
    print(f"factpatch server listening on {settings.host}:{server.port}", flush=True)
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
    )
    _on_signal(worker.stop)
    worker.run()
    return 0


def run_up(settings: Settings) -> int:
    """The all-in-one service on one machine."""
    from factpatch.server.app import build_server
    from factpatch.worker import Worker

    _logging()
    redis_server = None
    if settings.redis_url:
        client = connect(settings.redis_url)
        where = settings.redis_url
    else:
        data_dir = Path(settings.data_dir or default_data_dir())
        redis_server = EmbeddedRedis(data_dir / "redis").start()
        client = redis_server.client()
        where = f"embedded, persisting to {data_dir / 'redis'}"
    try:
        handle = _load(settings)
        worker_handle = dataclasses.replace(handle, model=copy.deepcopy(handle.model), cache={})
        ledger, queue = Ledger(client, settings.ledger), _queue(client, settings)
        server = build_server(handle, ledger, queue, settings).start()
        worker = Worker(
            worker_handle,
            ledger,
            queue,
            settings.worker_name,
            settings.poll_interval,
            hparams=settings.hparam_overrides(),
        )
        worker_thread = threading.Thread(target=worker.run, name="worker", daemon=True)
        worker_thread.start()

        def stop() -> None:
            worker.stop()
            threading.Thread(target=server.stop, daemon=True).start()

        _on_signal(stop)
        _banner(settings, server.port, handle.name, where, ledger.head())
        server.wait()
        worker_thread.join(timeout=settings.drain_seconds + 30)
    finally:
        if redis_server is not None:
            redis_server.stop()
    log.info("stopped")
    return 0


def _banner(settings: Settings, port: int, model: str, redis_where: str, head: int) -> None:
    target = f"{settings.host}:{port}"
    print(
        f"""
factpatch is up: gRPC on {target}, model {model}, ledger head version {head}
Redis: {redis_where}

Try it (another terminal):
  factpatch client --target {target} generate "The Eiffel Tower is located in the city of"
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
