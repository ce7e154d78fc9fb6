"""The OpenAI-compatible HTTP API, served from the same replica as the gRPC API.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (the model's
chat template; 400 where it has none), ``GET /health``.  Streaming is server-sent events ending
in ``data: [DONE]``.  Every response names the ledger version that produced it, in
``system_fingerprint`` (``fp-v<N>-<first 8 hex of Version.fingerprint>``) and in the
``x-factpatch-version`` header; every choice of one response comes from that version
(:func:`factpatch.runtime.complete` / :func:`factpatch.runtime.stream_all`).

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
field or a limit (``param`` names the field), 401 for a missing or unknown token, 403 for a token
without the ``infer`` scope, 404 for another model, 503 while the replica is not serving.
Tokens and scopes are the gRPC API's (:mod:`factpatch.auth`), sent as ``Authorization: Bearer``
(the ``openai`` SDK's ``api_key``).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Literal

import grpc
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from factpatch import metrics
from factpatch.auth import Denied, TokenStore, authorize
from factpatch.ledger import UnknownVersionError
from factpatch.runtime import Generation, Sampling, StreamEvent, TokenLogprob, complete, stream_all
from factpatch.server import console, gateway
from factpatch.server.errors import DeadlineExceeded, LimitExceeded, Unavailable

log = logging.getLogger(__name__)

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_LOGPROBS = 5  # completions' logprobs, as OpenAI's
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI's


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


def _bad(err: ValueError) -> ApiError:
    """A runtime ValueError ("field: why") as a 400 naming the field."""
    text = str(err)
    field = text.split(":", 1)[0] if ":" in text else None
    code = "limit_exceeded" if isinstance(err, LimitExceeded) else None
    return ApiError(400, text, field if field and " " not in field else None, code)


# ------------------------------------------------------------------------------------ requests


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI's API does; the ones below that factpatch cannot
    # honour are refused by name rather than ignored.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def _refuse_unsupported(body: _Body) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise ApiError(400, f"{name}: only 0 is supported", name)
    if body.logit_bias:
        raise ApiError(400, "logit_bias: not supported", "logit_bias")
    if isinstance(body, CompletionBody):
        if body.echo:
            raise ApiError(400, "echo: not supported", "echo")
        if body.suffix:
            raise ApiError(400, "suffix: not supported", "suffix")
        if body.best_of not in (None, body.n):
            raise ApiError(400, "best_of: only best_of = n is supported", "best_of")
    if isinstance(body, ChatBody):
        if body.tools:
            raise ApiError(400, "tools: not supported", "tools")
        if body.response_format and body.response_format.get("type") != "text":
            raise ApiError(400, "response_format: only type 'text' is supported", "response_format")


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"stop: at most {MAX_STOP} sequences", "stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop: stop sequences must be non-empty", "stop")
    return stops


def _flatten(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(
                400,
                f"messages.{index}.content: only text parts are supported",
                f"messages.{index}.content",
            )
        texts.append(part["text"])
    return "".join(texts)


# ------------------------------------------------------------------------------------ the app


class OpenAIApi:
    """The routes, bound to one :class:`factpatch.server.servicers.Frontend`."""

    def __init__(self, fe: Any, auth: TokenStore | None) -> None:
        self.fe = fe
        self.auth = auth
        self.model = fe.replica.handle.name
        self.created = int(time.time())
        self._fingerprints: dict[int, str] = {}

    # -- shared ------------------------------------------------------------------------------

    def caller(self, request: Request) -> str:
        return self.recheck(request.headers.get("authorization", ""))

    def recheck(self, header: str) -> str:
        """The caller, if the token in ``header`` is (still) valid with the infer scope; a
        stream calls it before each chunk, so a token revoked mid-stream ends the stream."""
        try:
            return authorize(self.auth, header, "infer")
        except Denied as err:
            if err.code == grpc.StatusCode.UNAUTHENTICATED:
                raise ApiError(401, err.message, None, "invalid_api_key") from err
            scope = "insufficient_scope"
            raise ApiError(403, err.message, None, scope, "permission_error") from err

    def fingerprint(self, version: int) -> str:
        if version not in self._fingerprints:  # versions never change once committed
            digest = self.fe.ledger.get(version).fingerprint
            self._fingerprints[version] = f"fp-v{version}-{digest[:8]}"
        return self._fingerprints[version]

    def version_of(self, name: str) -> int | None:
        """The version a model name asks for: ``<model>@v<N>`` is version N (any committed
        version, 0 = the base weights); the bare name is the live version."""
        match = re.fullmatch(r"(.*)@v(\d+)", name)
        if match is None or match.group(1) != self.model:
            return None
        return int(match.group(2))

    def check_model(self, name: str) -> None:
        version = self.version_of(name)
        if name != self.model and version is None:
            raise ApiError(
                404,
                f"model: {name!r} is not served here (this server serves {self.model!r}, "
                f"and {self.model!r}@v<N> for version N)",
                "model",
                "model_not_found",
            )
        if version is not None:
            try:
                self.fe.ledger.get(version)
            except UnknownVersionError as err:
                raise ApiError(404, f"model: {err}", "model", "model_not_found") from err

    def samplings(
        self, body: _Body, max_tokens: int | None, logprobs: int | None, count: int
    ) -> list[Sampling]:
        """One Sampling per sequence: ``count`` prompts × ``n``; seeds seed, seed + 1, …"""
        settings = self.fe.settings
        n_new = max_tokens or settings.max_new_tokens
        if n_new > settings.max_new_tokens:
            field = (
                "max_completion_tokens"
                if isinstance(body, ChatBody) and body.max_completion_tokens
                else "max_tokens"
            )
            raise ApiError(
                400,
                f"{field}: {n_new} exceeds max-new-tokens ({settings.max_new_tokens})",
                field,
                "limit_exceeded",
            )
        if count * body.n > settings.max_batch:
            raise ApiError(
                400,
                f"n: {count} prompt(s) × n = {count * body.n} sequences exceeds max-batch "
                f"({settings.max_batch})",
                "n",
                "limit_exceeded",
            )
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        stops = _stops(body.stop)
        try:
            return [
                Sampling(
                    max_new_tokens=n_new,
                    temperature=body.temperature,
                    top_p=body.top_p,
                    seed=(seed + i) % 2**63,
                    stop=stops,
                    logprobs=logprobs,
                )
                for i in range(count * body.n)
            ]
        except ValueError as err:
            raise _bad(err) from err

    def check_prompt(self, field: str, text: str) -> None:
        try:
            self.fe.check_prompt(field, text)
        except ValueError as err:
            raise _bad(err) from err

    def deadline(self) -> Callable[[], None]:
        started, limit = time.perf_counter(), self.fe.settings.request_deadline

        def check() -> None:
            if time.perf_counter() - started > limit:
                raise DeadlineExceeded(f"request-deadline: ran longer than {limit} s")

        return check

    # -- completions -------------------------------------------------------------------------

    def completions(self, body: CompletionBody) -> tuple[list[str | list[int]], list[Sampling]]:
        self.check_model(body.model)
        _refuse_unsupported(body)
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts: list[Any] = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise ApiError(400, "prompt: must be non-empty", "prompt")
        for p in prompts:
            if not p:
                raise ApiError(400, "prompt: must be non-empty", "prompt")
            if isinstance(p, str):
                self.check_prompt("prompt", p)
            elif len(p) > self.fe.settings.max_prompt_chars:
                raise ApiError(
                    400,
                    f"prompt: {len(p)} tokens exceeds max-prompt-chars "
                    f"({self.fe.settings.max_prompt_chars})",
                    "prompt",
                    "limit_exceeded",
                )
        samplings = self.samplings(body, body.max_tokens, body.logprobs, len(prompts))
        return [p for p in prompts for _ in range(body.n)], samplings

    def completion_logprobs(self, items: list[TokenLogprob]) -> dict[str, Any]:
        tok = self.fe.replica.handle.tokenizer
        tokens = [tok.decode([x.token_id]) for x in items]
        offsets, at = [], 0
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [x.logprob for x in items],
            "top_logprobs": [{tok.decode([t]): lp for t, lp in x.top} for x in items],
            "text_offset": offsets,
        }

    # -- chat --------------------------------------------------------------------------------

    def chat(self, body: ChatBody) -> tuple[list[str | list[int]], list[Sampling]]:
        self.check_model(body.model)
        _refuse_unsupported(body)
        tok = self.fe.replica.handle.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ApiError(
                400,
                f"messages: model {self.model!r} has no chat template; use /v1/completions",
                "messages",
                "no_chat_template",
            )
        messages = [
            {
                "role": m.role if m.role != "developer" else "system",
                "content": _flatten(m.content, i),
            }
            for i, m in enumerate(body.messages)
        ]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # the template's own checks (roles, order)
            raise ApiError(
                400, f"messages: the chat template refused them ({err})", "messages"
            ) from err
        self.check_prompt("messages", text)
        ids = list(tok(text, add_special_tokens=False)["input_ids"])  # the template has BOS
        top = body.top_logprobs if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        logprobs = (top or 0) if body.logprobs else None
        samplings = self.samplings(body, body.max_completion_tokens or body.max_tokens, logprobs, 1)
        return [ids] * body.n, samplings

    def chat_logprobs(self, items: list[TokenLogprob]) -> dict[str, Any]:
        tok = self.fe.replica.handle.tokenizer

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = tok.decode([token_id])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [
                {**entry(x.token_id, x.logprob), "top_logprobs": [entry(t, lp) for t, lp in x.top]}
                for x in items
            ]
        }

    # -- running -----------------------------------------------------------------------------

    def run(self, model: str, prompts: list[Any], samplings: list[Sampling]) -> list[Generation]:
        try:
            replica, version = self.fe.serving(), self.version_of(model)
            return complete(replica, prompts, samplings, self.deadline(), version)
        except Unavailable as err:
            raise ApiError(503, str(err), None, "unavailable", "server_error") from err
        except DeadlineExceeded as err:
            raise ApiError(504, str(err), None, "timeout", "server_error") from err
        except ValueError as err:
            raise _bad(err) from err

    def events(
        self, model: str, prompts: list[Any], samplings: list[Sampling]
    ) -> Iterator[tuple[int, StreamEvent]]:
        try:
            replica = self.fe.serving()
        except Unavailable as err:
            raise ApiError(503, str(err), None, "unavailable", "server_error") from err
        check = self.deadline()
        try:
            for item in stream_all(replica, prompts, samplings, self.version_of(model)):
                check()
                yield item
        except ValueError as err:
            raise _bad(err) from err


FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _drain(iterator: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Run a blocking generator in the thread pool, one item at a time, and close it in any
    case (a client that goes away must not leave the replica's read side held)."""
    try:
        while True:
            item = await run_in_threadpool(next, iterator, None)
            if item is None:
                return
            yield item
    finally:
        await run_in_threadpool(iterator.close)  # type: ignore[attr-defined]


