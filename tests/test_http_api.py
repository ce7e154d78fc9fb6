"""The OpenAI-compatible HTTP API, called with the real ``openai`` package on loopback: a live
server (tiny model, real Redis, a real worker), the same tokens as the gRPC API."""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
import urllib.request
import uuid

import openai
import pytest
import torch

from factpatch.client import Client
from factpatch.config import Settings
from factpatch.editing import apply_delta
from factpatch.ledger import Ledger
from factpatch.queue import JobQueue
from factpatch.server import build_server
from factpatch.store import connect
from factpatch.worker import Worker
from tests.test_auth import TOKENS, store
from tests.test_service import PROMPT, TINY_HPARAMS

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@dataclasses.dataclass
class Http:
    api: openai.OpenAI  # the infer-scoped "reader" token
    grpc: Client  # the edit-scoped "editor" token
    base_url: str
    server: object
    model: str
    ledger: Ledger


@pytest.fixture
def http(tiny_llama, redis_url):
    name = f"http-{uuid.uuid4().hex[:8]}"
    handle = dataclasses.replace(tiny_llama, tokenizer=copy.deepcopy(tiny_llama.tokenizer))
    handle.tokenizer.chat_template = CHAT_TEMPLATE
    client = connect(redis_url)
    ledger, queue = Ledger(client, name), JobQueue(client, name, heartbeat_ttl=2.0)
    settings = Settings(ledger=name, port=0, http_port=0, poll_interval=0.2, max_new_tokens=64)
    server = build_server(handle, ledger, queue, settings, auth=store()).start()
    worker = Worker(handle.clone(), ledger, queue, "w1", 0.2, hparams=TINY_HPARAMS)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{server.http_port}/v1"
    api = openai.OpenAI(base_url=base_url, api_key=TOKENS["reader"], max_retries=0, timeout=60)
    grpc_client = Client(f"127.0.0.1:{server.port}", token=TOKENS["editor"], timeout=120)
    grpc_client.wait_ready(30)
    yield Http(api, grpc_client, base_url, server, handle.name, ledger)
    grpc_client.close()
    worker.stop()
    server.stop(grace=0.5)
    thread.join(timeout=10)


def fingerprint(ledger: Ledger, version: int) -> str:
    return f"fp-v{version}-{ledger.get(version).fingerprint[:8]}"


def test_models_and_a_completion_name_the_version(http: Http):
    assert [m.id for m in http.api.models.list()] == [http.model]
    raw = http.api.completions.with_raw_response.create(
        model=http.model, prompt="The Eiffel Tower is located in", max_tokens=5, temperature=0
    )
    reply = raw.parse()
    assert raw.headers["x-factpatch-version"] == "0"
    assert reply.system_fingerprint == fingerprint(http.ledger, 0)
    assert len(reply.choices) == 1 and reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage.completion_tokens == 5 or reply.choices[0].finish_reason == "stop"
    prompt_tokens = len(
        http.server.frontend.replica.handle.tokenizer("The Eiffel Tower is located in")["input_ids"]
    )
    assert reply.usage.prompt_tokens == prompt_tokens
    # Greedy is deterministic; n sampled choices with a seed are reproducible.
    again = http.api.completions.create(
        model=http.model, prompt="The Eiffel Tower is located in", max_tokens=5, temperature=0
    )
    assert again.choices[0].text == reply.choices[0].text
    sampled = [
        http.api.completions.create(
            model=http.model, prompt="Rome is", max_tokens=8, temperature=1.0, seed=7, n=3
        )
        for _ in range(2)
    ]
    texts = [[c.text for c in s.choices] for s in sampled]
    assert texts[0] == texts[1] and len(texts[0]) == 3


def test_logprobs_are_the_models(http: Http):
    reply = http.api.completions.create(
        model=http.model, prompt="Rome is", max_tokens=4, temperature=0, logprobs=3
    )
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    # Greedy: the chosen token is the most probable one.  (Top entries are keyed by text, as
    # OpenAI's are, so two byte tokens that both decode to "\ufffd" share one key.)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3 and chosen >= max(top.values()) - 1e-6
    assert "".join(lp.tokens) == reply.choices[0].text
    # The same numbers from plain full forward passes of the served model.
    handle = http.server.frontend.replica.handle
    ids = handle.tokenizer("Rome is")["input_ids"]
    expected = []
    with torch.no_grad():
        for _ in range(4):
            logits = handle.model(input_ids=torch.tensor([ids])).logits[0, -1]
            log_probs = torch.log_softmax(logits.float(), -1)
            ids.append(int(log_probs.argmax()))
            expected.append(float(log_probs.max()))
    assert lp.token_logprobs == pytest.approx(expected, abs=1e-4)


