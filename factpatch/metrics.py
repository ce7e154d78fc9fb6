"""Prometheus metrics: every metric factpatch exports, defined in this one place.

Conventions: one prefix ``factpatch_``, base units in the name (``_seconds``), counters end in
``_total``, labels have small fixed value sets (method, route, code, kind, outcome, phase, api,
protocol, role) —
never job ids, edit ids or prompts.  Each process serves ``/metrics`` on ``--metrics-port``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from prometheus_client import (
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from factpatch import __version__

disable_created_metrics()  # no *_created series: they double the output and no panel uses them

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
JOB = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
PAUSE = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

RPC_REQUESTS = Counter(
    "factpatch_rpc_requests",
    "gRPC requests handled, by method and status code",
    ["method", "code"],
)
RPC_DURATION = Histogram(
    "factpatch_rpc_duration_seconds",
    "gRPC request latency (streams: until the last message)",
    ["method", "code"],
    buckets=LATENCY,
)
HTTP_REQUESTS = Counter(
    "factpatch_http_requests",
    "OpenAI-compatible HTTP requests handled, by route and HTTP status code",
    ["route", "code"],
)
# protocol: grpc (factpatch's own API), oip (Open Inference Protocol), openai (HTTP)
INFERENCE_DURATION = Histogram(
    "factpatch_inference_duration_seconds",
    "Time to serve one inference request",
    ["api", "protocol"],
    buckets=LATENCY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "factpatch_time_to_first_token_seconds",
    "Streamed generation: time until the first text chunk",
    ["protocol"],
    buckets=LATENCY,
)
GENERATED_TOKENS = Counter("factpatch_generated_tokens", "Tokens generated", ["protocol"])
JOB_DURATION = Histogram(
    "factpatch_job_duration_seconds",
    "Job run time on a worker, by kind and outcome",
    ["kind", "outcome"],
    buckets=JOB,
)
JOB_RETRIES = Counter(
    "factpatch_job_retries", "Failed job attempts put back on the queue", ["kind"]
)
DEAD_LETTERS = Counter("factpatch_dead_letters", "Jobs dead-lettered after max attempts", ["kind"])
EDIT_PHASE = Histogram(
    "factpatch_edit_phase_seconds",
    "Edit phases: keys, optimise (δ), solve, commit",
    ["phase"],
    buckets=JOB,
)
CHECKS = Counter(
    "factpatch_checks",
    "Checks run on candidate versions (factpatch/checks), by check and result",
    ["check", "result"],
)
CHECK_SECONDS = Histogram(
    "factpatch_check_seconds", "Scoring a candidate version before its commit", buckets=JOB
)
COMMITS_REFUSED = Counter(
    "factpatch_commits_refused", "Edit jobs whose commit an enforced check refused"
)
APPLY_PAUSE = Histogram(
    "factpatch_apply_pause_seconds",
    "Per version apply: write lock held (inference blocked)",
    buckets=PAUSE,
)
APPLY_WAIT = Histogram(
    "factpatch_apply_wait_seconds",
    "Per version apply: waiting for running forward steps",
    buckets=LATENCY,
)
ROLLBACKS = Counter("factpatch_rollbacks", "Rollbacks committed through this server")
HASH_FAILURES = Counter(
    "factpatch_hash_verification_failures", "Versions refused: hash mismatch or corrupt delta"
)
MODEL_LOAD = Gauge("factpatch_model_load_seconds", "Seconds the model took to load")
BUILD_INFO = Gauge("factpatch_build_info", "Always 1", ["version", "model", "role"])


class ReplicaCollector(Collector):
    """At scrape time: the served version, the ledger head, the lag, readiness."""

    def __init__(self, replica: Any) -> None:
        self.replica = replica

    def collect(self) -> Iterator[GaugeMetricFamily]:
        served = self.replica.version
        yield GaugeMetricFamily("factpatch_model_version", "Version this replica serves", served)
        ready = 1.0 if self.replica.ready else 0.0
        yield GaugeMetricFamily("factpatch_replica_ready", "1 when serving the ledger", ready)
        try:
            head = self.replica.ledger.head()
        except Exception:  # Redis unreachable: report what is known
            return
        yield GaugeMetricFamily("factpatch_ledger_head", "The ledger's head version", head)
        yield GaugeMetricFamily(
            "factpatch_version_lag", "Head minus served version", max(0, head - served)
        )


class QueueCollector(Collector):
    """At scrape time: queue depth and the age of the oldest waiting-or-running job, by kind."""

    def __init__(self, queue: Any, kinds: tuple[str, ...] = ("edit", "trace")) -> None:
        self.queue, self.kinds = queue, kinds

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "factpatch_queue_depth", "Jobs queued or running, by kind", labels=["kind"]
        )
        age = GaugeMetricFamily(
            "factpatch_queue_oldest_job_age_seconds",
            "Age of the oldest queued-or-running job, by kind",
            labels=["kind"],
        )
        try:
            for kind in self.kinds:
                depth.add_metric([kind], self.queue.depth(kind))
                age.add_metric([kind], self.queue.oldest_age(kind))
        except Exception:
            return
        yield depth
        yield age


@contextmanager
def timed(histogram: Any) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        histogram.observe(time.perf_counter() - started)


def watch_replica(replica: Any) -> None:
    """Apply pauses and refused versions of ``replica`` go to the histograms/counter."""
    replica.on_apply.append(observe_apply)
    replica.on_fault.append(lambda reason: HASH_FAILURES.inc())


def observe_apply(version: int, wait: float, pause: float) -> None:
    APPLY_WAIT.observe(wait)
    APPLY_PAUSE.observe(pause)


def serve(port: int, role: str, model: str, collectors: list[Collector]) -> Callable[[], None]:
    """Start ``/metrics`` on ``port`` (0: off); returns a function that unregisters collectors."""
    BUILD_INFO.labels(__version__, model, role).set(1)
    for c in collectors:
        REGISTRY.register(c)
    if port:
        start_http_server(port)

    def close() -> None:
        for c in collectors:
            REGISTRY.unregister(c)

    return close


class RpcMetrics(grpc.ServerInterceptor):
    """Counts and times every RPC by method and final status code (streams included)."""

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return handler._replace(unary_unary=_timed_unary(handler.unary_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=_timed_stream(handler.unary_stream, method))
        return handler


def _code(context: Any, error: BaseException | None) -> str:
    code = context.code() if hasattr(context, "code") else None
    if code is None:
        return "OK" if error is None else "UNKNOWN"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


def _record(method: str, code: str, started: float) -> None:
    RPC_REQUESTS.labels(method, code).inc()
    RPC_DURATION.labels(method, code).observe(time.perf_counter() - started)


def _timed_unary(fn: Callable[..., Any], method: str) -> Callable[..., Any]:
    def call(request: Any, context: Any) -> Any:
        started, error = time.perf_counter(), None
        try:
            return fn(request, context)
        except BaseException as err:
            error = err
            raise
        finally:
            _record(method, _code(context, error), started)

    return call


def _timed_stream(fn: Callable[..., Any], method: str) -> Callable[..., Any]:
    def call(request: Any, context: Any) -> Any:
        started, error = time.perf_counter(), None
        try:
            yield from fn(request, context)
        except BaseException as err:
            error = err
            raise
        finally:
            _record(method, _code(context, error), started)

    return call
