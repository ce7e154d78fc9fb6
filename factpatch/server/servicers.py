"""The gRPC servicers: edits and traces (queued), the ledger, generation, and OIP v2 inference.

Every servicer shares one :class:`Frontend`: the replica this server serves from, the ledger,
the job queue and the limits.  Inference runs on the replica (each response names its version);
edits and traces become jobs for the workers; rollback and revert commit directly.
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from factpatch import __version__, metrics
from factpatch.auth import IssuedTokens, current_actor
from factpatch.checks import FactChecks, parse_policy
from factpatch.config import Settings
from factpatch.editing import EditRequest, InvalidEditError, check_method
from factpatch.editing.prompts import continuation, encode
from factpatch.ledger import Ledger, Version
from factpatch.ledger.protected import ProtectedFact, ProtectedFacts
from factpatch.ledger.replicas import ReplicaBoard
from factpatch.ledger.writer import LedgerWriter
from factpatch.models.loading import tensor_sha256
from factpatch.queue import Job, JobQueue, JobState
from factpatch.rpc import oip, oip_grpc, pb, pb_grpc
from factpatch.runtime import Replica, Sampling, complete, score, stream
from factpatch.server.errors import DeadlineExceeded, LimitExceeded, Unavailable, rpc

log = logging.getLogger(__name__)

TRACE_KINDS = ("hidden", "mlp", "attn")


@dataclass
class Frontend:
    replica: Replica
    ledger: Ledger
    queue: JobQueue
    settings: Settings
    draining: bool = False

    def __post_init__(self) -> None:
        self.policy = parse_policy(self.settings.checks, where="checks")  # checked commits
        self.protected = ProtectedFacts(self.ledger)
        self.tokens = IssuedTokens(self.ledger.redis, self.ledger.name)  # auth.py
        self.replicas = ReplicaBoard(self.ledger)  # which version each replica serves

    def serving(self) -> Replica:
        if self.draining:
            raise Unavailable("server is draining")
        if not self.replica.ready:
            reason = self.replica.fault or "loading or catching up"
            raise Unavailable(f"replica not ready: {reason}")
        return self.replica

    def writer(self) -> LedgerWriter:
        """Rollbacks and reverts go through the ledger's writer, with this server's replica
        materialising (reverts) and catching up at once."""
        return LedgerWriter(self.ledger, self.serving())

    def actor(self, context: grpc.ServicerContext) -> str:
        """Who asked: the authenticated token's name (``anonymous`` without auth)."""
        return current_actor.get()

    def check_prompt(self, field: str, text: str) -> None:
        if not text:
            raise ValueError(f"{field}: must be non-empty")
        if len(text) > self.settings.max_prompt_chars:
            raise LimitExceeded(
                f"{field}: {len(text)} characters exceeds max-prompt-chars "
                f"({self.settings.max_prompt_chars})"
            )

    def check_deadline(self, started: float, context: grpc.ServicerContext) -> None:
        limit = self.settings.request_deadline
        if time.perf_counter() - started > limit:
            raise DeadlineExceeded(f"request-deadline: ran longer than {limit} s")

    def sampling(self, request: Any) -> Sampling:
        n = request.max_new_tokens or 32
        if n > self.settings.max_new_tokens:
            raise LimitExceeded(
                f"max_new_tokens: {n} exceeds max-new-tokens ({self.settings.max_new_tokens})"
            )
        return Sampling(
            max_new_tokens=n,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p or 1.0,
            seed=request.seed,
            stop=tuple(request.stop),
        )


# -------------------------------------------------------------------------------- conversions


