"""factpatch's gRPC API as JSON over HTTP, on the HTTP port: what the web console calls.

``POST /api/v1/<Service>/<Method>`` takes the request message as JSON (protobuf's JSON mapping:
lowerCamelCase or the .proto's field names; 64-bit integers may be strings) and answers the
response message the same way, with the .proto's field names and every field present.  The
same servicer objects answer as over gRPC, so validation, error messages, scopes
(:data:`factpatch.auth.METHOD_SCOPES`) and the actor recorded in the ledger are the gRPC API's.
Errors: ``{"error": {"code": "INVALID_ARGUMENT", "message": "edits[0].target: …"}}`` with the
HTTP status of that gRPC code (google.rpc.Code's mapping, :data:`HTTP_STATUS`).

Streams: ``GenerateService/Generate`` answers ``{"messages": [...]}`` once its stream ends;
the endless ones (``WatchJob``, ``WatchHead``) are not offered here — poll ``GetJob`` and
``ListReplicas``.  ``GET /api/v1/session`` says who the bearer token is and what it may do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.concurrency import run_in_threadpool

from factpatch.auth import (
    IMPLIED,
    METHOD_SCOPES,
    SCOPES,
    Denied,
    TokenStore,
    authorize,
    current_actor,
)
from factpatch.rpc import pb
from factpatch.server.servicers import (
    EditService,
    Frontend,
    GenerateService,
    LedgerService,
    TokenService,
    TraceService,
)

PACKAGE = "factpatch.v1"
MAX_BODY = 4 * 1024 * 1024  # bytes; gRPC's default message limit
STREAMS = {"Generate"}  # server-streaming methods offered, answered whole once they end

#: gRPC status → HTTP status (google.rpc.Code's documented mapping).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class GatewayError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message

    def response(self) -> JSONResponse:
        body = {"error": {"code": self.code.name, "message": self.message}}
        return JSONResponse(body, status_code=HTTP_STATUS.get(self.code, 500))


class _Context:
    """The part of grpc.ServicerContext the servicers use; abort raises GatewayError."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise GatewayError(code, details)

    def is_active(self) -> bool:
        return True


@dataclass(frozen=True)
class _Method:
    path: str  # /factpatch.v1.Service/Method, as METHOD_SCOPES names it
    call: Callable[[Message, Any], Any]
    request: type[Message]
    streaming: bool


def _methods(fe: Frontend) -> dict[tuple[str, str], _Method]:
    servicers = {
        "EditService": EditService(fe),
        "TraceService": TraceService(fe),
        "LedgerService": LedgerService(fe),
        "GenerateService": GenerateService(fe),
        "TokenService": TokenService(fe),
    }
    table = {}
    for service, servicer in servicers.items():
        for m in pb.DESCRIPTOR.services_by_name[service].methods:
            if m.server_streaming and m.name not in STREAMS:
                continue
            table[service, m.name] = _Method(
                path=f"/{PACKAGE}.{service}/{m.name}",
                call=getattr(servicer, m.name),
                request=getattr(pb, m.input_type.name),
                streaming=m.server_streaming,
            )
    return table


def _to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def add_routes(app: FastAPI, fe: Frontend, auth: TokenStore | None) -> None:
    methods = _methods(fe)

    def caller(request: Request, scope: str | None) -> str:
        try:
            return authorize(auth, request.headers.get("authorization", ""), scope)
        except Denied as err:
            raise GatewayError(err.code, err.message) from err

    @app.exception_handler(GatewayError)
    async def on_error(_request: Request, err: GatewayError) -> JSONResponse:
        return err.response()

    @app.get("/api/v1/session")
    def session(request: Request) -> dict[str, Any]:
        """Who the token is and what it may do (the console shows write controls from this;
        the server enforces the scopes on every call regardless)."""
        actor = caller(request, "infer")
        if auth is None:
            scopes = set(SCOPES)
        else:
            token = auth.authenticate(request.headers["authorization"][7:].strip())
            scopes = set().union(*(IMPLIED[s] for s in token.scopes)) if token else set()
        return {
            "name": actor,
            "scopes": sorted(scopes),
            "auth": auth is not None,
            "model": fe.replica.handle.name,
        }

    @app.post("/api/v1/{service}/{method}")
    async def call(service: str, method: str, request: Request) -> JSONResponse:
        target = methods.get((service, method))
        if target is None:
            raise GatewayError(
                grpc.StatusCode.NOT_FOUND, f"method: {service}/{method} is not offered here"
            )
        actor = caller(request, METHOD_SCOPES.get(target.path, "admin"))
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"body: {len(raw)} bytes exceeds {MAX_BODY}"
            )
        message = target.request()
        try:
            json_format.Parse(raw or b"{}", message)
        except json_format.ParseError as err:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"body: {err}") from err

        def run() -> dict[str, Any]:
            current_actor.set(actor)
            if target.streaming:
                return {"messages": [_to_json(m) for m in target.call(message, _Context())]}
            return _to_json(target.call(message, _Context()))

        return JSONResponse(await run_in_threadpool(run))
