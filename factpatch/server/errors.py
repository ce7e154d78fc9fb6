"""One place that turns factpatch exceptions into gRPC status codes.

Bad input → INVALID_ARGUMENT (the message starts with the field); a missing thing → NOT_FOUND;
a stale compare-and-set → ABORTED; a ledger for other weights → FAILED_PRECONDITION; a replica
that is not serving → UNAVAILABLE.  A refused request has changed nothing.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc
import redis

from factpatch.auth import UnknownTokenError
from factpatch.ledger import (
    CorruptBlobError,
    LedgerMismatchError,
    StaleHeadError,
    UnknownEditError,
    UnknownVersionError,
)
from factpatch.ledger.protected import UnknownProtectedError
from factpatch.queue import UnknownJobError

log = logging.getLogger(__name__)


class Unavailable(Exception):
    """The server cannot serve right now (loading, catching up, draining, hash fault)."""


class DeadlineExceeded(Exception):
    """A request ran longer than the configured request deadline."""


class LimitExceeded(ValueError):
    """A request exceeds a configured limit (the message names the limit)."""


def status_for(err: BaseException) -> grpc.StatusCode:
    if isinstance(
        err,
        (UnknownVersionError, UnknownEditError, UnknownJobError, UnknownProtectedError),
    ):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(err, UnknownTokenError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(err, FileExistsError):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(err, LimitExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(err, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(err, StaleHeadError):
        return grpc.StatusCode.ABORTED
    if isinstance(err, (LedgerMismatchError, CorruptBlobError)):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(err, (Unavailable, redis.ConnectionError, redis.TimeoutError)):
        return grpc.StatusCode.UNAVAILABLE  # Redis away (restarting): the client may retry
    if isinstance(err, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL


def _message(err: BaseException) -> str:
    text = str(err)
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]  # KeyError's str() adds quotes
    return text


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a servicer method (unary or server-streaming) with the error mapping."""

    def fail(context: grpc.ServicerContext, err: BaseException) -> None:
        code = status_for(err)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error in %s", method.__name__)
        context.abort(code, _message(err))

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, request, context)
            except Exception as err:
                fail(context, err)

        return streaming

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as err:
            fail(context, err)

    return unary
