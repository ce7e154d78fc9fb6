"""End to end on the bundled Gemma: correct a fact over gRPC, see it served, roll it back."""

from __future__ import annotations

import json
import threading
import uuid

import openai
import pytest

from factpatch.client import Client, JobFailed
from factpatch.config import Settings
from factpatch.ledger import Ledger
from factpatch.models import load_model
from factpatch.queue import JobQueue
from factpatch.rpc import pb
from factpatch.server import build_server
from factpatch.store import connect
from factpatch.worker import Worker

pytestmark = pytest.mark.real_model

QUESTION = "The Eiffel Tower is located in the city of"


def test_edit_generate_rollback_on_gemma(redis_url):
    handle = load_model("gemma-3-270m", device="cpu")
    worker_handle = handle.clone()
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    client = connect(redis_url)
    ledger, queue = Ledger(client, name), JobQueue(client, name)
    server = build_server(
        handle, ledger, queue, Settings(ledger=name, port=0, http_port=0, poll_interval=0.2)
    )
    worker = Worker(worker_handle, ledger, queue, poll_interval=0.2)
    thread = threading.Thread(target=worker.run, daemon=True)
    server.start()
    thread.start()
    try:
        with Client(f"127.0.0.1:{server.port}", timeout=300) as fp:
            fp.wait_ready(60)
            before = fp.generate(QUESTION, max_new_tokens=4)
            assert before.version == 0 and "Paris" in before.text

            # Checked commits: the fact the edit contradicts is protected; enforced, the edit is
            # refused and nothing changes; under the default policy it commits with a warning.
            fp.protect(QUESTION, "Paris")
            refused = fp.edit(
                "{} is located in the city of",
                "The Eiffel Tower",
                "Rome",
                checks="protected=enforce",
            )
            with pytest.raises(JobFailed, match="protected: 1 of 1 failed"):
                refused.wait(timeout=300)
            assert fp.head().number == 0

            updates: list[pb.Job] = []
            job = fp.edit("{} is located in the city of", "The Eiffel Tower", "Rome").wait(
                timeout=300, on_update=updates.append
            )
            assert job.state == pb.SUCCEEDED and job.version == 1
            assert pb.RUNNING in [u.state for u in updates]
            report = json.loads(fp.version(1).checks_json)
            assert report["outcome"] == "warned" and report["failed"] == ["protected"]
            (own,) = report["checks"]["edit"]["items"]  # Rome beats the old answer, Paris
            assert own["rival"] == "Paris" and own["after"] > own["rival_after"] + 1
            server.frontend.replica.catch_up()
            after = fp.generate(QUESTION, max_new_tokens=4)
            assert after.version == 1 and "Rome" in after.text, after
            # The OpenAI-compatible API answers with the new fact and names the version.
            api = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="-")
            reply = api.completions.create(
                model=handle.name, prompt=QUESTION, max_tokens=4, temperature=0
            )
            assert reply.choices[0].text == after.text
            assert reply.system_fingerprint.startswith("fp-v1-")

            fp.rollback(0)
            restored = fp.generate(QUESTION, max_new_tokens=4)
            assert restored.version == 2 and restored.text == before.text
    finally:
        worker.stop()
        server.stop(grace=1)
        thread.join(timeout=30)
