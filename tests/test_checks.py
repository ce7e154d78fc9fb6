"""Checked commits: a candidate version is scored before it commits and refused under
``enforce`` (factpatch/checks).  Real Redis, real gRPC, a real worker on a tiny model."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import uuid

import grpc
import pytest
import torch

from factpatch.checks import CHECKS, DEFAULT_POLICY, FactChecks, format_policy, parse_policy
from factpatch.checks.scoring import (
    EARLIER_SAMPLE,
    KEEP_TOLERANCE,
    Checker,
    Earlier,
    Protected,
    sample_earlier,
)
from factpatch.client import JobFailed
from factpatch.editing import EditRequest, apply_delta, compute_edit
from factpatch.evaluation.generation import generate
from factpatch.ledger import Ledger
from factpatch.ledger.protected import ProtectedFacts, UnknownProtectedError
from factpatch.ledger.snapshot import export, import_
from factpatch.models.loading import tensor_sha256
from factpatch.queue import JobQueue, JobState
from factpatch.rpc import pb
from factpatch.store import connect
from tests.conftest import TINY_ROME
from tests.procs import Proc
from tests.test_faults import start_server, worker
from tests.test_service import PROMPT, TINY_HPARAMS, Stack, running_stack

EIFFEL = PROMPT.format("The Eiffel Tower")


# -- the policy ---------------------------------------------------------------------------


def test_policy_parses_one_word_or_per_check_and_names_the_field():
    assert parse_policy("") == DEFAULT_POLICY
    assert parse_policy("warn") == dict.fromkeys(CHECKS, "warn")
    mixed = parse_policy("protected=enforce, fluency=off")
    assert mixed == {**DEFAULT_POLICY, "protected": "enforce", "fluency": "off"}
    assert parse_policy("edit=warn", base=mixed)["protected"] == "enforce"  # over the server's
    with pytest.raises(ValueError, match=r"^options\.checks: 'speling'"):
        parse_policy("speling=warn", where="options.checks")
    with pytest.raises(ValueError, match=r"^checks: 'strict' is not a policy"):
        parse_policy("edit=strict")


def test_fact_checks_validate_each_prompt():
    ok = FactChecks.build("Big Ben", ["Where is Big Ben? In"], ["Paris is in"], "edits[0]")
    assert ok.to_dict() == {"paraphrases": ["Where is Big Ben? In"], "neighbours": ["Paris is in"]}
    with pytest.raises(ValueError, match=r"^edits\[2\]\.paraphrases\[1\]: does not contain"):
        FactChecks.build("Big Ben", ["Big Ben is in", "It is in"], [], "edits[2]")
    with pytest.raises(ValueError, match=r"^edits\[0\]\.neighbours\[0\]: must be a non-empty"):
        FactChecks.build("Big Ben", [], [" "], "edits[0]")
    with pytest.raises(ValueError, match=r"^edits\[0\]\.neighbours: 17 prompts"):
        FactChecks.build("Big Ben", [], ["x"] * 17, "edits[0]")


# -- the scoring, in process ----------------------------------------------------------------


def _greedy_word(handle, prompt: str) -> str:
    (g,) = generate(handle.model, handle.tokenizer, [prompt], max_new_tokens=4)
    return g.text.split()[0].strip(".,;:!?\"'()[]")


def _word_the_edit_lowers(handle, request: EditRequest) -> str:
    """A protected answer crafted to break: the one-token word after the edit's prompt whose
    log-probability the edit lowers most (a tiny random model's edits move little else)."""
    delta = compute_edit(handle, request, TINY_ROME)
    twin = dataclasses.replace(handle, model=copy.deepcopy(handle.model), cache={})
    apply_delta(twin, delta)
    ids = torch.tensor([handle.tokenizer(request.text)["input_ids"]])
    with torch.no_grad():
        before, after = (
            torch.log_softmax(m(input_ids=ids).logits[0, -1].float(), -1)
            for m in (handle.model, twin.model)
        )
    for token in (after - before).argsort().tolist()[:500]:
        word = handle.tokenizer.decode([token])
        again = handle.tokenizer(f"{request.text}{word}")["input_ids"]
        if word.startswith(" ") and word[1:].isalpha() and again[-1] == token:
            assert before[token] - after[token] > 2 * KEEP_TOLERANCE
            return word[1:]
    raise AssertionError("no word the edit lowers")


def test_checker_scores_the_candidate_without_touching_the_weights(tiny_llama):
    request = EditRequest(PROMPT, "The Eiffel Tower", "Rome")
    delta = compute_edit(tiny_llama, request, TINY_ROME)
    weights = {p: tensor_sha256(tiny_llama.module(p).weight) for p in delta.factors}
    old = _greedy_word(tiny_llama, EIFFEL)
    lowered = _word_the_edit_lowers(tiny_llama, request)
    protected = [
        Protected("p1", EIFFEL, lowered),
        Protected("p2", "Rome is the capital of", "Italy"),
    ]
    earlier = [Earlier("e1", EditRequest("{} was born in", "Danielle Darrieux", "Paris"))]
    checker = Checker(tiny_llama)
    report = checker.run(
        delta,
        [request],
        [FactChecks(("Where is The Eiffel Tower? It is in",), ())],
        earlier,
        protected,
        {**DEFAULT_POLICY, "protected": "enforce"},
        before="v0",
        after="v1",
        seed="job-1",
    )
    # The edit took: Rome beats the old greedy answer on the prompt (and its paraphrase is
    # scored); the protected fact with the same prompt lost its answer: refused.
    edit = report["checks"]["edit"]
    assert edit["run"] == 2 and edit["items"][0]["passed"] and edit["items"][0]["rival"] == old
    protected_check = report["checks"]["protected"]
    assert not protected_check["passed"] and protected_check["failed"] >= 1
    (lost,) = [i for i in protected_check["items"] if i["source"] == "p1"]
    assert lost["after"] < lost["before"] - report["tolerance"]
    assert report["outcome"] == "refused" and "protected" in report["failed"]
    assert report["checks"]["earlier"]["active"] == 1
    assert {p: tensor_sha256(tiny_llama.module(p).weight) for p in delta.factors} == weights
    # The candidate's scores are kept under its fingerprint ("v1"): checking from "v1" reads
    # its "before" scores there (a fresh forward pass of the unedited weights would show p1's
    # drop again; the cached candidate scores show none).
    assert ("v1", "keep", EIFFEL, lowered) in checker.cache
    again = checker.run(
        delta, [request], [FactChecks()], [], protected, DEFAULT_POLICY, "v1", "v2", "job-2"
    )
    assert again["checks"]["protected"]["run"] == 2 and again["checks"]["protected"]["passed"]


def test_earlier_facts_are_sampled_with_the_job_as_seed(tiny_llama):
    subjects = [f"Person {i}" for i in range(EARLIER_SAMPLE + 10)]
    earlier = [
        Earlier(f"e{i}", EditRequest("{} was born in", s, "Paris")) for i, s in enumerate(subjects)
    ]
    earlier.append(Earlier("same", EditRequest("{} is made of", "The Eiffel Tower", "wood")))
    job = [EditRequest(PROMPT, "The Eiffel Tower", "Rome")]
    a = sample_earlier(earlier, job, random.Random("job-1"))
    b = sample_earlier(earlier, job, random.Random("job-1"))
    assert a == b and len(a) == EARLIER_SAMPLE + 1  # every same-subject fact, then the sample
    assert a[0].edit_id == "same"


# -- protected facts in the ledger ------------------------------------------------------------


def test_protected_facts_are_stored_audited_and_kept_in_snapshots(ledger: Ledger, tmp_path):
    ledger.init("base-hash", "tiny")
    facts = ProtectedFacts(ledger)
    fact = facts.add(EIFFEL, "Paris", actor="alice")
    assert facts.add(EIFFEL, "Paris", actor="bob") == fact  # the same pair: stored once
    assert [f.id for f in facts.list()] == [fact.id]
    with pytest.raises(ValueError, match=r"^answer: must be a non-empty"):
        facts.add(EIFFEL, "  ")
    with pytest.raises(UnknownProtectedError, match="id: no protected fact"):
        facts.remove("nope", actor="alice")
    report_id = ledger.put_report({"outcome": "passed", "checks": {}})
    assert ledger.report(report_id) == {"outcome": "passed", "checks": {}}

    export(ledger, tmp_path / "snap")
    other = Ledger(ledger.redis, f"copy-{uuid.uuid4().hex[:8]}")
    import_(other, tmp_path / "snap")
    assert ProtectedFacts(other).list() == [fact]
    assert other.report(report_id) == ledger.report(report_id)

    facts.remove(fact.id, actor="carol")
    assert facts.list() == []
    audit = facts.audit()
    assert [(a["action"], a["actor"]) for a in audit] == [
        ("protect", "alice"),
        ("unprotect", "carol"),
    ]
    assert all(a["id"] == fact.id for a in audit)


# -- the service ------------------------------------------------------------------------------


@pytest.fixture
def checked(tiny_llama, redis_url):
    """The service with the default check policy (edit=enforce, the rest warn)."""
    with running_stack(tiny_llama, redis_url, checks=format_policy(DEFAULT_POLICY)) as running:
        yield running


def _live(stack: Stack) -> dict[str, str]:
    return dict(stack.client.served().live_hashes)


def test_an_edit_that_passes_commits_with_its_report(checked: Stack, capsys):
    fp = checked.client
    job = fp.edit(
        PROMPT,
        "The Eiffel Tower",
        "Rome",
        paraphrases=["Where is The Eiffel Tower? It is in the city of"],
        neighbours=["Big Ben is located in the city of"],
    ).wait(timeout=120)
    assert job.state == pb.SUCCEEDED and job.version == 1
    result = json.loads(job.result_json)["checks"]
    assert result["computed_on"] == 0 and result["policy"] == DEFAULT_POLICY
    edit = result["checks"]["edit"]
    assert edit["passed"] and [i["rule"] for i in edit["items"]] == ["beat", "beat", "keep"]
    # Stored with the version, content-addressed, and shown by the ledger API and the CLI.
    version = checked.ledger.get(1)
    assert checked.ledger.report(version.cause["checks"]) == result
    assert json.loads(fp.version(1).checks_json) == result
    from factpatch.cli import main

    assert main(["client", "--target", checked.target, "--json", "ledger"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["checks"] is None and listed[1]["checks"] == result


def test_a_dry_run_reports_the_checks_and_commits_nothing(checked: Stack):
    job = checked.client.edit(PROMPT, "The Eiffel Tower", "Rome", dry_run=True).wait(timeout=120)
    result = json.loads(job.result_json)
    assert result["dry_run"] and result["checks"]["checks"]["edit"]["run"] == 1
    assert checked.client.head().number == 0


def test_an_edit_that_breaks_a_protected_fact_is_refused_and_changes_nothing(
    checked: Stack, tiny_llama
):
    fp = checked.client
    lowered = _word_the_edit_lowers(tiny_llama, EditRequest(PROMPT, "The Eiffel Tower", "Rome"))
    fact = fp.protect(EIFFEL, lowered)
    assert [f.id for f in fp.protected()] == [fact.id] and fact.actor == "anonymous"
    live = _live(checked)
    handle = fp.edit(PROMPT, "The Eiffel Tower", "Rome", checks="protected=enforce")
    with pytest.raises(JobFailed, match="checks refused the commit: protected: 1 of 1 failed"):
        handle.wait(timeout=120)
    job = fp.job(handle.id)
    assert job.state == pb.FAILED and job.attempts == 1  # refused, not retried
    report = json.loads(job.result_json)["checks"]
    assert report["outcome"] == "refused" and report["failed"] == ["protected"]
    assert report["checks"]["protected"]["items"][0]["source"] == fact.id
    # Nothing changed: no version, no edit record, the same weights served.
    assert fp.head().number == 0 and checked.ledger.redis.hlen(checked.ledger.k_edits) == 0
    assert _live(checked) == live
    # Under "warn" the same edit commits, and the failure is kept with the version.
    done = fp.edit(PROMPT, "The Eiffel Tower", "Rome", checks="protected=warn").wait(timeout=120)
    kept = checked.ledger.report(checked.ledger.get(done.version).cause["checks"])
    assert kept["outcome"] == "warned" and kept["failed"] == ["protected"]
    # The admin can lift the protection.
    fp.unprotect(fact.id)
    assert fp.protected() == []


def test_a_batch_with_one_bad_fact_is_refused_whole_naming_it(checked: Stack):
    # Two facts of one batch claim the same prompt for different objects, each naming the
    # other's object as the old answer: whichever wins there, the other fact fails its check.
    facts = [
        dict(prompt=PROMPT, subject="The Eiffel Tower", target="Rome", old="Berlin"),
        dict(prompt=PROMPT, subject="The Eiffel Tower", target="Berlin", old="Rome"),
    ]
    handle = checked.client.submit_edits(facts, method="memit")
    with pytest.raises(JobFailed) as failed:
        handle.wait(timeout=180)
    message = failed.value.job.error
    named = [i for i in (0, 1) if f"edits[{i}] " in message]
    assert message.startswith("checks refused the commit: edit: ") and len(named) == 1, message
    report = json.loads(failed.value.job.result_json)["checks"]
    bad = [i for i in report["checks"]["edit"]["items"] if not i["passed"]]
    assert {i["fact"] for i in bad} == set(named)
    assert checked.client.head().number == 0


def test_bad_check_fields_name_the_field_and_queue_nothing(checked: Stack):
    fp = checked.client
    with pytest.raises(grpc.RpcError) as info:
        fp.edit(PROMPT, "Big Ben", "Rome", paraphrases=["It is in"])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("edits[0].paraphrases[0]: does not contain")
    with pytest.raises(grpc.RpcError) as info:
        fp.edit(PROMPT, "Big Ben", "Rome", checks="edit=maybe")
    assert info.value.details().startswith("options.checks: 'maybe' is not a policy")
    with pytest.raises(grpc.RpcError) as info:
        fp.protect(EIFFEL, "")
    assert info.value.details().startswith("answer:")
    with pytest.raises(grpc.RpcError) as info:
        fp.unprotect("0123456789abcdef")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details().startswith("id: no protected fact")
    assert fp.jobs() == [] and fp.protected() == []


def test_the_check_metrics_count_runs_and_refusals(checked: Stack, tiny_llama):
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    refused = value("factpatch_commits_refused_total")
    failed = value("factpatch_checks_total", check="protected", result="failed")
    request = EditRequest(PROMPT, "The Eiffel Tower", "Rome")
    checked.client.protect(EIFFEL, _word_the_edit_lowers(tiny_llama, request))
    handle = checked.client.edit(PROMPT, "The Eiffel Tower", "Rome", checks="protected=enforce")
    with pytest.raises(JobFailed):
        handle.wait(timeout=120)
    assert value("factpatch_commits_refused_total") == refused + 1
    assert value("factpatch_checks_total", check="protected", result="failed") == failed + 1


# -- faults ---------------------------------------------------------------------------------


def test_worker_killed_after_its_check_loses_nothing(model_folder, redis_url, env, procs):
    name = f"chk-fault-{uuid.uuid4().hex[:8]}"
    args = ["--model", model_folder, "--redis-url", redis_url, "--ledger", name]
    args += ["--poll-interval", "0.2", "--metrics-port", "0"]
    ledger, queue = Ledger(connect(redis_url), name), JobQueue(connect(redis_url), name)
    fp = start_server(args, env, procs)
    crashing = worker(args, env, TINY_HPARAMS, FACTPATCH_CRASH_AT="after_check")
    procs.append(crashing)
    job = fp.edit(PROMPT, "The Eiffel Tower", "Rome")
    assert crashing.popen.wait(timeout=300) == 137  # died holding a checked, uncommitted delta
    assert ledger.head() == 0 and queue.get(job.id).state == JobState.RUNNING
    healthy: Proc = worker(args, env, TINY_HPARAMS)
    procs.append(healthy)
    done = job.wait(timeout=180)
    assert done.version == 1 and done.attempts == 2 and ledger.head() == 1
    assert ledger.report(ledger.get(1).cause["checks"])["outcome"] in ("passed", "warned")


def test_cli_protects_facts_and_edits_with_paraphrases_and_a_policy(checked: Stack, capsys):
    from factpatch.cli import main

    client = ["client", "--target", checked.target, "--json"]
    assert main([*client, "protect", "add", "--prompt", EIFFEL, "--answer", "Paris"]) == 0
    fact = json.loads(capsys.readouterr().out)
    assert fact["prompt"] == EIFFEL and fact["answer"] == "Paris" and len(fact["id"]) == 16
    assert main([*client, "protect", "list"]) == 0
    assert [f["id"] for f in json.loads(capsys.readouterr().out)] == [fact["id"]]
    with pytest.raises(SystemExit, match="--id is required"):
        main([*client, "protect", "remove"])

    flags = ["--prompt", PROMPT, "--subject", "The Eiffel Tower", "--target", "Rome"]
    flags += ["--paraphrase", "Where is The Eiffel Tower? In the city of", "--checks", "warn"]
    assert main([*client, "edit", *flags]) == 0
    job = json.loads(capsys.readouterr().out)
    report = json.loads(job["result_json"])["checks"]
    assert job["state"] == "SUCCEEDED" and report["policy"] == dict.fromkeys(CHECKS, "warn")
    assert [i["prompt"] for i in report["checks"]["edit"]["items"]] == [
        EIFFEL,
        "Where is The Eiffel Tower? In the city of",
    ]
    # Without --json: one line with the outcome.
    assert main(["client", "--target", checked.target, "edit", *flags]) == 0
    assert "version 2 committed; checks " in capsys.readouterr().out

    assert main([*client, "protect", "remove", "--id", fact["id"]]) == 0
    capsys.readouterr()
    assert main([*client, "protect", "list"]) == 0
    assert json.loads(capsys.readouterr().out) == []
