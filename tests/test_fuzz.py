"""Property-based bad input: every RPC driven with generated messages (empty, huge, unicode,
prompts without the subject, raw bytes that are not the message) on a real server.  The server
never crashes, always answers with a proper status code, and the ledger does not change."""

from __future__ import annotations

import uuid

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factpatch.client import Client
from factpatch.config import Settings
from factpatch.ledger import Ledger
from factpatch.queue import JobQueue
from factpatch.rpc import oip, pb
from factpatch.server import build_server
from factpatch.store import connect

# Anything but a crash: INTERNAL/UNKNOWN would mean an unhandled exception.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
}

text = st.one_of(
    st.just(""),
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0x80, max_codepoint=0x2FFF), max_size=30),
    st.just("{}"),
    st.just("x" * 3000),
)
number = st.integers(min_value=-(2**31), max_value=2**31 - 1)
real = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(0.0))


@pytest.fixture(scope="module")
def served(tokenizer, redis_url):
    from tests.conftest import build_tiny

    handle = build_tiny("llama", tokenizer)
    name = f"fuzz-{uuid.uuid4().hex[:8]}"
    client = connect(redis_url)
    ledger, queue = Ledger(client, name), JobQueue(client, name)
    server = build_server(
        handle, ledger, queue, Settings(ledger=name, port=0, http_port=0, max_new_tokens=8)
    ).start()
    fp = Client(f"127.0.0.1:{server.port}", timeout=30)
    fp.wait_ready(30)
    yield fp, ledger, queue
    fp.close()
    server.stop(grace=0.5)


def status(call, request) -> grpc.StatusCode:
    try:
        reply = call(request, timeout=30)
        if hasattr(reply, "__iter__") and not hasattr(reply, "DESCRIPTOR"):
            for _ in reply:
                pass
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def unchanged(ledger: Ledger, head: int) -> None:
    assert ledger.head() == head and len(ledger.versions()) == head + 1


FUZZ = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(
    edits=st.lists(st.tuples(text, text, text, text), max_size=3),
    key=text,
    method=st.sampled_from(["", "rome", "memit", "\x00"]),
)
def test_submit_edits(served, edits, key, method):
    fp, ledger, _ = served
    head = ledger.head()
    request = pb.SubmitEditsRequest(
        edits=[pb.FactEdit(prompt=p, subject=s, target=t, old=o) for p, s, t, o in edits],
        idempotency_key=key,
        options=pb.EditOptions(method=method),
    )
    assert status(fp.edits.SubmitEdits, request) in ALLOWED
    unchanged(ledger, head)


@FUZZ
@given(prompt=text, subject=text, answer=text, kind=text, n=number, noise=real)
def test_submit_trace(served, prompt, subject, answer, kind, n, noise):
    fp, ledger, _ = served
    head = ledger.head()
    request = pb.SubmitTraceRequest(
        prompt=prompt, subject=subject, answer=answer, kind=kind, samples=n, window=n, noise=noise
    )
    assert status(fp.traces.SubmitTrace, request) in ALLOWED
    unchanged(ledger, head)


@FUZZ
@given(job_id=text, kind=text, limit=number)
def test_job_rpcs(served, job_id, kind, limit):
    fp, ledger, _ = served
    head = ledger.head()
    for call in (fp.edits.GetJob, fp.edits.CancelJob, fp.edits.WatchJob):
        assert status(call, pb.JobRef(job_id=job_id)) in ALLOWED
    assert status(fp.edits.ListJobs, pb.ListJobsRequest(kind=kind, limit=limit)) in ALLOWED
    unchanged(ledger, head)


@FUZZ
@given(n=number, edit_id=text)
def test_ledger_rpcs(served, n, edit_id):
    fp, ledger, _ = served
    head = ledger.head()
    assert status(fp.ledger.GetVersion, pb.GetVersionRequest(number=n)) in ALLOWED
    assert status(fp.ledger.ListVersions, pb.ListVersionsRequest(start=n, limit=n)) in ALLOWED
    assert status(fp.ledger.Rollback, pb.RollbackRequest(to=n)) in ALLOWED | {
        grpc.StatusCode.ABORTED
    }
    assert status(fp.ledger.RevertEdit, pb.RevertEditRequest(edit_id=edit_id)) in ALLOWED
    if not 0 <= n <= head:  # rolling back to an existing version is valid and makes one
        unchanged(ledger, head)


@FUZZ
@given(
    prompt=text,
    continuation=text,
    n=st.integers(min_value=-5, max_value=20),
    temperature=real,
    top_p=real,
    top_k=number,
    stop=st.lists(text, max_size=2),
)
def test_generate_and_score(served, prompt, continuation, n, temperature, top_p, top_k, stop):
    fp, ledger, _ = served
    head = ledger.head()
    request = pb.GenerateRequest(
        prompt=prompt,
        max_new_tokens=n,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=stop,
    )
    assert status(fp.gen.Generate, request) in ALLOWED
    score = pb.ScoreRequest(prompt=prompt, continuation=continuation)
    assert status(fp.gen.Score, score) in ALLOWED
    unchanged(ledger, head)


@FUZZ
@given(
    name=text,
    version=text,
    items=st.lists(st.binary(max_size=50), max_size=3),
    datatype=st.sampled_from(["BYTES", "FP32", ""]),
    raw=st.binary(max_size=40),
)
def test_model_infer(served, name, version, items, datatype, raw):
    fp, ledger, _ = served
    head = ledger.head()
    stub = oip_stub(fp)
    tensor = oip.ModelInferRequest.InferInputTensor(
        name="text_input",
        datatype=datatype,
        shape=[len(items)],
        contents=oip.InferTensorContents(bytes_contents=items),
    )
    for model in (name, "tiny-llama"):
        request = oip.ModelInferRequest(model_name=model, model_version=version, inputs=[tensor])
        assert status(stub.ModelInfer, request) in ALLOWED
    raw_request = oip.ModelInferRequest(
        model_name="tiny-llama",
        inputs=[oip.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES")],
        raw_input_contents=[raw],
    )
    assert status(stub.ModelInfer, raw_request) in ALLOWED
    unchanged(ledger, head)


@FUZZ
@given(garbage=st.binary(max_size=200))
def test_undecodable_bytes_on_every_method(served, garbage):
    """Bytes that are not the request message, sent straight down the channel."""
    fp, ledger, _ = served
    head = ledger.head()
    for method in (
        "/factpatch.v1.EditService/SubmitEdits",
        "/factpatch.v1.LedgerService/GetVersion",
        "/factpatch.v1.GenerateService/Score",
        "/inference.GRPCInferenceService/ModelInfer",
    ):
        call = fp.channel.unary_unary(method)  # raw bytes in, raw bytes out
        try:
            call(garbage, timeout=30)
        except grpc.RpcError as err:
            assert err.code() in ALLOWED | {grpc.StatusCode.INTERNAL}, err
            if err.code() == grpc.StatusCode.INTERNAL:  # grpc's own "failed to parse request"
                assert "deserializ" in (err.details() or "").lower() or not err.details()
    unchanged(ledger, head)
    assert fp.ready()  # still serving


def oip_stub(fp: Client):
    from factpatch.rpc import oip_grpc

    return oip_grpc.GRPCInferenceServiceStub(fp.channel)
