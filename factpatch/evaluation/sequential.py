"""Many edits, one after another: CounterFact edits applied cumulatively in batches.

``N`` records are edited in batches of ``B`` on a model that keeps every earlier batch
(materialised exactly from a kept copy of the base tensors: ``base + Σ deltas`` in float32,
:func:`factpatch.editing.materialize`).  After every batch the efficacy, paraphrase and
neighbourhood scores of *all* facts edited so far (and the perplexity and fluency below) are
measured (the single-edit definitions,
:mod:`factpatch.evaluation.counterfact`), which gives the curve of quality against the number of
edits (MEMIT, Meng et al. 2022b, sec. 5.2; AlphaEdit, Fang et al. 2025, sec. 4).  Before the
first batch and after the last one it also measures

* **fluency**: the weighted bi-/tri-gram entropy of generations (ROME/MEMIT papers: 2/3·H₂ +
  4/3·H₃, averaged over n and then over texts; bits) from the edited facts' prompts, top-5
  sampling with a fixed seed;
* **perplexity** on held-back Wikipedia paragraphs: the *last* paragraphs of the bundled corpus
  in its sorted order, which covariance statistics never read (corpus.HELD_OUT; the run's JSON
  records the indices, and how many paragraphs the covariance read).

Methods: ``rome`` (plain ROME, one edit after another on the edited model; a batch is just a
checkpoint), ``memit`` and ``alphaedit`` (one delta per batch, given the deltas before it,
as a worker computes it on a ledger version: :func:`factpatch.editing.memit.compute_batch`).

With ``gate`` τ every measurement is of the model as served with key-gated edits
(:mod:`factpatch.editing.gate`: the base weights plus ``g(k)·ΔW k`` at the edited layers); the
deltas are computed as always, on ``base + Σ deltas``.

Runs can be split: with ``checkpoint`` set, every batch's delta (and the curve so far) is
saved, and a later call with the same folder continues from there.  The base
weights are restored bit-for-bit at the end of every call (checked against the weights hash).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from factpatch.corpus import load_corpus
from factpatch.editing import (
    DegenerateEditError,
    Delta,
    MemitHParams,
    RomeHParams,
    base_weights,
    compute_edit,
    load_weights,
    materialize,
)
from factpatch.editing.covariance import layer_covariances
from factpatch.editing.gate import gated
from factpatch.editing.hparams import recorded_settings
from factpatch.editing.memit import compute_batch
from factpatch.editing.prompts import continuation, pad_batch
from factpatch.editing.templates import context_templates
from factpatch.evaluation.counterfact import request_for, summarise
from factpatch.evaluation.generation import ngram_entropy
from factpatch.models.hooks import StopForward, run_until_stop, thread_hooks
from factpatch.models.loading import ModelHandle, weights_hash

METHODS = ("rome", "memit", "alphaedit")
# Held-back paragraphs for perplexity. 16 (≈ 2,000 tokens, the first runs' setting) proved too few
# to rank settings: on 256 two runs' difference at 300 edits shrank from 3.8 to 0.6 points
# (research/NOTES.md); a resumed run keeps the set it started with.
PPL_PARAGRAPHS = 256
PAIR_KEYS = ("rewrite_new", "rewrite_true", "para_new", "para_true", "nb_new", "nb_true")


# --- metrics ----------------------------------------------------------------------------------


@torch.no_grad()
def final_hidden(handle: ModelHandle, ids: torch.Tensor) -> torch.Tensor:
    """The final norm's output [B, T, d]: the whole model except the LM head."""
    out: dict[str, torch.Tensor] = {}

    def keep(_module, _args, output):
        out["h"] = output
        raise StopForward

    with thread_hooks(forward=[(handle.module(handle.adapter.final_norm), keep)]):
        run_until_stop(handle.model, input_ids=ids, use_cache=False)
    return out["h"]


@torch.no_grad()
def score_pairs(
    handle: ModelHandle, pairs: list[tuple[str, str]], rows_per_pass: int = 48
) -> list[float]:
    """Mean token log-probability of each ``target`` after its ``prompt``: the same quantity as
    :func:`factpatch.editing.prompts.continuation_logprobs`, with the LM head evaluated only at
    the positions that predict a target token (the head is most of the cost on a 262k vocab)."""
    out: list[float] = []
    tok, device = handle.tokenizer, handle.device
    for first in range(0, len(pairs), rows_per_pass):
        encoded = [continuation(tok, p, t) for p, t in pairs[first : first + rows_per_pass]]
        hidden = final_hidden(handle, pad_batch([e[0] for e in encoded], tok.pad_token_id, device))
        rows, pos, targets, owner = [], [], [], []
        for row, (seq, n_prompt) in enumerate(encoded):
            for j in range(n_prompt, len(seq)):
                rows.append(row)
                pos.append(j - 1)
                targets.append(seq[j])
                owner.append(row)
        picked = hidden[torch.tensor(rows, device=device), torch.tensor(pos, device=device)]
        log_probs = torch.log_softmax(handle.head_logits(picked), -1)  # [P, V]
        token_lp = log_probs.gather(1, torch.tensor(targets, device=device)[:, None]).squeeze(1)
        owner_t = torch.tensor(owner, device=device)
        sums = torch.zeros(len(encoded), device=device).index_add_(0, owner_t, token_lp)
        counts = torch.bincount(owner_t, minlength=len(encoded)).float()
        out.extend((sums / counts).tolist())
    return out


