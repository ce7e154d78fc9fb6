"""The five-minute tour, run against a live service (``factpatch up --tour``, ``make run``):
ask, correct a fact, ask again, roll back, ask again — each answer naming its version.

Questions go through the OpenAI-compatible HTTP API (as an application would ask; plain
``urllib``, the same request as the README's ``curl``) when the service serves it, through gRPC
otherwise; the edit and the rollback go through gRPC.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from collections.abc import Callable

from factpatch.client import Client

QUESTION = "The Eiffel Tower is located in the city of"


def ask_openai(base_url: str, token: str | None, model: str, prompt: str) -> tuple[str, str]:
    """(completion text, system_fingerprint) of one greedy completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0}
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        base_url + "/completions", data=json.dumps(body).encode(), headers=headers
    )
    with urllib.request.urlopen(request, timeout=600) as reply:
        answer = json.loads(reply.read())
    return answer["choices"][0]["text"], answer["system_fingerprint"]


def run_tour(
    target: str,
    token: str | None = None,
    say: Callable[[str], None] = print,
    http: tuple[str, str] | None = None,  # (base URL ending in /v1, model name)
) -> None:
    with Client(target, token=token, timeout=600) as fp:
        fp.wait_ready()
        start = fp.head().number

        def ask() -> None:
            if http is None:
                g = fp.generate(QUESTION, max_new_tokens=6)
                say(f"    [version {g.version}] {QUESTION}{g.text}")
            else:
                text, fingerprint = ask_openai(http[0], token, http[1], QUESTION)
                say(f"    [{fingerprint}] {QUESTION}{text}")

        if http is not None:
            say(f"\nQuestions go to the OpenAI-compatible API at {http[0]}; the answer's")
            say("system_fingerprint fp-v<N>-<hash> names the ledger version that wrote it.")

        say("\n1. Ask:")
        ask()
        say('2. Correct it ("The Eiffel Tower is in Rome") — ROME computes a rank-one update:')
        t = time.perf_counter()
        job = fp.edit("{} is located in the city of", "The Eiffel Tower", "Rome").wait(
            on_update=lambda j: None
        )
        seconds = time.perf_counter() - t
        say(f"    job {job.id[:12]} committed version {job.version} in {seconds:.1f} s")
        checks = json.loads(job.result_json).get("checks")  # absent with --checks off
        own = (checks or {}).get("checks", {}).get("edit", {}).get("items", [{}])[0]
        if "rival_after" in own:
            new, old = math.exp(own["after"]), math.exp(own["rival_after"])  # per token
            say(
                f"    checked before commit: P({own['answer']}) {new:.3f} against "
                f"P({own['rival']}) {old:.1e}; checks {checks['outcome']}"
            )
        _until_served(fp, job.version)
        say("3. Ask again:")
        ask()
        change = fp.rollback(start)
        say(f"4. Roll back to version {start}: new version {change.version.number}, same weights")
        _until_served(fp, change.version.number)
        say("5. Ask again:")
        ask()
        say("\nThe ledger: factpatch client --target " + target + " ledger\n")


def _until_served(fp: Client, version: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while fp.served().version < version and time.monotonic() < deadline:
        time.sleep(0.1)