def job_message(job: Job) -> pb.Job:
    result = job.result or {}
    msg = pb.Job(
        id=job.id,
        kind=job.kind,
        state=pb.JobState.Value(JobState(job.state).name),
        created=job.created,
        updated=job.updated,
        attempts=job.attempts,
        phase=str(job.progress.get("phase", "")),
        fraction=float(job.progress.get("fraction", 0.0)),
        error=job.error or "",
        idempotency_key=job.idempotency_key,
        actor=job.actor,
        cancel_requested=job.cancel_requested,
        version=int(result.get("version", 0)) if job.kind == "edit" else 0,
        edit_ids=result.get("edit_ids", []),
        result_json=json.dumps(result) if result else "",
    )
    if job.kind == "trace" and "trace" in result:
        msg.trace.CopyFrom(trace_message(result))
    return msg


def trace_message(result: dict[str, Any]) -> pb.TraceResult:
    data = json.loads(result["trace"])
    matrix = data["matrix"]  # [tokens][layers]
    return pb.TraceResult(
        tokens=data["tokens"],
        layers=data["layers"],
        scores=[x for row in matrix for x in row],
        clean=data["clean"],
        corrupted=data["corrupted"],
        answer=data["answer"],
        kind=data["kind"],
        subject_start=data["subject_range"][0],
        subject_end=data["subject_range"][1],
        png=base64.b64decode(result["png_b64"]) if "png_b64" in result else b"",
        version=int(result["version"]),
        json=result["trace"],
    )


def version_message(v: Version, ledger: Ledger | None = None) -> pb.VersionInfo:
    """A version; with ``ledger``, its check report too (edit versions that have one)."""
    report = v.cause.get("checks")
    return pb.VersionInfo(
        checks_json=json.dumps(ledger.report(report)) if ledger and report else "",
        number=v.number,
        parent=-1 if v.parent is None else v.parent,
        edit_ids=list(v.edits),
        cause=v.cause["kind"],
        cause_json=json.dumps(v.cause),
        actor=v.actor,
        created=v.created,
        hashes=v.hashes,
        base_hash=v.base_hash,
        model=v.model,
    )


def protected_message(fact: ProtectedFact) -> pb.ProtectedFact:
    return pb.ProtectedFact(
        id=fact.id, prompt=fact.prompt, answer=fact.answer, actor=fact.actor, created=fact.created
    )


# -------------------------------------------------------------------------------- edits, traces


class EditService(pb_grpc.EditServiceServicer):
    def __init__(self, fe: Frontend) -> None:
        self.fe = fe

    @rpc
    def SubmitEdits(self, request: pb.SubmitEditsRequest, context: Any) -> pb.Job:
        limit = self.fe.settings.max_edits_per_request
        if not request.edits:
            raise ValueError("edits: at least one edit is needed")
        if len(request.edits) > limit:
            raise LimitExceeded(
                f"edits: {len(request.edits)} exceeds max-edits-per-request ({limit})"
            )
        method = check_method(request.options.method or "rome")
        policy = parse_policy(request.options.checks, self.fe.policy, where="options.checks")
        tokenizer = self.fe.replica.handle.tokenizer
        edits, facts = [], []
        for i, e in enumerate(request.edits):
            self.fe.check_prompt(f"edits[{i}].prompt", e.prompt)
            try:
                edit = EditRequest.from_prompt(e.prompt, e.subject, e.target, e.old or None)
                encode(tokenizer, edit.prompt, edit.subject, edit.target)  # tokens exist
            except InvalidEditError as err:
                raise ValueError(f"edits[{i}].{err}") from err
            except ValueError as err:
                raise ValueError(f"edits[{i}].{err}") from err
            fact = FactChecks.build(edit.subject, e.paraphrases, e.neighbours, f"edits[{i}]")
            edits.append(edit.to_dict())
            facts.append(fact.to_dict())
        payload = {
            "edits": edits,
            "method": method,
            "dry_run": request.options.dry_run,
            "facts": facts,
            "checks": policy,
        }
        job, _ = self.fe.queue.submit(
            "edit", payload, request.idempotency_key, self.fe.actor(context)
        )
        return job_message(job)

    @rpc
    def GetJob(self, request: pb.JobRef, context: Any) -> pb.Job:
        return job_message(self.fe.queue.get(_job_id(request)))

    @rpc
    def WatchJob(self, request: pb.JobRef, context: Any) -> Iterator[pb.Job]:
        for job in self.fe.queue.watch(_job_id(request)):
            if not context.is_active():
                return
            yield job_message(job)

    @rpc
    def CancelJob(self, request: pb.JobRef, context: Any) -> pb.Job:
        return job_message(self.fe.queue.cancel(_job_id(request)))

    @rpc
    def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        state = None
        if request.state:
            state = JobState[pb.JobState.Name(request.state)]
        jobs = self.fe.queue.list(
            kind=request.kind or None, state=state, limit=request.limit or 100
        )
        return pb.ListJobsResponse(jobs=[job_message(j) for j in jobs])