def measure_records(handle: ModelHandle, records: list[dict[str, Any]]) -> list[dict[str, float]]:
    """P(new)/P(true) on each record's rewrite, paraphrase and neighbour prompts (as
    :func:`factpatch.evaluation.counterfact.measure`, batched over records)."""
    pairs = []
    for r in records:
        new, true, loc = r["target_new"], r["ground_truth"], r["locality_ground_truth"]
        pairs += [
            (r["prompt"], new),
            (r["prompt"], true),
            (r["rephrase_prompt"], new),
            (r["rephrase_prompt"], true),
            (r["locality_prompt"], new),
            (r["locality_prompt"], loc),
        ]
    probs = [math.exp(lp) for lp in score_pairs(handle, pairs)]
    n = len(PAIR_KEYS)
    return [
        dict(zip(PAIR_KEYS, probs[i * n : (i + 1) * n], strict=True)) for i in range(len(records))
    ]


@torch.no_grad()
def generate_texts(
    handle: ModelHandle, prompts: list[str], max_new_tokens: int = 40, seed: int = 0
) -> list[str]:
    """Prompt + continuation for each prompt: top-5 sampling (as the ROME/MEMIT evaluation),
    seeded, left-padded batches with the KV cache."""
    tok, device = handle.tokenizer, handle.device
    texts: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for first in range(0, len(prompts), 32):
            chunk = prompts[first : first + 32]
            rows = [tok(p)["input_ids"] for p in chunk]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, width - len(r) :] = torch.tensor(r)
                mask[i, width - len(r) :] = 1
            out = handle.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=True,
                top_k=5,
                top_p=1.0,
                temperature=1.0,
                pad_token_id=tok.pad_token_id,
            )
            for prompt, row in zip(chunk, out[:, width:], strict=True):
                texts.append(prompt + tok.decode(row, skip_special_tokens=True))
    return texts


def fluency(handle: ModelHandle, prompts: list[str], max_new_tokens: int = 40) -> dict[str, Any]:
    texts = generate_texts(handle, prompts, max_new_tokens)
    return {
        "ngram_entropy": statistics.fmean(ngram_entropy(t, fold_case=False) for t in texts),
        "n_prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "samples": texts[:3],
    }


def run_paragraphs(report: dict[str, Any]) -> int:
    """How many held-back paragraphs a run's perplexity was measured on (from its report)."""
    first, last = report["perplexity_paragraphs"]["corpus_indices"]
    return last - first + 1


def heldout_paragraphs(corpus: str | None, n: int) -> tuple[list[str], list[int]]:
    """The last ``n`` paragraphs of the corpus (statistics never read the last HELD_OUT)."""
    texts = load_corpus(corpus).texts
    first = len(texts) - n
    return list(texts[first:]), list(range(first, len(texts)))


@torch.no_grad()
def perplexity(handle: ModelHandle, texts: list[str], max_len: int = 128) -> float:
    """exp(mean NLL per predicted token) over ``texts``, each truncated to ``max_len`` tokens."""
    tok, device = handle.tokenizer, handle.device
    total, count = 0.0, 0
    for first in range(0, len(texts), 4):
        rows = [
            tok(t, truncation=True, max_length=max_len)["input_ids"]
            for t in texts[first : first + 4]
        ]
        hidden = final_hidden(handle, pad_batch(rows, tok.pad_token_id, device))
        for row, seq in enumerate(rows):
            logits = handle.head_logits(hidden[row, : len(seq) - 1])
            target = torch.tensor(seq[1:], device=device)
            total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            count += len(seq) - 1
    return math.exp(total / count)


def _covariance_paragraphs(handle: ModelHandle, n_tokens: int, corpus: str | None) -> int:
    """How many leading paragraphs the covariance statistics read (max_len 256, as there)."""
    tok, seen = handle.tokenizer, 0
    for i, text in enumerate(load_corpus(corpus).texts):
        seen += len(tok(text, truncation=True, max_length=256)["input_ids"])
        if seen >= n_tokens:
            return i + 1
    return i + 1


# --- the run ----------------------------------------------------------------------------------


