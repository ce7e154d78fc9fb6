"""The web console and its JSON API on a live server (tiny model, real Redis, a real worker).

The JSON API (factpatch/server/gateway.py) is called with plain HTTP; the page is driven in
headless Chromium (Debian's ``chromium``, through the ``playwright`` package; skipped with the
reason where either is missing).  With ``FACTPATCH_SCREENSHOTS=<dir>`` the browser test saves a
screenshot of each view there (docs/images/console_*.png are those).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from factpatch.cli import main
from factpatch.client import Client
from factpatch.config import Settings
from factpatch.ledger import Ledger
from factpatch.ledger.replicas import FORGET_AFTER, STALE_AFTER, ReplicaBoard, ReplicaStatus
from factpatch.queue import JobQueue
from factpatch.server import build_server
from factpatch.store import connect
from tests.test_auth import TOKENS, store
from tests.test_service import PROMPT, running_stack

CHROMIUM = "/usr/bin/chromium"
SUBJECT, TARGET = "The Eiffel Tower", "Rome"


@dataclass
class Console:
    url: str
    ledger: Ledger
    server: Any


@pytest.fixture
def console(tiny_llama, redis_url):
    with running_stack(tiny_llama, redis_url, "warn", auth=store()) as stack:
        yield Console(f"http://127.0.0.1:{stack.server.http_port}", stack.ledger, stack.server)


def call(
    base: str, path: str, body: dict | None = None, token: str | None = "root"
) -> tuple[int, dict]:
    """POST (or GET without ``body``) /api/v1/<path> as the named test token."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {TOKENS[token]}"
    req = urllib.request.Request(f"{base}/api/v1/{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_job(base: str, job_id: str, token: str = "root", timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, job = call(base, "EditService/GetJob", {"job_id": job_id}, token)
        if job["state"] not in ("QUEUED", "RUNNING"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


EDIT = {"prompt": PROMPT, "subject": SUBJECT, "target": TARGET}


# ----------------------------------------------------------------------------- the JSON API


def test_the_json_api_answers_as_the_grpc_api(console):
    status, head = call(console.url, "LedgerService/GetHead", {}, "reader")
    assert status == 200 and head["number"] == "0" and head["cause"] == "base"
    status, me = call(console.url, "session", None, "reader")
    assert status == 200 and me["name"] == "reader" and me["scopes"] == ["infer"]
    _, me = call(console.url, "session", None, "root")
    assert me["scopes"] == ["admin", "edit", "infer"]

    status, job = call(console.url, "EditService/SubmitEdits", {"edits": [EDIT]}, "editor")
    assert status == 200 and job["state"] in ("QUEUED", "RUNNING")
    done = wait_job(console.url, job["id"], "editor")
    assert done["state"] == "SUCCEEDED", done
    assert done["version"] == "1"
    assert console.ledger.get(1).actor == "editor"  # the token's name, as over gRPC

    _, v1 = call(console.url, "LedgerService/GetVersion", {"number": 1}, "reader")
    (edit_id,) = v1["edit_ids"]
    assert json.loads(v1["checks_json"])["outcome"] in ("passed", "warned")
    _, edit = call(console.url, "LedgerService/GetEdit", {"edit_id": edit_id}, "reader")
    assert json.loads(edit["requests_json"])[0]["target"] == TARGET
    assert edit["computed_on"] == "0"

    # Generate (a stream, answered whole) and Score at a chosen version.
    text = PROMPT.replace("{}", SUBJECT)
    for version in (0, 1):
        status, out = call(
            console.url,
            "GenerateService/Generate",
            {"prompt": text, "version": version, "max_new_tokens": 4, "temperature": 0},
            "reader",
        )
        assert status == 200 and {m["version"] for m in out["messages"]} == {str(version)}
    scores = [
        call(
            console.url,
            "GenerateService/Score",
            {"prompt": text, "continuation": " Rome", "version": v},
            "reader",
        )[1]
        for v in (0, 1)
    ]
    s0, s1 = scores
    assert s0["version"] == "0" and s1["version"] == "1" and s1["logprob"] > s0["logprob"]

    # Every live replica reports the version it serves.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, listed = call(console.url, "LedgerService/ListReplicas", {}, "reader")
        if [r["version"] for r in listed["replicas"]] == ["1"]:
            break
        time.sleep(0.2)
    (replica,) = listed["replicas"]
    assert replica["server"].endswith(f":{console.server.port}") and replica["ready"] is True
    assert replica["version"] == "1"


def test_the_json_api_enforces_the_scopes_and_changes_nothing_it_refuses(console):
    refused = [
        ("EditService/SubmitEdits", {"edits": [EDIT]}, "reader", 403, "PERMISSION_DENIED"),
        ("TraceService/SubmitTrace", {"prompt": "a b", "subject": "a"}, "reader", 403, None),
        ("LedgerService/Rollback", {"to": 0}, "reader", 403, None),
        ("LedgerService/Rollback", {"to": 0}, "editor", 403, "PERMISSION_DENIED"),
        ("TokenService/AddToken", {"name": "x", "scopes": ["admin"]}, "editor", 403, None),
        ("LedgerService/GetHead", {}, None, 401, "UNAUTHENTICATED"),
        ("EditService/SubmitEdits", {"edits": [EDIT]}, None, 401, None),
    ]
    for path, body, token, status, code in refused:
        got, answer = call(console.url, path, body, token)
        assert got == status, (path, token, answer)
        if code:
            assert answer["error"]["code"] == code
    status, _ = call(console.url, "session", None, None)
    assert status == 401
    assert console.ledger.head() == 0
    assert console.server.frontend.queue.list(limit=10) == []


def test_the_json_api_names_the_field_of_bad_input(console):
    bad = {"edits": [{"prompt": PROMPT, "subject": SUBJECT, "target": ""}]}
    status, answer = call(console.url, "EditService/SubmitEdits", bad, "editor")
    assert status == 400 and answer["error"]["code"] == "INVALID_ARGUMENT"
    assert answer["error"]["message"].startswith("edits[0].target:")
    status, answer = call(console.url, "EditService/SubmitEdits", {"edit": []}, "editor")
    assert status == 400 and answer["error"]["message"].startswith("body:")
    assert "edit" in answer["error"]["message"]
    status, answer = call(console.url, "LedgerService/GetVersion", {"number": 7}, "reader")
    assert status == 404 and answer["error"]["code"] == "NOT_FOUND"
    for path in ("LedgerService/WatchHead", "EditService/WatchJob", "NoService/Nothing"):
        status, answer = call(console.url, path, {}, "root")
        assert status == 404 and "not offered" in answer["error"]["message"]
    assert console.ledger.head() == 0
    assert console.server.frontend.queue.list(limit=10) == []


def test_the_console_is_served_with_a_strict_policy_and_can_be_turned_off(tiny_llama, redis_url):
    for no_console in (False, True):
        with running_stack(tiny_llama, redis_url, "warn", store(), no_console=no_console) as stack:
            base = f"http://127.0.0.1:{stack.server.http_port}"
            if no_console:
                for path in ("/console", "/api/v1/session"):
                    with pytest.raises(urllib.error.HTTPError) as err:
                        urllib.request.urlopen(base + path, timeout=30)
                    assert err.value.code == 404
                continue
            with urllib.request.urlopen(base + "/console", timeout=30) as res:
                page = res.read().decode()
                policy = res.headers["content-security-policy"]
            assert "default-src 'self'" in policy and "script-src 'self'" in policy
            assert "/console/static/console.js" in page and "http" not in page.split("<body")[1]
            with urllib.request.urlopen(base + "/console/static/console.js", timeout=30) as res:
                assert "api/v1/" in res.read().decode()


# ----------------------------------------------------------------------------- the page


def _browser_or_skip() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("console browser test: the playwright package is not installed")
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        pytest.skip(f"console browser test: no Chromium at {CHROMIUM} (Debian package chromium)")
    return sync_playwright


ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser():
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
        chromium = p.chromium.launch(executable_path=executable, headless=True, args=ARGS)
        yield chromium
        chromium.close()


def _shots(tmp_path: Path) -> Path:
    return Path(os.environ.get("FACTPATCH_SCREENSHOTS") or tmp_path)


def _sign_in(page: Any, url: str, token: str) -> None:
    page.goto(url + "/console")
    page.fill("#token", TOKENS[token])
    page.click("#signin-form button")
    page.wait_for_selector(f"text=signed in as {token}")


def test_an_admin_corrects_asks_locates_and_rolls_back_in_the_page(console, browser, tmp_path):
    shots = _shots(tmp_path)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    _sign_in(page, console.url, "root")
    page.wait_for_selector("#versions tr[data-version='0']")
    assert "the base weights" in page.inner_text("#versions tr[data-version='0']")

    # Correct: one fact; the job's progress, then the new version.
    page.click("button[data-view=correct]")
    page.fill("#edit-prompt", PROMPT)
    page.fill("#edit-subject", SUBJECT)
    page.fill("#edit-target", TARGET)
    page.click("#edit-form button")
    page.wait_for_selector("text=committed as version 1", timeout=120_000)
    page.screenshot(path=str(shots / "console_correct.png"))
    assert console.ledger.head() == 1 and console.ledger.get(1).actor == "root"

    # Timeline: v1 with its fact, its report, and the replica serving it.
    page.click("button[data-view=timeline]")
    row = page.wait_for_selector("#versions tr[data-version='1']")
    assert f"{SUBJECT} is located in the city of → {TARGET}" in row.inner_text()
    assert "checks" in row.inner_text()
    page.wait_for_selector("#versions tr[data-version='1'] .badge.serving", timeout=10_000)
    page.wait_for_selector("#replicas td.serves:text('v1')", timeout=10_000)
    page.screenshot(path=str(shots / "console_timeline.png"), full_page=True)

    # Ask: v1 against v0, the differing tokens marked, P(" Rome") under each.
    page.click("button[data-view=ask]")
    page.fill("#ask-prompt", PROMPT.replace("{}", SUBJECT))
    page.select_option("#ask-a", "1")
    page.select_option("#ask-b", "0")
    page.fill("#ask-cont", " Rome")
    page.click("#ask-form button")
    page.wait_for_selector(".answer[data-version='1'] .score")
    assert page.locator(".answer[data-version='1'] .tok.diff").count() >= 1
    p1 = float(page.inner_text(".answer[data-version='1'] .score").split("=")[1])
    p0 = float(page.inner_text(".answer[data-version='0'] .score").split("=")[1])
    assert p1 > p0
    page.screenshot(path=str(shots / "console_ask.png"))

    # Locate: the three traces' heatmaps.
    page.click("button[data-view=locate]")
    page.fill("#trace-prompt", PROMPT.replace("{}", SUBJECT))
    page.fill("#trace-subject", SUBJECT)
    page.fill("#trace-samples", "2")
    page.click("#trace-form button")
    for kind in ("hidden", "mlp", "attn"):
        page.wait_for_selector(f".trace[data-kind={kind}] img", timeout=180_000)
    page.screenshot(path=str(shots / "console_locate.png"), full_page=True)

    # Undo: roll back to v0; the confirmation lists what goes, then v2 is the head.
    page.click("button[data-view=timeline]")
    page.click("#versions tr[data-version='0'] button.rollback")
    page.wait_for_selector("#confirm:not([hidden])")
    assert f"removed: {SUBJECT} is located in the city of → {TARGET}" in page.inner_text("#confirm")
    page.screenshot(path=str(shots / "console_undo.png"))
    assert console.ledger.head() == 1  # nothing changes before the confirmation
    page.click("#confirm-yes")
    row = page.wait_for_selector("#versions tr[data-version='2']", timeout=30_000)
    assert "rollback" in row.inner_text()
    assert console.ledger.head() == 2 and console.ledger.get(2).edits == ()
    assert errors == []


def test_an_editor_uploads_a_batch_and_an_admin_reverts_it_in_the_page(console, browser, tmp_path):
    facts = tmp_path / "facts.jsonl"
    batch = [
        {"prompt": PROMPT, "subject": SUBJECT, "target": TARGET},
        {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target": "soccer"},
    ]
    facts.write_text("".join(json.dumps(f) + "\n" for f in batch))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(batch[0]) + "\n{not json\n")

    editor = browser.new_page()
    _sign_in(editor, console.url, "editor")
    editor.wait_for_selector("#versions tr[data-version='0']")
    assert editor.locator("button.rollback, button.revert").count() == 0  # undo needs admin
    editor.click("button[data-view=correct]")
    editor.set_input_files("#batch-file", str(broken))
    editor.click("#batch-form button")
    editor.wait_for_selector("#edit-error:text('line 2: not JSON')")
    assert console.server.frontend.queue.list(limit=10) == []  # nothing was sent
    editor.set_input_files("#batch-file", str(facts))
    editor.click("#batch-form button")
    editor.wait_for_selector("text=committed as version 1", timeout=180_000)
    (edit_id,) = console.ledger.get(1).edits
    assert console.ledger.delta(edit_id).provenance["method"] == "memit"

    admin = browser.new_page()
    _sign_in(admin, console.url, "root")
    row = admin.wait_for_selector("#versions tr[data-version='1']")
    text = row.inner_text()
    assert "Michael Jordan plays the sport of → soccer" in text and "editor" in text
    admin.click(f"#versions tr[data-version='1'] button.revert[data-edit='{edit_id}']")
    admin.wait_for_selector("#confirm:not([hidden])")
    listed = admin.inner_text("#confirm")
    assert "removed: Michael Jordan plays the sport of → soccer" in listed
    assert f"removed: {SUBJECT} is located in the city of → {TARGET}" in listed
    admin.click("#confirm-yes")
    row = admin.wait_for_selector("#versions tr[data-version='2']", timeout=30_000)
    assert "revert" in row.inner_text()
    assert console.ledger.get(2).edits == () and console.ledger.get(2).cause["kind"] == "revert"


def test_a_reader_sees_no_write_controls_and_a_forged_write_is_refused(console, browser):
    page = browser.new_page()
    _sign_in(page, console.url, "reader")
    page.wait_for_selector("#versions tr[data-version='0']")
    assert not page.is_visible("button[data-view=correct]")
    assert not page.is_visible("button[data-view=locate]")
    assert page.locator("button.rollback, button.revert").count() == 0
    assert page.is_visible("button[data-view=ask]")
    # What the page hides, the server refuses: the same calls, made from the page as the reader.
    forged = page.evaluate(
        """async (edit) => {
            const token = sessionStorage.getItem("factpatch-token");
            const post = (path, body) => fetch("/api/v1/" + path, {method: "POST",
                headers: {authorization: "Bearer " + token, "content-type": "application/json"},
                body: JSON.stringify(body)}).then(async (r) => [r.status, await r.json()]);
            return [await post("EditService/SubmitEdits", {edits: [edit]}),
                    await post("LedgerService/Rollback", {to: 0})];
        }""",
        EDIT,
    )
    for status, answer in forged:
        assert status == 403 and answer["error"]["code"] == "PERMISSION_DENIED"
    assert console.ledger.head() == 0


# ----------------------------------------------------------------------------- the replica board


def test_the_replica_board_lists_live_servers_and_drops_silent_ones(tiny_llama, redis_url, capsys):
    name = f"board-{uuid.uuid4().hex[:8]}"
    client = connect(redis_url)
    ledger, queue = Ledger(client, name), JobQueue(client, name)
    settings = Settings(ledger=name, port=0, http_port=0, poll_interval=0.2)
    servers = [
        build_server(h, ledger, queue, settings, auth=store()).start()
        for h in (tiny_llama, tiny_llama.clone())
    ]
    sdk = Client(f"127.0.0.1:{servers[0].port}", token=TOKENS["reader"], timeout=30)
    try:
        deadline = time.monotonic() + 10
        while len(sdk.replicas()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        listed = {r.server: r for r in sdk.replicas()}
        assert set(listed) == {s.name for s in servers}
        assert all(r.version == 0 and r.ready for r in listed.values())
        target = ["--target", f"127.0.0.1:{servers[1].port}", "--token", TOKENS["reader"]]
        assert main(["client", *target, "replicas", "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert sorted(r["server"] for r in printed) == sorted(listed)
        servers[1].stop(grace=0.5)  # a stopped server takes itself off the board
        assert [r.server for r in sdk.replicas()] == [servers[0].name]
    finally:
        sdk.close()
        for s in servers:
            s.stop(grace=0.5)

    board = ReplicaBoard(ledger)  # one that stops reporting (killed) is not listed after 10 s
    now = time.time()
    board.report(ReplicaStatus("gone:1", 3, True, "", now - STALE_AFTER - 1))
    board.report(ReplicaStatus("old:1", 3, True, "", now - FORGET_AFTER - 1))
    board.report(ReplicaStatus("here:1", 4, True, "", now))
    assert [r.server for r in board.list(now)] == ["here:1"]
    assert set(ledger.redis.hkeys(board.key)) == {b"gone:1", b"here:1"}  # "old" is deleted
