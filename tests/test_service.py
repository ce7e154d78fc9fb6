"""The service in-process on a tiny model: real gRPC on loopback, real Redis, a real worker."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from factpatch.auth import TokenStore
from factpatch.client import Client, JobFailed
from factpatch.config import Settings
from factpatch.editing import apply_delta
from factpatch.ledger import Ledger
from factpatch.queue import JobQueue
from factpatch.rpc import pb
from factpatch.runtime import Replica, score
from factpatch.server import build_server
from factpatch.store import connect
from factpatch.worker import Worker
from tests.conftest import TINY_MEMIT, TINY_ROME

# conftest's tiny settings as the service reads them (JSON); MEMIT on one layer.
TINY_HPARAMS = json.loads(
    json.dumps(
        {
            **TINY_ROME.to_dict(),
            "memit": {**TINY_MEMIT.to_dict(), "layers": [1], "nullspace_threshold": 0.05},
        }
    )
)
PROMPT = "{} is located in the city of"


@dataclasses.dataclass
class Stack:
    client: Client
    server: object
    worker: Worker
    ledger: Ledger
    queue: JobQueue
    target: str


@contextlib.contextmanager
def running_stack(
    handle, redis_url: str, checks: str, auth: TokenStore | None = None, **settings: Any
) -> Iterator[Stack]:
    """A server and a worker (on a copy of ``handle``) for a fresh ledger, with this check
    policy, these tokens (None: no authentication) and any other settings; stopped on exit."""
    name = f"svc-{uuid.uuid4().hex[:10]}"
    redis_client = connect(redis_url)
    ledger, queue = Ledger(redis_client, name), JobQueue(redis_client, name, heartbeat_ttl=2.0)
    config = Settings(
        ledger=name,
        port=0,
        http_port=0,
        poll_interval=0.2,
        drain_seconds=1.0,
        checks=checks,
        **settings,
    )
    server = build_server(handle, ledger, queue, config, auth=auth)
    worker = Worker(handle.clone(), ledger, queue, "w1", 0.2, hparams=TINY_HPARAMS)
    thread = threading.Thread(target=worker.run, daemon=True)
    server.start()
    thread.start()
    target = f"127.0.0.1:{server.port}"
    client = Client(target, timeout=60)
    client.wait_ready(30)
    try:
        yield Stack(client, server, worker, ledger, queue, target)
    finally:
        client.close()
        worker.stop()
        server.stop(grace=0.5)
        thread.join(timeout=10)


@pytest.fixture
def stack(tiny_llama, redis_url):
    # Checks report but never refuse here: whether a tiny random model's edit overtakes its old
    # answer is luck, and these tests are about the service (tests/test_checks.py: enforce).
    with running_stack(tiny_llama, redis_url, checks="warn") as running:
        yield running


def test_edit_commits_changes_answers_and_rolls_back(stack: Stack, tiny_llama):
    fp = stack.client
    base_model = copy.deepcopy(tiny_llama.model)
    before = fp.score("The Eiffel Tower is located in the city of", " Rome")
    assert before.version == 0
    seen = []
    job = fp.edit(PROMPT, "The Eiffel Tower", "Rome").wait(timeout=120, on_update=seen.append)
    assert job.state == pb.SUCCEEDED and job.version == 1 and len(job.edit_ids) == 1
    states = [s.state for s in seen]
    assert states[-1] == pb.SUCCEEDED and pb.RUNNING in states

    stack.server.frontend.replica.catch_up()  # don't wait for the poll tick
    after = fp.score("The Eiffel Tower is located in the city of", " Rome")
    assert after.version == 1 and after.logprob > before.logprob + 0.5
    # The served answer is exactly base + the stored delta, applied anywhere else.
    twin = dataclasses.replace(tiny_llama, model=copy.deepcopy(base_model), cache={})
    apply_delta(twin, stack.ledger.delta(job.edit_ids[0]))
    local = score(Replica(twin, stack.ledger), PROMPT.format("The Eiffel Tower"), " Rome")
    assert local.logprob == after.logprob
    generated = fp.generate("The Eiffel Tower is located in the city of", max_new_tokens=3)
    assert generated.version == 1

    change = fp.rollback(0)
    assert change.version.number == 2 and list(change.version.edit_ids) == []
    restored = fp.score("The Eiffel Tower is located in the city of", " Rome")
    assert restored.version == 2
    assert restored.logprob == before.logprob  # bit-exact weights, identical forward pass
    head = fp.head()
    assert head.number == 2 and head.cause == "rollback"
    assert dict(head.hashes) == dict(fp.version(2).hashes)


def test_idempotency_key_gives_one_job_and_one_version(stack: Stack):
    fp = stack.client
    a = fp.edit(PROMPT, "Big Ben", "Paris", idempotency_key="fix-42")
    b = fp.edit(PROMPT, "Big Ben", "Paris", idempotency_key="fix-42")
    assert a.id == b.id
    a.wait(timeout=120)
    assert fp.head().number == 1 and len(fp.jobs()) == 1


def test_dry_run_commits_nothing(stack: Stack):
    job = stack.client.submit_edits(
        [dict(prompt=PROMPT, subject="The Louvre", target="Oslo")], dry_run=True
    ).wait(timeout=120)
    assert '"dry_run": true' in job.result_json and stack.client.head().number == 0


def expect(code: grpc.StatusCode, field: str, call, *args, **kwargs) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    assert info.value.code() == code, info.value.details()
    assert field in info.value.details(), info.value.details()


def test_memit_and_alphaedit_batches_are_one_version_each(stack: Stack):
    fp = stack.client
    facts = [
        dict(prompt=PROMPT, subject="The Eiffel Tower", target="Rome"),
        dict(prompt=PROMPT, subject="Big Ben", target="Paris"),
        dict(prompt="{} was born in", subject="Danielle Darrieux", target="Berlin"),
    ]
    before = [fp.score(f["prompt"].format(f["subject"]), " " + f["target"]).logprob for f in facts]
    first = fp.submit_edits(facts, method="memit").wait(timeout=180)
    assert first.state == pb.SUCCEEDED and first.version == 1 and len(first.edit_ids) == 1
    delta = stack.ledger.delta(first.edit_ids[0])
    assert delta.provenance["method"] == "memit" and len(delta.provenance["requests"]) == 3
    (path,) = delta.factors
    assert delta.factors[path][0].shape[1] == 3 and delta.keys[path].shape[1] == 3  # rank ≤ 3
    stack.server.frontend.replica.catch_up()
    after = [fp.score(f["prompt"].format(f["subject"]), " " + f["target"]) for f in facts]
    assert all(a.version == 1 for a in after)
    assert sum(a.logprob > b for a, b in zip(after, before, strict=True)) >= 2, (before, after)

    # AlphaEdit rebuilds its memory of earlier edits from the keys the active deltas carry.
    second = fp.submit_edits(
        [dict(prompt=PROMPT, subject="The Louvre", target="Oslo")], method="alphaedit"
    ).wait(timeout=180)
    assert second.state == pb.SUCCEEDED and second.version == 2
    alpha = stack.ledger.delta(second.edit_ids[0])
    assert alpha.provenance["method"] == "alphaedit" and alpha.provenance["prior_edits"] == 3
    assert alpha.provenance["base_version"] == 1
    # After a rollback to version 0 no edit is active, so the same batch starts from nothing.
    fp.rollback(0)
    third = fp.submit_edits(
        [dict(prompt=PROMPT, subject="The Louvre", target="Oslo")], method="alphaedit"
    ).wait(timeout=180)
    assert stack.ledger.delta(third.edit_ids[0]).provenance["prior_edits"] == 0


def test_cli_edits_a_file_of_facts_as_one_batch(stack: Stack, tmp_path, capsys):
    from factpatch.cli import main

    facts = tmp_path / "facts.jsonl"
    facts.write_text(
        '{"prompt": "{} is located in the city of", "subject": "Big Ben", "target": "Paris"}\n'
        '{"prompt": "{} is located in the city of", "subject": "The Louvre", "target": "Oslo"}\n'
    )
    client = ["client", "--target", stack.target, "--json"]
    assert main([*client, "edit", "--facts", str(facts), "--method", "memit"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["state"] == "SUCCEEDED" and job["version"] == 1  # plain JSON: a number
    assert stack.ledger.delta(job["edit_ids"][0]).provenance["method"] == "memit"
    # One fact from flags: the fact's --target is not the connection's --target.
    flags = ["--prompt", PROMPT, "--subject", "Big Ben", "--target", "Rome"]
    assert main([*client, "edit", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 2
    # Options after the verb work too; every field is present, version 0's number included.
    assert main(["client", "ledger", "--target", stack.target, "--json", "--timeout", "30"]) == 0
    versions = json.loads(capsys.readouterr().out)
    assert [v["number"] for v in versions] == [0, 1, 2]
    assert versions[0]["edit_ids"] == [] and versions[0]["parent"] == -1
    assert set(versions[0]) == set(versions[2])
    # Answers at two versions side by side, from the live server (head 2) without moving it.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Big Ben is located in the city of\nThe Louvre is located in the city of\n")
    diff = ["diff", "--from", "0", "--to", "2", "--prompts", str(prompts), "--max-new-tokens", "3"]
    assert main([*client, *diff]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == prompts.read_text().split("\n")[:2]
    for r in rows:
        assert r["a"] == stack.client.generate(r["prompt"], max_new_tokens=3, version=0).text
        assert r["b"] == stack.client.generate(r["prompt"], max_new_tokens=3).text
        assert r["changed"] == (r["a"] != r["b"])
    assert stack.client.served().version == 2


def test_bad_requests_name_the_field_and_change_nothing(stack: Stack):
    fp = stack.client
    invalid, missing = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    expect(invalid, "edits", fp.submit_edits, [])
    expect(invalid, "edits[0].subject", fp.edit, "Paris is nice", "Eiffel", "Rome")
    expect(invalid, "edits[0].target", fp.edit, PROMPT, "Big Ben", "")
    expect(invalid, "edits[0].prompt", fp.edit, "", "Big Ben", "Rome")
    expect(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "edits",
        fp.submit_edits,
        [dict(prompt=PROMPT, subject="Big Ben", target="Rome")] * 17,
    )
    expect(invalid, "edits[0].prompt", fp.edit, "{} " + "x" * 600, "Big Ben", "Rome")
    expect(
        invalid,
        "options.method",
        fp.edits.SubmitEdits,
        pb.SubmitEditsRequest(
            edits=[pb.FactEdit(prompt=PROMPT, subject="Big Ben", target="Rome")],
            options=pb.EditOptions(method="sparse"),
        ),
    )
    expect(missing, "job_id", fp.job, "nope")
    expect(invalid, "job_id", fp.job, "")
    expect(missing, "version", fp.version, 99)
    expect(missing, "version", fp.rollback, 99)
    expect(missing, "edit_id", fp.revert, "f" * 64)
    expect(invalid, "prompt", fp.generate, "")
    expect(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "max_new_tokens", fp.generate, "x", max_new_tokens=10**6
    )
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "prompt", fp.generate, "x" * 3000)
    expect(invalid, "temperature", fp.generate, "x", temperature=-1)
    expect(invalid, "continuation", fp.score, "x", "")
    expect(invalid, "subject", fp.trace, "Big Ben is in", "Eiffel")
    expect(invalid, "kind", fp.trace, "Big Ben is in", "Big Ben", kind="neurons")
    assert fp.head().number == 0 and fp.jobs() == []


def test_health_and_reflection(stack: Stack):
    reply = stack.client.health.Check(
        health_pb2.HealthCheckRequest(service="factpatch.v1.EditService")
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(stack.client.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in response.list_services_response.service}
    assert {
        "factpatch.v1.EditService",
        "factpatch.v1.LedgerService",
        "factpatch.v1.GenerateService",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
    } <= names


def test_draining_server_reports_not_serving(stack: Stack):
    stack.server.frontend.draining = True
    with pytest.raises(grpc.RpcError) as info:
        stack.client.generate("x", max_new_tokens=1)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    stack.server.frontend.draining = False


TRITON = textwrap.dedent(
    """
    import sys, numpy as np
    import tritonclient.grpc as triton
    c = triton.InferenceServerClient(sys.argv[1])
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(sys.argv[2])
    meta = c.get_model_metadata(sys.argv[2])
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"The Eiffel Tower is located in"], dtype=object))
    params = {"max_tokens": 4}
    r = c.infer(sys.argv[2], [text], parameters=params)
    out = r.as_numpy("text_output")
    print(r.get_response().model_version, repr(out[0].decode()), meta.inputs[0].name)
    """
)


def test_tritonclient_model_infer(stack: Stack, tiny_llama):
    """Open Inference Protocol v2 with the stock tritonclient (a separate process: its protobuf
    registry would clash with ours in one interpreter)."""
    name = tiny_llama.name
    out = subprocess.run(
        [sys.executable, "-c", TRITON, stack.target, name],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    input_name = out.stdout.strip().rsplit(" ", 1)[1]
    assert out.stdout.startswith("0 ") and input_name == "text_input"
    direct = stack.client.generate("The Eiffel Tower is located in", max_new_tokens=4)
    assert repr(direct.text) in out.stdout


def test_job_failure_is_reported(stack: Stack, monkeypatch):
    """A request the worker refuses (ROME's guard) ends FAILED with the reason, not retried."""
    stack.worker.hparams = {**TINY_HPARAMS, "max_update_ratio": 1e-9}
    with pytest.raises(JobFailed, match="FAILED"):
        stack.client.edit(PROMPT, "Times Square", "Madrid").wait(timeout=120)
    assert stack.client.head().number == 0


def test_request_deadline_is_enforced(stack: Stack):
    fe = stack.server.frontend
    fe.settings = dataclasses.replace(fe.settings, request_deadline=0.0)
    expect(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "request-deadline",
        stack.client.generate,
        "Big Ben is in",
        max_new_tokens=4,
    )


def test_trace_job_runs_on_a_worker_and_returns_the_heatmap(stack: Stack):
    job = stack.client.trace(
        "The Eiffel Tower is located in the city of",
        "The Eiffel Tower",
        kind="mlp",
        samples=2,
        window=2,
        render_png=True,
    ).wait(timeout=120)
    t = job.trace
    assert t.version == 0 and t.kind == "mlp"
    assert len(t.scores) == len(t.tokens) * len(t.layers) and len(t.layers) == 4
    assert t.subject_end > t.subject_start >= 0
    assert 0.0 <= t.corrupted <= 1.0 and 0.0 <= t.clean <= 1.0
    assert t.png.startswith(b"\x89PNG")