def _layers(method: str, hparams: RomeHParams | MemitHParams) -> list[int]:
    wanted = RomeHParams if method == "rome" else MemitHParams
    if not isinstance(hparams, wanted):
        raise ValueError(f"hparams: method {method} takes {wanted.__name__}")
    return [hparams.layer] if isinstance(hparams, RomeHParams) else list(hparams.layers)


def _compute_batch(
    handle: ModelHandle,
    method: str,
    records: list[dict[str, Any]],
    hparams: RomeHParams | MemitHParams,
    corpus: str | None,
    earlier: list[Delta],
    apply: Any,
) -> tuple[list[Delta], list[str]]:
    """The deltas of one batch (ROME: one per record, each applied before the next)."""
    requests = [request_for(r) for r in records]
    refused: list[str] = []
    if isinstance(hparams, RomeHParams):
        deltas = []
        for request in requests:
            try:
                delta = compute_edit(handle, request, hparams, corpus=corpus)
            except DegenerateEditError as err:
                refused.append(str(err))
                continue
            deltas.append(delta)
            apply([delta])
        return deltas, refused
    try:
        delta = compute_batch(handle, requests, method, hparams, earlier, corpus=corpus)
    except DegenerateEditError as err:
        return [], [str(err)]
    apply([delta])
    return [delta], refused


def evaluate_sequential(
    handle: ModelHandle,
    records: list[dict[str, Any]],
    method: str,
    hparams: RomeHParams | MemitHParams,
    *,
    batch: int,
    corpus: str | None = None,
    checkpoint: str | Path | None = None,
    max_batches: int | None = None,
    fluency_prompts: int = 50,
    fluency_tokens: int = 40,
    ppl_paragraphs: int = PPL_PARAGRAPHS,
    progress: bool = True,
    gate: float | None = None,
) -> dict[str, Any]:
    """Edit ``records`` cumulatively in batches of ``batch``; the JSON-ready report; with
    ``gate`` τ, measured as served through key gates (module docstring).

    With ``checkpoint``, resumes from (and saves to) that folder, and ``max_batches`` limits the
    batches done in this call; ``report["complete"]`` says whether all records are edited."""
    if method not in METHODS:
        raise ValueError(f"method: choose one of {', '.join(METHODS)}")
    if batch < 1:
        raise ValueError("batch: must be at least 1")
    layers = _layers(method, hparams)
    paths = [handle.adapter.rewrite_path(j) for j in layers]
    base_hash = weights_hash(handle.model)
    base = base_weights(handle, paths)
    folder = Path(checkpoint) if checkpoint else None
    if folder:
        (folder / "deltas").mkdir(parents=True, exist_ok=True)

    # Statistics and templates come from the base model, before any edit.
    t0 = time.perf_counter()
    context_templates(handle, [tuple(t) for t in hparams.templates], hparams.template_seed)
    stats = layer_covariances(handle, layers, hparams.cov_tokens, corpus)
    covariances = {handle.adapter.rewrite_path(j): stats[j].cov for j in layers}
    setup_seconds = time.perf_counter() - t0

    progress_file = folder / "progress.json" if folder else None
    if progress_file and progress_file.is_file():
        report = json.loads(progress_file.read_text())
        if report["method"] != method or report["n_edits_planned"] != len(records):
            raise ValueError(f"checkpoint: {folder} holds another run")
        recorded = recorded_settings(type(hparams), report.get("hparams", {}))
        now = json.loads(json.dumps(hparams.to_dict()))
        differ = sorted(k for k in now if recorded.get(k) != now[k])
        if "hparams" in report and differ:
            raise ValueError(
                f"checkpoint: {folder} was run with other hyperparameters ({', '.join(differ)}): "
                "resuming would mix settings"
            )
        if report.get("gate_threshold") != gate:
            raise ValueError(
                f"checkpoint: {folder} was measured with gate {report.get('gate_threshold')}, "
                f"not {gate}: resuming would mix two ways of serving"
            )
    else:
        report = {"method": method, "n_edits_planned": len(records), "batch": batch}
        if gate is not None:
            report["gate_threshold"] = gate
    deltas = checkpoint_deltas(folder) if folder else []

    def apply(new: list[Delta]) -> None:
        deltas.extend(new)
        load_weights(handle, materialize(handle, base, deltas))

    def served() -> AbstractContextManager[Any]:
        """The model as measured: as it is, or with the deltas behind key gates."""
        if gate is None or not deltas:
            return nullcontext()
        return gated(handle, base, deltas, covariances, gate)

    if "perplexity_paragraphs" in report:  # a resumed run keeps the set it started with
        ppl_paragraphs = run_paragraphs(report)
    held, held_idx = heldout_paragraphs(corpus, ppl_paragraphs)
    fl_prompts = [r["prompt"] for r in records[:fluency_prompts]]
    try:
        if "unedited" not in report:
            t0 = time.perf_counter()
            unedited = measure_records(handle, records)
            report.update(
                unedited_records=unedited,
                unedited=summarise(unedited),
                unedited_fluency=fluency(handle, fl_prompts, fluency_tokens),
                unedited_perplexity=perplexity(handle, held),
                perplexity_paragraphs={
                    "corpus_indices": [held_idx[0], held_idx[-1]],
                    "max_len": 128,
                    "covariance_read_first": _covariance_paragraphs(
                        handle, hparams.cov_tokens, corpus
                    ),
                },
                curve=[],
                refused=[],
                seconds={"setup": setup_seconds, "edit": 0.0, "measure": 0.0},
                hparams=hparams.to_dict(),
                layers=layers,
            )
            report["seconds"]["measure"] += time.perf_counter() - t0
            if folder:  # a run stopped during its first batch keeps the unedited scores
                _write_progress(folder, report)
        if deltas:
            load_weights(handle, materialize(handle, base, deltas))
        done = report["curve"][-1]["n_edits"] if report["curve"] else 0
        batches = 0
        while done < len(records) and (max_batches is None or batches < max_batches):
            chunk = records[done : done + batch]
            t0 = time.perf_counter()
            new, refused = _compute_batch(handle, method, chunk, hparams, corpus, deltas, apply)
            edit_seconds = time.perf_counter() - t0
            report["seconds"]["edit"] += edit_seconds
            report["refused"] += refused
            done += len(chunk)
            batches += 1
            t0 = time.perf_counter()
            with served():
                after = measure_records(handle, records[:done])
                # The model's wear along the curve, not only at the end.
                ppl = perplexity(handle, held)
                entropy = fluency(handle, fl_prompts, fluency_tokens)["ngram_entropy"]
            point = {
                "n_edits": done,
                **summarise(after),
                "unedited_neighborhood": summarise(report["unedited_records"][:done])[
                    "neighborhood"
                ],
                "perplexity": ppl,
                "fluency": entropy,
                "edit_seconds": edit_seconds,
                "refused": len(report["refused"]),
            }
            report["curve"].append(point)
            report["seconds"]["measure"] += time.perf_counter() - t0
            if folder:
                start = len(list((folder / "deltas").iterdir()))
                for k, delta in enumerate(new):
                    delta.save(folder / "deltas" / f"{start + k:05d}")
                _write_progress(folder, report)
            if progress:
                print(
                    f"[{method} {done}/{len(records)}] ES {point['efficacy']:.1f} "
                    f"PS {point['paraphrase']:.1f} NS {point['neighborhood']:.1f} "
                    f"(unedited NS {point['unedited_neighborhood']:.1f}) "
                    f"ppl {point['perplexity']:.2f} fluency {point['fluency']:.3f} "
                    f"refused {point['refused']} {edit_seconds:.1f}s edit",
                    file=sys.stderr,
                    flush=True,
                )
        report["complete"] = done >= len(records)
        if report["complete"] and "fluency" not in report:
            t0 = time.perf_counter()
            with served():
                report.update(
                    final_records=measure_records(handle, records),
                    fluency=fluency(handle, fl_prompts, fluency_tokens),
                    perplexity=perplexity(handle, held),
                )
            report["seconds"]["measure"] += time.perf_counter() - t0
            if folder:
                _write_progress(folder, report)
    finally:
        load_weights(handle, base)
    report["restored"] = weights_hash(handle.model) == base_hash
    return _summary(report)


