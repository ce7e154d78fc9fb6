"""The factpatch client SDK (synchronous).

    from factpatch.client import Client

    with Client("127.0.0.1:50051") as fp:
        print(fp.generate("The Eiffel Tower is located in the city of").text)
        job = fp.edit("{} is located in the city of", "The Eiffel Tower", "Rome").wait()
        print(job.version, fp.generate("The Eiffel Tower is located in the city of").text)
        fp.rollback(to=0)

Errors come back as ``grpc.RpcError`` (``.code()``, ``.details()`` naming the field).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from factpatch.rpc import pb, pb_grpc

TERMINAL = {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED, pb.DEAD}


class JobFailed(RuntimeError):
    def __init__(self, job: pb.Job) -> None:
        state = pb.JobState.Name(job.state)
        super().__init__(f"job {job.id} {state}: {job.error or 'no reason given'}")
        self.job = job


@dataclass
class Generated:
    text: str
    version: int
    finish_reason: str
    restarts: int


@dataclass(frozen=True)
class TLS:
    """Server CA (PEM) to verify the server; client cert/key for mutual TLS."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None


class JobHandle:
    def __init__(self, client: Client, job: pb.Job) -> None:
        self.client, self.job = client, job

    @property
    def id(self) -> str:
        return self.job.id

    def wait(
        self, timeout: float | None = None, on_update: Callable[[pb.Job], None] | None = None
    ) -> pb.Job:
        """Follow the job until it is terminal; raises JobFailed unless it SUCCEEDED."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.job.state not in TERMINAL:
            remaining = None if deadline is None else max(0.1, deadline - time.monotonic())
            try:
                for job in self.client.edits.WatchJob(
                    pb.JobRef(job_id=self.id), timeout=remaining, metadata=self.client.metadata
                ):
                    self.job = job
                    if on_update:
                        on_update(job)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError(f"job {self.id} not finished after {timeout} s") from err
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                time.sleep(0.5)  # server restarting: watch again
                self.job = self.client.job(self.id)
        if self.job.state != pb.SUCCEEDED:
            raise JobFailed(self.job)
        return self.job


class Client:
    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        token: str | None = None,
        tls: TLS | None = None,
        timeout: float = 60.0,
    ) -> None:
        if tls is None:
            self.channel = grpc.insecure_channel(target)
        else:
            creds = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
            self.channel = grpc.secure_channel(target, creds)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.timeout = timeout
        self.edits = pb_grpc.EditServiceStub(self.channel)
        self.traces = pb_grpc.TraceServiceStub(self.channel)
        self.ledger = pb_grpc.LedgerServiceStub(self.channel)
        self.gen = pb_grpc.GenerateServiceStub(self.channel)
        self.tokens = pb_grpc.TokenServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Any, request: Any) -> Any:
        return method(request, timeout=self.timeout, metadata=self.metadata)

    # -- health ------------------------------------------------------------------------------

    def ready(self, service: str = "") -> bool:
        try:
            reply = self.health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5, metadata=self.metadata
            )
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not SERVING after {timeout} s")
            time.sleep(0.2)

    # -- edits and traces --------------------------------------------------------------------

    def edit(
        self,
        prompt: str,
        subject: str,
        target: str,
        old: str = "",
        idempotency_key: str = "",
        dry_run: bool = False,
        method: str = "rome",
        paraphrases: Sequence[str] = (),
        neighbours: Sequence[str] = (),
        checks: str = "",
    ) -> JobHandle:
        fact = dict(prompt=prompt, subject=subject, target=target, old=old)
        return self.submit_edits(
            [{**fact, "paraphrases": list(paraphrases), "neighbours": list(neighbours)}],
            idempotency_key,
            dry_run,
            method,
            checks,
        )

    def submit_edits(
        self,
        edits: list[dict[str, Any]],
        idempotency_key: str = "",
        dry_run: bool = False,
        method: str = "rome",
        checks: str = "",
    ) -> JobHandle:
        """One job, one version for all ``edits`` (dicts of FactEdit's fields: prompt, subject,
        target, old, paraphrases, neighbours); ``method`` "memit" or "alphaedit" solves them as
        one batch (the choice for many edits at once).  ``checks``: the check policy over the
        server's, e.g. "warn" or "protected=enforce" (docs/checks.md)."""
        request = pb.SubmitEditsRequest(
            edits=[pb.FactEdit(**e) for e in edits],
            idempotency_key=idempotency_key,
            options=pb.EditOptions(method=method, dry_run=dry_run, checks=checks),
        )
        return JobHandle(self, self._call(self.edits.SubmitEdits, request))

    def trace(self, prompt: str, subject: str, **options: Any) -> JobHandle:
        request = pb.SubmitTraceRequest(prompt=prompt, subject=subject, **options)
        return JobHandle(self, self._call(self.traces.SubmitTrace, request))

    def job(self, job_id: str) -> pb.Job:
        return self._call(self.edits.GetJob, pb.JobRef(job_id=job_id))

    def jobs(self, kind: str = "", limit: int = 20) -> list[pb.Job]:
        reply = self._call(self.edits.ListJobs, pb.ListJobsRequest(kind=kind, limit=limit))
        return list(reply.jobs)

    def cancel(self, job_id: str) -> pb.Job:
        return self._call(self.edits.CancelJob, pb.JobRef(job_id=job_id))

    # -- inference ---------------------------------------------------------------------------

    def stream(self, prompt: str, **sampling: Any) -> Iterator[pb.GenerateChunk]:
        """Chunks as generated; ``version=N`` answers from committed version N."""
        request = pb.GenerateRequest(prompt=prompt, **sampling)
        yield from self.gen.Generate(request, timeout=self.timeout, metadata=self.metadata)

    def generate(self, prompt: str, **sampling: Any) -> Generated:
        """The whole completion; a restart chunk (version changed mid-stream) resets the text."""
        text, version, finish, restarts = "", -1, "", 0
        for chunk in self.stream(prompt, **sampling):
            if chunk.restart:
                text, restarts = "", restarts + 1
            text += chunk.text
            version, finish = chunk.version, chunk.finish_reason or finish
        return Generated(text, version, finish, restarts)

    def score(self, prompt: str, continuation: str, version: int | None = None) -> pb.ScoreResponse:
        """log P(continuation | prompt) at ``version`` (None: the live one)."""
        request = pb.ScoreRequest(prompt=prompt, continuation=continuation, version=version)
        return self._call(self.gen.Score, request)

    # -- ledger ------------------------------------------------------------------------------

    def head(self) -> pb.VersionInfo:
        return self._call(self.ledger.GetHead, pb.GetHeadRequest())

    def versions(self, start: int = 0, limit: int = 100) -> list[pb.VersionInfo]:
        request = pb.ListVersionsRequest(start=start, limit=limit)
        return list(self._call(self.ledger.ListVersions, request).versions)

    def version(self, number: int) -> pb.VersionInfo:
        return self._call(self.ledger.GetVersion, pb.GetVersionRequest(number=number))

    def served(self) -> pb.ServedInfo:
        """What this server's replica serves: version, readiness, live tensor hashes."""
        return self._call(self.ledger.GetServed, pb.GetServedRequest())

    def replicas(self) -> list[pb.ReplicaStatus]:
        """Every live server's replica: the version it serves, readiness, its last report."""
        return list(self._call(self.ledger.ListReplicas, pb.ListReplicasRequest()).replicas)

    def edit_info(self, edit_id: str) -> pb.EditInfo:
        """One edit's facts (``requests_json``), method, who and when."""
        return self._call(self.ledger.GetEdit, pb.GetEditRequest(edit_id=edit_id))

    def protect(self, prompt: str, answer: str) -> pb.ProtectedFact:
        """Protect ``answer`` after ``prompt`` from every later edit (admin)."""
        request = pb.ProtectedFact(prompt=prompt, answer=answer)
        return self._call(self.ledger.AddProtected, request)

    def protected(self) -> list[pb.ProtectedFact]:
        return list(self._call(self.ledger.ListProtected, pb.ListProtectedRequest()).facts)

    def unprotect(self, fact_id: str) -> pb.ProtectedFact:
        return self._call(self.ledger.RemoveProtected, pb.RemoveProtectedRequest(id=fact_id))

    def add_token(self, name: str, scopes: Sequence[str]) -> pb.IssuedToken:
        """Issue a bearer token (admin); its ``token`` is shown this once."""
        request = pb.AddTokenRequest(name=name, scopes=list(scopes))
        return self._call(self.tokens.AddToken, request)

    def revoke_token(self, name: str) -> pb.IssuedToken:
        return self._call(self.tokens.RevokeToken, pb.RevokeTokenRequest(name=name))

    def list_tokens(self) -> list[pb.IssuedToken]:
        return list(self._call(self.tokens.ListTokens, pb.ListTokensRequest()).tokens)

    def rollback(self, to: int) -> pb.LedgerChange:
        return self._call(self.ledger.Rollback, pb.RollbackRequest(to=to))

    def revert(self, edit_id: str) -> pb.LedgerChange:
        return self._call(self.ledger.RevertEdit, pb.RevertEditRequest(edit_id=edit_id))