def test_chat_completion_and_its_stream(http: Http):
    messages = [{"role": "user", "content": "Where is the Eiffel Tower?"}]
    reply = http.api.chat.completions.create(
        model=http.model, messages=messages, max_tokens=6, temperature=0
    )
    assert reply.choices[0].message.role == "assistant"
    assert reply.system_fingerprint == fingerprint(http.ledger, 0)
    # The prompt is the chat template's text, tokenized once (its BOS not doubled).
    tok = http.server.frontend.replica.handle.tokenizer
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])

    chunks = list(
        http.api.chat.completions.create(
            model=http.model,
            messages=messages,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == reply.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.system_fingerprint for c in chunks} == {reply.system_fingerprint}
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_completion_stream_ends_with_done(http: Http):
    request = urllib.request.Request(
        http.base_url + "/completions",
        data=json.dumps(
            {
                "model": http.model,
                "prompt": "Rome is",
                "max_tokens": 5,
                "temperature": 0,
                "stream": True,
            }
        ).encode(),
        headers={"Authorization": f"Bearer {TOKENS['reader']}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert reply.headers["x-factpatch-version"] == "0"
        events = [
            line[6:] for line in reply.read().decode().splitlines() if line.startswith("data: ")
        ]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    whole = http.api.completions.create(
        model=http.model, prompt="Rome is", max_tokens=5, temperature=0
    )
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.choices[0].text


def greedy_text(handle, prompt: str, n: int) -> str:
    """n greedy tokens by plain full forward passes (no cache): the reference for the server."""
    ids = handle.tokenizer(prompt)["input_ids"]
    start = len(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(handle.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return handle.tokenizer.decode(ids[start:], skip_special_tokens=True)


def test_an_edit_through_grpc_then_openai_serves_the_new_version(http: Http, tiny_llama):
    """The new fact in words is checked on the bundled Gemma (test_service_real); here, that the
    OpenAI answer after a gRPC edit is exactly the edited weights' and names the new version."""
    prompt = PROMPT.format("The Eiffel Tower")
    base_model = copy.deepcopy(http.server.frontend.replica.handle.model)
    before = http.api.completions.create(
        model=http.model, prompt=prompt, max_tokens=4, temperature=0
    )
    score_before = http.grpc.score(prompt, " Rome")
    job = http.grpc.edit(PROMPT, "The Eiffel Tower", "Rome").wait(timeout=120)
    assert job.version == 1
    http.server.frontend.replica.catch_up()  # don't wait for the poll tick
    raw = http.api.completions.with_raw_response.create(
        model=http.model, prompt=prompt, max_tokens=4, temperature=0
    )
    after = raw.parse()
    assert raw.headers["x-factpatch-version"] == "1"
    assert after.system_fingerprint == fingerprint(http.ledger, 1) != fingerprint(http.ledger, 0)
    twin = dataclasses.replace(tiny_llama, model=base_model, cache={})
    apply_delta(twin, http.ledger.delta(job.edit_ids[0]))
    assert after.choices[0].text == greedy_text(twin, prompt, 4)
    # Any version on any request: "<model>@v0" answers from the base weights, on the same
    # replica; so does the gRPC API with version=0.
    old = http.api.completions.create(
        model=f"{http.model}@v0", prompt=prompt, max_tokens=4, temperature=0
    )
    assert old.choices[0].text == before.choices[0].text
    assert old.system_fingerprint == fingerprint(http.ledger, 0) and old.model.endswith("@v0")
    assert http.grpc.score(prompt, " Rome", version=0).logprob == pytest.approx(
        score_before.logprob, abs=1e-4
    )
    assert http.grpc.generate(prompt, max_new_tokens=4, version=0).text == old.choices[0].text
    with pytest.raises(openai.NotFoundError):
        http.api.completions.create(model=f"{http.model}@v9", prompt=prompt, max_tokens=1)


def test_wrong_token_is_401_and_bad_fields_are_400_naming_them(http: Http):
    wrong = openai.OpenAI(base_url=http.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.models.list()
    assert info.value.status_code == 401 and "token" in info.value.message
    cases = [
        (dict(temperature=-1), "temperature"),
        (dict(max_tokens=10_000), "max_tokens"),
        (dict(n=100), "n"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(presence_penalty=0.5), "presence_penalty"),
    ]
    for kwargs, field in cases:
        with pytest.raises(openai.BadRequestError) as info:
            http.api.completions.create(model=http.model, prompt="Rome is", **kwargs)
        assert info.value.body["param"] == field, (field, info.value.body)
        assert info.value.message.startswith("Error code: 400 - ")
        assert field in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        http.api.completions.create(model=http.model, prompt="x" * 3000, max_tokens=1)
    assert info.value.body["param"] == "prompt" and "max-prompt-chars" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError) as info:
        http.api.completions.create(model="gpt-4", prompt="Rome is", max_tokens=1)
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as info:  # a body field of the wrong type
        http.api.completions.create(model=http.model, prompt="Rome is", extra_body={"seed": "x"})
    assert info.value.body["param"] == "seed"
    assert http.ledger.head() == 0  # nothing changed


def test_health_needs_no_token(http: Http):
    with urllib.request.urlopen(http.base_url.removesuffix("/v1") + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok", "version": 0}


def test_the_tour_asks_through_the_openai_api(http: Http):
    from factpatch.tour import run_tour

    said: list[str] = []
    target = f"127.0.0.1:{http.server.port}"
    run_tour(target, TOKENS["root"], said.append, http=(http.base_url, http.model))
    answers = [line.split("]")[0].strip(" [") for line in said if line.startswith("    [fp-")]
    assert [a[:6] for a in answers] == ["fp-v0-", "fp-v1-", "fp-v2-"]
    assert answers[2][6:] == answers[0][6:] != answers[1][6:]  # rolled back: v0's weights
    (checked,) = [line for line in said if line.startswith("    checked before commit: P(Rome)")]
    assert checked.endswith(("checks passed", "checks warned"))


@pytest.mark.real_model
def test_chat_on_the_bundled_instruct_model(redis_url):
    """SmolLM2-135M-Instruct through its own chat template, with the real SDK."""
    from factpatch.models import load_model

    handle = load_model("smollm2-135m", device="cpu")
    name = f"chat-{uuid.uuid4().hex[:8]}"
    client = connect(redis_url)
    ledger, queue = Ledger(client, name), JobQueue(client, name)
    server = build_server(handle, ledger, queue, Settings(ledger=name, port=0, http_port=0))
    server.start()
    try:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="-")
        reply = api.chat.completions.create(
            model=handle.name,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
        assert "Paris" in reply.choices[0].message.content, reply
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.system_fingerprint.startswith("fp-v0-")
    finally:
        server.stop(grace=1)
