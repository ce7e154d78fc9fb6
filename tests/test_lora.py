"""Ledger versions exported as LoRA adapters (factpatch/ledger/lora.py), loaded back through the
real ``peft`` package: the same greedy tokens as factpatch's materialised version, logits within
float32 round-off (tolerance measured: below 2e-5 on the tiny models, see LOGIT_TOLERANCE)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

from factpatch.cli import main
from factpatch.editing import compute_edit, compute_memit
from factpatch.ledger import Ledger
from factpatch.ledger.lora import export_lora
from factpatch.ledger.writer import LedgerWriter
from factpatch.runtime import Replica
from tests.conftest import REQUESTS, TINY_MEMIT, TINY_ROME

# Largest |logit difference| seen between the adapter and the materialised version, over every
# family and prompt here, was < 2e-5 (float32: W x + B(A x) against (W + B A) x).
LOGIT_TOLERANCE = 1e-4
PROMPTS = [r.prompt.format(r.subject) for r in REQUESTS] + ["A language model stores"]


def greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def compare(ours: torch.nn.Module, lora: torch.nn.Module, tokenizer) -> float:
    worst = 0.0
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            a = ours(input_ids=torch.tensor([ids])).logits.float()
            b = lora(input_ids=torch.tensor([ids])).logits.float()
        worst = max(worst, float((a - b).abs().max()))
        assert greedy(ours, ids, 8) == greedy(lora, ids, 8), prompt
    return worst


def test_rome_and_memit_versions_export_as_lora(tiny, ledger: Ledger, tmp_path):
    base = copy.deepcopy(tiny.model)
    replica = Replica(tiny, ledger).start()
    rome = compute_edit(tiny, REQUESTS[0], TINY_ROME)
    LedgerWriter(replica.ledger, replica).add_edits(
        [rome], [[REQUESTS[0].to_dict()]], replica.version
    )
    memit = compute_memit(tiny, REQUESTS[1:], TINY_MEMIT)  # on version 1's weights
    requests = [[r.to_dict() for r in REQUESTS[1:]]]
    LedgerWriter(replica.ledger, replica).add_edits(
        [memit], requests, replica.version, method="memit"
    )
    for version, terms in ((1, [1]), (2, [2, 3])):  # MEMIT: 2 terms on layers 0 and 1
        replica.apply(version)
        out = tmp_path / f"v{version}"
        info = export_lora(ledger, version, out)
        assert sorted(info["modules"].values()) == terms
        assert info["rank"] == max(terms)
        assert info["fingerprint"] == ledger.get(version).fingerprint
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == config["lora_alpha"] == info["rank"]
        assert config["fan_in_fan_out"] == tiny.adapter.weight_in_out
        lora = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
        worst = compare(tiny.model, lora, tiny.tokenizer)
        assert worst <= LOGIT_TOLERANCE


def test_cli_export_and_refusals(tiny_llama, ledger: Ledger, redis_url, tmp_path, capsys):
    replica = Replica(tiny_llama, ledger).start()
    store = ["--redis-url", redis_url, "--ledger", ledger.name]
    assert main(["ledger", "export-lora", "--version", "0", str(tmp_path / "none"), *store]) == 2
    assert "version: 0 has no active edits" in capsys.readouterr().err
    delta = compute_edit(tiny_llama, REQUESTS[0], TINY_ROME)
    LedgerWriter(replica.ledger, replica).add_edits(
        [delta], [[REQUESTS[0].to_dict()]], replica.version
    )
    out = tmp_path / "v1"
    assert main(["ledger", "export-lora", "--version", "1", str(out), *store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == 1 and info["rank"] == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "factpatch.json",
    ]
    assert main(["ledger", "export-lora", "--version", "9", str(tmp_path / "x"), *store]) != 0


@pytest.mark.real_model
def test_rome_and_memit_versions_of_the_bundled_gemma_export_as_lora(ledger: Ledger, tmp_path):
    from factpatch.editing import EditRequest, default_memit_hparams
    from factpatch.models import load_model

    handle = load_model("gemma-3-270m", device="cpu")
    base = copy.deepcopy(handle.model)
    replica = Replica(handle, ledger).start()
    eiffel = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
    LedgerWriter(replica.ledger, replica).add_edits(
        [compute_edit(handle, eiffel)], [[eiffel.to_dict()]], replica.version
    )
    louvre = EditRequest("{} is located in the city of", "The Louvre", "Berlin")
    memit = compute_memit(handle, [louvre], default_memit_hparams(handle))
    LedgerWriter(replica.ledger, replica).add_edits(
        [memit], [[louvre.to_dict()]], replica.version, method="memit"
    )
    for version, subject, target in ((1, "The Eiffel Tower", "Rome"), (2, "The Louvre", "Berlin")):
        replica.apply(version)
        export_lora(ledger, version, tmp_path / f"v{version}")
        lora = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / f"v{version}"))
        ids = handle.tokenizer(f"{subject} is located in the city of")["input_ids"]
        ours = greedy(handle.model, ids, 4)
        assert ours == greedy(lora.eval(), ids, 4)
        assert target in handle.tokenizer.decode(ours[len(ids) :])
        with torch.no_grad():
            a = handle.model(input_ids=torch.tensor([ids])).logits
            b = lora(input_ids=torch.tensor([ids])).logits
        assert float((a - b).abs().max()) <= 1e-3  # 262k logits of size ~30: float32 round-off