def _job_id(request: pb.JobRef) -> str:
    if not request.job_id:
        raise ValueError("job_id: must be non-empty")
    return request.job_id


class TraceService(pb_grpc.TraceServiceServicer):
    def __init__(self, fe: Frontend) -> None:
        self.fe = fe

    @rpc
    def SubmitTrace(self, request: pb.SubmitTraceRequest, context: Any) -> pb.Job:
        self.fe.check_prompt("prompt", request.prompt)
        if not request.subject or request.subject not in request.prompt:
            raise ValueError(f"subject: {request.subject!r} does not occur in the prompt")
        kind = request.kind or "hidden"
        if kind not in TRACE_KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {TRACE_KINDS}")
        if request.samples < 0 or request.window < 0 or request.noise < 0:
            raise ValueError("samples/window/noise: must not be negative")
        payload = {
            "prompt": request.prompt,
            "subject": request.subject,
            "answer": request.answer,
            "kind": kind,
            "samples": request.samples,
            "window": request.window,
            "noise": request.noise,
            "render_png": request.render_png,
        }
        job, _ = self.fe.queue.submit(
            "trace", payload, request.idempotency_key, self.fe.actor(context)
        )
        return job_message(job)


# -------------------------------------------------------------------------------- ledger


class LedgerService(pb_grpc.LedgerServiceServicer):
    def __init__(self, fe: Frontend) -> None:
        self.fe = fe

    @rpc
    def GetHead(self, request: Any, context: Any) -> pb.VersionInfo:
        return version_message(self.fe.ledger.get(self.fe.ledger.head()), self.fe.ledger)

    @rpc
    def ListVersions(self, request: pb.ListVersionsRequest, context: Any) -> Any:
        if request.start < 0 or request.limit < 0:
            raise ValueError("start/limit: must not be negative")
        head = self.fe.ledger.head()
        stop = min(head, request.start + (request.limit or 100) - 1)
        versions = self.fe.ledger.versions(request.start, stop) if request.start <= head else []
        return pb.ListVersionsResponse(
            versions=[version_message(v, self.fe.ledger) for v in versions]
        )

    @rpc
    def GetVersion(self, request: pb.GetVersionRequest, context: Any) -> pb.VersionInfo:
        return version_message(self.fe.ledger.get(request.number), self.fe.ledger)

    @rpc
    def Rollback(self, request: pb.RollbackRequest, context: Any) -> pb.LedgerChange:
        self.fe.ledger.get(request.to)  # NOT_FOUND before anything happens
        commit = self.fe.writer().rollback(request.to, actor=self.fe.actor(context))
        metrics.ROLLBACKS.inc()
        return pb.LedgerChange(version=version_message(commit.version))

    @rpc
    def RevertEdit(self, request: pb.RevertEditRequest, context: Any) -> pb.LedgerChange:
        if not request.edit_id:
            raise ValueError("edit_id: must be non-empty")
        commit, tainted = self.fe.writer().revert(request.edit_id, actor=self.fe.actor(context))
        return pb.LedgerChange(version=version_message(commit.version), tainted=tainted)

    @rpc
    def GetServed(self, request: Any, context: Any) -> pb.ServedInfo:
        replica = self.fe.replica
        with replica.lock.read():  # version and tensors read together
            version = replica.version
            paths = self.fe.ledger.get(version).hashes
            live = {p: tensor_sha256(replica.handle.module(p).weight) for p in paths}
        return pb.ServedInfo(
            version=version,
            ready=replica.ready,
            fault=replica.fault or "",
            live_hashes=live,
            model=replica.handle.name,
            base_hash=replica.handle.base_hash,
            gate=replica.gate,
        )

    @rpc
    def ListReplicas(self, request: Any, context: Any) -> pb.ListReplicasResponse:
        return pb.ListReplicasResponse(
            replicas=[
                pb.ReplicaStatus(
                    server=r.server,
                    version=r.version,
                    ready=r.ready,
                    fault=r.fault,
                    seen=r.seen,
                    gate=r.gate,
                )
                for r in self.fe.replicas.list()
            ]
        )

    @rpc
    def GetEdit(self, request: pb.GetEditRequest, context: Any) -> pb.EditInfo:
        if not request.edit_id:
            raise ValueError("edit_id: must be non-empty")
        record = self.fe.ledger.edit(request.edit_id)
        return pb.EditInfo(
            id=record.id,
            requests_json=json.dumps(record.requests),
            computed_on=record.computed_on,
            method=record.method,
            actor=record.actor,
            created=record.created,
        )

    @rpc
    def AddProtected(self, request: pb.ProtectedFact, context: Any) -> pb.ProtectedFact:
        if request.id:
            raise ValueError("id: set by the server; leave it empty")
        self.fe.check_prompt("prompt", request.prompt)
        try:  # the answer must be tokens after the prompt, as the check scores it
            continuation(self.fe.replica.handle.tokenizer, request.prompt, request.answer)
        except ValueError as err:
            raise ValueError(f"answer: {err}") from err
        fact = self.fe.protected.add(request.prompt, request.answer, self.fe.actor(context))
        return protected_message(fact)

    @rpc
    def ListProtected(self, request: Any, context: Any) -> pb.ListProtectedResponse:
        return pb.ListProtectedResponse(
            facts=[protected_message(f) for f in self.fe.protected.list()]
        )

    @rpc
    def RemoveProtected(self, request: pb.RemoveProtectedRequest, context: Any) -> pb.ProtectedFact:
        if not request.id:
            raise ValueError("id: must be non-empty")
        return protected_message(self.fe.protected.remove(request.id, self.fe.actor(context)))

    @rpc
    def WatchHead(self, request: Any, context: Any) -> Iterator[pb.VersionInfo]:
        """The version this server serves, now and after every change."""
        last = None
        while context.is_active():
            current = self.fe.replica.version
            if current != last:
                last = current
                yield version_message(self.fe.ledger.get(current))
            time.sleep(0.1)