def build_app(fe: Any, auth: TokenStore | None) -> FastAPI:
    api = OpenAIApi(fe, auth)
    app = FastAPI(title="factpatch (OpenAI-compatible)", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def on_api_error(_request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid body"}
        loc = [str(x) for x in first["loc"] if x != "body"]
        # A union's members add their type names to the location; keep the field path.
        loc = [x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int")]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        return ApiError(400, message, param).response()

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "other")
        metrics.HTTP_REQUESTS.labels(path, str(response.status_code)).inc()
        return response

    def headers(version: int) -> dict[str, str]:
        return {"x-factpatch-version": str(version)}

    @app.get("/health")
    def health() -> JSONResponse:
        replica = fe.replica
        ok = replica.ready and not fe.draining
        body = {"status": "ok" if ok else "unavailable", "version": replica.version}
        if replica.fault:
            body["fault"] = replica.fault
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    def models(_caller: str = Depends(api.caller)) -> dict[str, Any]:
        card = {"id": api.model, "object": "model", "created": api.created, "owned_by": "factpatch"}
        return {"object": "list", "data": [card]}

    def envelope(kind: str, obj: str, model: str) -> Callable[[int, list], dict[str, Any]]:
        """The fields every response and chunk of one request carries, around its choices."""
        rid, created = f"{kind}-{uuid.uuid4().hex}", int(time.time())

        def wrap(version: int, choices: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "system_fingerprint": api.fingerprint(version),
                "choices": choices,
            }

        return wrap

    async def whole(
        route: str,
        body: _Body,
        prompts: list[Any],
        samplings: list[Sampling],
        started: float,
        wrap: Callable[[int, list], dict[str, Any]],
        choice: Callable[[int, str, list[TokenLogprob], str | None], dict[str, Any]],
    ) -> JSONResponse:
        """A non-streamed response: every sequence, then one answer with its usage."""
        results = await run_in_threadpool(api.run, body.model, prompts, samplings)
        version = results[0].version
        record(results, route, started)
        answer = wrap(
            version,
            [choice(i, r.text, r.logprobs, r.finish_reason) for i, r in enumerate(results)],
        )
        answer["usage"] = _usage(
            sum(r.prompt_tokens for r in results[:: body.n]),  # each prompt once
            sum(r.completion_tokens for r in results),
        )
        return JSONResponse(answer, headers=headers(version))

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionBody, request: Request, _caller: str = Depends(api.caller)
    ) -> JSONResponse | StreamingResponse:
        prompts, samplings = api.completions(body)
        started = time.perf_counter()
        wrap = envelope("cmpl", "text_completion", body.model)

        def choice(
            index: int, text: str, logprobs: list[TokenLogprob], finish: str | None
        ) -> dict[str, Any]:
            return {
                "index": index,
                "text": text,
                "logprobs": None if body.logprobs is None else api.completion_logprobs(logprobs),
                "finish_reason": FINISH.get(finish or ""),
            }

        if body.stream:

            def chunk(version: int, index: int, event: StreamEvent) -> dict[str, Any]:
                return wrap(
                    version, [choice(index, event.text, event.logprobs, event.finish_reason)]
                )

            header = request.headers.get("authorization", "")
            return await stream_response(
                "completions", prompts, samplings, body, started, chunk, header
            )
        return await whole("completions", body, prompts, samplings, started, wrap, choice)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(
        body: ChatBody, request: Request, _caller: str = Depends(api.caller)
    ) -> JSONResponse | StreamingResponse:
        prompts, samplings = api.chat(body)
        started = time.perf_counter()
        wrap = envelope("chatcmpl", "chat.completion", body.model)

        def choice(
            index: int, text: str, logprobs: list[TokenLogprob], finish: str | None
        ) -> dict[str, Any]:
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": api.chat_logprobs(logprobs) if body.logprobs else None,
                "finish_reason": FINISH.get(finish or ""),
            }

        if body.stream:
            opened: set[int] = set()

            def chunk(version: int, index: int, event: StreamEvent) -> dict[str, Any]:
                one = choice(index, event.text, event.logprobs, event.finish_reason)
                delta = one.pop("message")
                if index in opened:  # only the first chunk of each choice names the role
                    del delta["role"]
                opened.add(index)
                out = wrap(version, [{"index": index, "delta": delta, **one}])
                return out | {"object": "chat.completion.chunk"}

            header = request.headers.get("authorization", "")
            return await stream_response("chat", prompts, samplings, body, started, chunk, header)
        return await whole("chat", body, prompts, samplings, started, wrap, choice)

    def record(results: list[Generation], route: str, started: float) -> None:
        metrics.GENERATED_TOKENS.labels("openai").inc(sum(r.completion_tokens for r in results))
        metrics.INFERENCE_DURATION.labels(route, "openai").observe(time.perf_counter() - started)

    async def stream_response(
        route: str,
        prompts: list[Any],
        samplings: list[Sampling],
        body: _Body,
        started: float,
        chunk: Callable[[int, int, StreamEvent], dict[str, Any]],
        header: str,
    ) -> StreamingResponse:
        events = api.events(body.model, prompts, samplings)
        # The first event before the headers: its version goes into x-factpatch-version, and a
        # request refused by the runtime still gets a plain error response.
        first = await run_in_threadpool(next, events, None)
        if first is None:
            raise ApiError(500, "no output", None, None, "server_error")
        version = first[1].version
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def lines() -> Iterator[bytes]:
            prompt_tokens = sum(
                len(p) if isinstance(p, list) else len(fe.replica.handle.tokenizer(p)["input_ids"])
                for p in prompts[:: body.n]
            )
            generated, first_text = 0, True
            try:
                item: tuple[int, StreamEvent] | None = first
                while item is not None:
                    index, event = item
                    generated += event.tokens
                    if first_text and event.text:
                        metrics.TIME_TO_FIRST_TOKEN.labels("openai").observe(
                            time.perf_counter() - started
                        )
                        first_text = False
                    if event.text or event.finish_reason:
                        api.recheck(header)  # revoked mid-stream: the error event, the end
                        yield _sse(chunk(version, index, event))
                    item = next(events, None)
            except (ApiError, DeadlineExceeded) as err:
                if not isinstance(err, ApiError):
                    err = ApiError(504, str(err), None, None, "server_error")
                detail = {"message": err.message, "type": err.kind, "param": None, "code": err.code}
                yield _sse({"error": detail})
                return
            finally:
                events.close()  # type: ignore[attr-defined]
                metrics.GENERATED_TOKENS.labels("openai").inc(generated)
                metrics.INFERENCE_DURATION.labels(route, "openai").observe(
                    time.perf_counter() - started
                )
            if include_usage:
                yield _sse(
                    {
                        "id": "usage",
                        "object": "usage",
                        "model": body.model,
                        "system_fingerprint": api.fingerprint(version),
                        "choices": [],
                        "usage": _usage(prompt_tokens, generated),
                    }
                )
            yield _sse("[DONE]")

        return StreamingResponse(
            _drain(lines()), media_type="text/event-stream", headers=headers(version)
        )

    if not fe.settings.no_console:
        gateway.add_routes(app, fe, auth)
        console.add_routes(app)
    return app


class HttpServer:
    """uvicorn serving :func:`build_app` in a thread of the gRPC server's process."""

    def __init__(
        self,
        fe: Any,
        auth: TokenStore | None,
        host: str,
        port: int,
        ssl: dict[str, Any] | None = None,
    ) -> None:
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as err:
            self.socket.close()
            raise OSError(f"http-port: could not bind {host}:{port} ({err})") from err
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(
            build_app(fe, auth),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=fe.settings.drain_seconds,
            **(ssl or {}),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="http", daemon=True
        )

    def start(self) -> HttpServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("http: the HTTP server did not start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.server.config.timeout_graceful_shutdown or 10)
        self.socket.close()