def checkpoint_deltas(folder: str | Path) -> list[Delta]:
    """A run's saved deltas in the order they were applied (numbered files in ``deltas/``)."""
    return [Delta.load(p) for p in sorted((Path(folder) / "deltas").iterdir())]


def _write_progress(folder: Path, report: dict[str, Any]) -> None:
    """Write-then-rename, so a reader (or a killed run) never sees half a file."""
    tmp = folder / "progress.json.tmp"
    tmp.write_text(json.dumps(report))
    tmp.replace(folder / "progress.json")


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """The JSON output: the last curve point's scores at the top level."""
    out = {k: v for k, v in report.items() if k not in ("unedited_records", "final_records")}
    if report["curve"]:
        last = report["curve"][-1]
        out.update({k: last[k] for k in ("efficacy", "paraphrase", "neighborhood", "score")})
        out["n_edits"] = last["n_edits"]
    else:
        out["n_edits"] = 0
    out["n"] = out["n_edits"]
    if "fluency" in report:
        u, e = report["unedited_fluency"]["ngram_entropy"], report["fluency"]["ngram_entropy"]
        out["fluency_change_pct"] = 100.0 * (e - u) / u
        pu, pe = report["unedited_perplexity"], report["perplexity"]
        out["perplexity_change_pct"] = 100.0 * (pe - pu) / pu
    return out