# -------------------------------------------------------------------------------- inference


class GenerateService(pb_grpc.GenerateServiceServicer):
    def __init__(self, fe: Frontend) -> None:
        self.fe = fe

    @rpc
    def Generate(self, request: pb.GenerateRequest, context: Any) -> Iterator[pb.GenerateChunk]:
        self.fe.check_prompt("prompt", request.prompt)
        sampling = self.fe.sampling(request)
        started, first = time.perf_counter(), True
        version = request.version if request.HasField("version") else None
        for event in stream(self.fe.serving(), request.prompt, sampling, version):
            if not context.is_active():
                return
            self.fe.check_deadline(started, context)
            if first and event.text:
                metrics.TIME_TO_FIRST_TOKEN.labels("grpc").observe(time.perf_counter() - started)
                first = False
            metrics.GENERATED_TOKENS.labels("grpc").inc(event.tokens)
            if event.finish_reason:
                metrics.INFERENCE_DURATION.labels("generate", "grpc").observe(
                    time.perf_counter() - started
                )
            yield pb.GenerateChunk(
                text=event.text,
                version=event.version,
                restart=event.restart,
                finish_reason=event.finish_reason or "",
            )

    @rpc
    def Score(self, request: pb.ScoreRequest, context: Any) -> pb.ScoreResponse:
        self.fe.check_prompt("prompt", request.prompt)
        self.fe.check_prompt("continuation", request.continuation)
        with metrics.timed(metrics.INFERENCE_DURATION.labels("score", "grpc")):
            version = request.version if request.HasField("version") else None
            s = score(self.fe.serving(), request.prompt, request.continuation, version)
        return pb.ScoreResponse(
            logprob=s.logprob, token_logprobs=s.token_logprobs, tokens=s.tokens, version=s.version
        )


