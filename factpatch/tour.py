"""The five-minute tour, run against a live service (``factpatch up --tour``, ``make run``):
ask, correct a fact, ask again, roll back, ask again — each answer naming its version."""

from __future__ import annotations

import time
from collections.abc import Callable

from factpatch.client import Client

QUESTION = "The Eiffel Tower is located in the city of"


def run_tour(target: str, token: str | None = None, say: Callable[[str], None] = print) -> None:
    with Client(target, token=token, timeout=600) as fp:
        fp.wait_ready()
        start = fp.head().number

        def ask() -> None:
            g = fp.generate(QUESTION, max_new_tokens=6)
            say(f"    [version {g.version}] {QUESTION}{g.text}")

        say("\n1. Ask:")
        ask()
        say('2. Correct it ("The Eiffel Tower is in Rome") — ROME computes a rank-one update:')
        t = time.perf_counter()
        job = fp.edit("{} is located in the city of", "The Eiffel Tower", "Rome").wait(
            on_update=lambda j: None
        )
        seconds = time.perf_counter() - t
        say(f"    job {job.id[:12]} committed version {job.version} in {seconds:.1f} s")
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