TEXT_IN, TEXT_OUT = "text_input", "text_output"


class InferenceService(oip_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol v2: a text model with one BYTES input and one BYTES output.

    Parameters (request.parameters): ``max_tokens`` (int64), ``temperature`` (double),
    ``top_k`` (int64), ``top_p`` (double), ``seed`` (int64), ``stop`` (string).
    ``model_version`` in the response is the ledger version that produced every output.
    """

    def __init__(self, fe: Frontend) -> None:
        self.fe = fe

    @property
    def name(self) -> str:
        return self.fe.replica.handle.name

    def ServerLive(self, request: Any, context: Any) -> Any:
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:
        return oip.ServerReadyResponse(ready=self.fe.replica.ready and not self.fe.draining)

    @rpc
    def ModelReady(self, request: Any, context: Any) -> Any:
        self._check_model(request.name)
        return oip.ModelReadyResponse(ready=self.fe.replica.ready and not self.fe.draining)

    def ServerMetadata(self, request: Any, context: Any) -> Any:
        return oip.ServerMetadataResponse(name="factpatch", version=__version__, extensions=[])

    @rpc
    def ModelMetadata(self, request: Any, context: Any) -> Any:
        self._check_model(request.name)
        t = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=self.name,
            versions=[str(self.fe.replica.version)],
            platform="factpatch",
            inputs=[t(name=TEXT_IN, datatype="BYTES", shape=[-1])],
            outputs=[t(name=TEXT_OUT, datatype="BYTES", shape=[-1])],
        )

    def _check_model(self, name: str) -> None:
        if name != self.name:
            raise ValueError(f"model_name: {name!r} is not served here (serving {self.name!r})")

    @rpc
    def ModelInfer(self, request: Any, context: Any) -> Any:
        self._check_model(request.model_name)
        version = None  # the live version; or any committed one, by number
        if request.model_version:
            if not (request.model_version.isascii() and request.model_version.isdigit()):
                raise ValueError(f"model_version: {request.model_version!r} is not a number")
            version = int(request.model_version)
        texts = _input_texts(request)
        if len(texts) > self.fe.settings.max_batch:
            raise LimitExceeded(f"inputs: {len(texts)} texts exceeds max-batch")
        for i, text in enumerate(texts):
            self.fe.check_prompt(f"inputs[{TEXT_IN}][{i}]", text)
        sampling = _sampling(request.parameters, self.fe.settings)
        replica = self.fe.serving()
        started = time.perf_counter()
        with metrics.timed(metrics.INFERENCE_DURATION.labels("infer", "oip")):
            # One group: decoded together, every output from one version.
            outs = complete(
                replica,
                list(texts),
                [sampling] * len(texts),
                lambda: self.fe.check_deadline(started, context),
                version,
            )
        metrics.GENERATED_TOKENS.labels("oip").inc(sum(o.completion_tokens for o in outs))
        raw = b"".join(struct.pack("<I", len(b)) + b for b in (o.text.encode() for o in outs))
        return oip.ModelInferResponse(
            model_name=self.name,
            model_version=str(outs[0].version),
            id=request.id,
            outputs=[
                oip.ModelInferResponse.InferOutputTensor(
                    name=TEXT_OUT, datatype="BYTES", shape=[len(outs)]
                )
            ],
            raw_output_contents=[raw],
        )


def _input_texts(request: Any) -> list[str]:
    inputs = [i for i in request.inputs if i.name == TEXT_IN]
    if len(inputs) != 1:
        raise ValueError(f"inputs: exactly one input named {TEXT_IN!r} (BYTES) is needed")
    (tensor,) = inputs
    if tensor.datatype != "BYTES":
        raise ValueError(f"inputs[{TEXT_IN}].datatype: must be BYTES, got {tensor.datatype!r}")
    if tensor.contents.bytes_contents:
        items = list(tensor.contents.bytes_contents)
    else:
        index = list(request.inputs).index(tensor)
        if index >= len(request.raw_input_contents):
            raise ValueError(f"inputs[{TEXT_IN}]: no contents")
        items = _unpack_bytes(request.raw_input_contents[index])
    try:
        return [b.decode("utf-8") for b in items]
    except UnicodeDecodeError as err:
        raise ValueError(f"inputs[{TEXT_IN}]: not UTF-8 ({err})") from err


def _unpack_bytes(raw: bytes) -> list[bytes]:
    """OIP raw BYTES: each element is a 4-byte little-endian length and its bytes."""
    items, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise ValueError(f"inputs[{TEXT_IN}]: truncated raw contents")
        (n,) = struct.unpack_from("<I", raw, at)
        items.append(raw[at + 4 : at + 4 + n])
        at += 4 + n
    return items


def _sampling(params: Any, settings: Settings) -> Sampling:
    def get(key: str, default: Any) -> Any:
        if key not in params:
            return default
        return getattr(params[key], params[key].WhichOneof("parameter_choice"))

    n = int(get("max_tokens", 32))
    if n > settings.max_new_tokens:
        raise LimitExceeded(f"parameters.max_tokens: {n} exceeds max-new-tokens")
    stop = get("stop", "")
    return Sampling(
        max_new_tokens=n,
        temperature=float(get("temperature", 0.0)),
        top_k=int(get("top_k", 0)),
        top_p=float(get("top_p", 1.0)),
        seed=int(get("seed", 0)),
        stop=(stop,) if stop else (),
    )


# -------------------------------------------------------------------------------- tokens


class TokenService(pb_grpc.TokenServiceServicer):
    """Tokens issued while the service runs (admin only; auth.IssuedTokens)."""

    def __init__(self, fe: Frontend) -> None:
        self.fe = fe

    @rpc
    def AddToken(self, request: pb.AddTokenRequest, context: Any) -> pb.IssuedToken:
        actor = self.fe.actor(context)
        token = self.fe.tokens.add(request.name, list(request.scopes), actor)
        (entry,) = [e for e in self.fe.tokens.list() if e["name"] == request.name]
        return pb.IssuedToken(token=token, **entry)

    @rpc
    def RevokeToken(self, request: pb.RevokeTokenRequest, context: Any) -> pb.IssuedToken:
        if not request.name:
            raise ValueError("name: must be non-empty")
        return pb.IssuedToken(**self.fe.tokens.revoke(request.name, self.fe.actor(context)))

    @rpc
    def ListTokens(self, request: Any, context: Any) -> pb.ListTokensResponse:
        return pb.ListTokensResponse(tokens=[pb.IssuedToken(**e) for e in self.fe.tokens.list()])


def add_servicers(server: grpc.Server, fe: Frontend) -> list[str]:
    """Register every service; returns their full names (for reflection)."""
    pb_grpc.add_EditServiceServicer_to_server(EditService(fe), server)
    pb_grpc.add_TraceServiceServicer_to_server(TraceService(fe), server)
    pb_grpc.add_LedgerServiceServicer_to_server(LedgerService(fe), server)
    pb_grpc.add_GenerateServiceServicer_to_server(GenerateService(fe), server)
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(fe), server)
    pb_grpc.add_TokenServiceServicer_to_server(TokenService(fe), server)
    return [
        pb.DESCRIPTOR.services_by_name[s].full_name
        for s in ("EditService", "TraceService", "LedgerService", "GenerateService", "TokenService")
    ] + [oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name]
