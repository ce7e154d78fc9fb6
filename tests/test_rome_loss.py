"""ROME's target optimisation against the paper's loss written the plain way (Meng et al. 2022,
eq. 4): the whole model, δ added by a hook, every prompt run on its own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from factpatch.editing import EditRequest
from factpatch.editing.prompts import encode
from factpatch.editing.targets import (
    ESSENCE_PROMPT,
    ESSENCE_QUESTIONS,
    build_loss_batch,
    optimise_target,
    other_questions,
    resolve_optimise_dtype,
)
from factpatch.editing.templates import context_templates
from factpatch.models.hooks import thread_hooks

REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")


def _log_probs(handle, ids, layer, subject_pos, delta):
    def add(_module, _args, output):
        out = output.clone()
        out[0, subject_pos] = out[0, subject_pos] + delta
        return out

    with thread_hooks(forward=[(handle.rewrite_module(layer), add)]):
        logits = handle.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    return F.log_softmax(logits.float(), -1)


def paper_delta(handle, request, hp, templates, reverse_kl=False, questions=()):
    """Eq. 4: mean target NLL over the prefixed prompts + kl_factor · KL(P_δ ‖ P_orig) at the
    subject's last token of "{s} is a" + weight_decay · ‖δ‖/‖v_init‖²; Adam, ``steps`` passes
    (the last one only evaluates), stop once the total loss < early_stop_loss, clamp ‖δ‖."""
    tok = handle.tokenizer
    rows = [
        encode(tok, t.replace("{}", request.prompt), request.subject, request.target)
        for t in templates
    ]
    essence = encode(tok, ESSENCE_PROMPT, request.subject)
    asked = [encode(tok, q, request.subject) for q in questions]
    seen = {}

    def keep(_module, _args, output):
        seen["v"] = output[0, rows[0].subject_last].detach().float()

    with thread_hooks(forward=[(handle.rewrite_module(hp.layer), keep)]):
        handle.model(input_ids=torch.tensor([rows[0].ids]), use_cache=False)
    v_init = seen["v"]
    delta = torch.zeros_like(v_init, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=hp.lr)
    p_orig = None
    losses, nlls = [], []
    for step in range(hp.steps):
        nll = 0.0
        for enc in rows:
            log_p = _log_probs(handle, enc.ids[:-1], hp.layer, enc.subject_last, delta)
            targets = torch.tensor(enc.target_ids)
            positions = torch.arange(enc.n_prompt - 1, len(enc.ids) - 1)
            nll = nll - log_p[positions, targets].mean() / len(rows)
        log_q = _log_probs(handle, essence.ids, hp.layer, essence.subject_last, delta)
        log_q = log_q[essence.subject_last]
        if p_orig is None:
            p_orig = log_q.detach()
        if reverse_kl:  # KL(P_orig ‖ P_δ): the direction factpatch used before
            kl = F.kl_div(log_q, p_orig, log_target=True, reduction="sum")
        else:  # KL(P_δ ‖ P_orig)
            kl = F.kl_div(p_orig, log_q, log_target=True, reduction="sum")
        for i, enc in enumerate(asked):  # essence_questions: the answer's distribution
            log_a = _log_probs(handle, enc.ids, hp.layer, enc.subject_last, delta)[-1]
            if f"q{i}" not in seen:
                seen[f"q{i}"] = log_a.detach()
            kl_q = F.kl_div(seen[f"q{i}"], log_a, log_target=True, reduction="sum")
            kl = kl + kl_q / len(asked)
        loss = nll + hp.kl_factor * kl + hp.weight_decay * delta.norm() / v_init.norm() ** 2
        losses.append(float(loss.detach()))
        nlls.append(float(nll.detach()))
        if step == hp.steps - 1 or float(loss.detach()) < hp.early_stop_loss:
            break
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            cap = hp.clamp_norm_factor * v_init.norm()
            if delta.norm() > cap:
                delta.mul_(cap / delta.norm())
    return delta.detach(), step, losses, nlls


def test_target_optimisation_is_the_papers_loss(tiny_llama, tiny_hparams):
    # A strong essence term, so that the KL's direction shows in δ.
    hp = tiny_hparams.with_overrides(kl_factor=20.0, steps=8, early_stop_loss=0.0)
    templates = context_templates(tiny_llama, list(hp.templates), hp.template_seed)
    *_, delta, stats = optimise_target(tiny_llama, REQUEST, hp, templates, None)
    expected, updates, *_ = paper_delta(tiny_llama, REQUEST, hp, templates)
    assert stats.steps == updates == hp.steps - 1  # 8 passes, 7 updates
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-5)
    reverse, *_ = paper_delta(tiny_llama, REQUEST, hp, templates, reverse_kl=True)
    assert (reverse - expected).norm() > 1e-3 * expected.norm(), "the test cannot see the KL"


def test_early_stop_tests_the_total_loss(tiny_llama, tiny_hparams):
    """The reference stops once the *total* loss is below the threshold, not the NLL alone."""
    hp = tiny_hparams.with_overrides(kl_factor=20.0, steps=10, early_stop_loss=0.0)
    templates = context_templates(tiny_llama, list(hp.templates), hp.template_seed)
    _, _, losses, nlls = paper_delta(tiny_llama, REQUEST, hp, templates)
    # A threshold the NLL crosses after one update while the total loss stays above it.
    threshold = (nlls[1] + min(losses)) / 2
    assert nlls[1] < threshold < min(losses), "the test must tell NLL and total loss apart"
    by_loss = hp.steps - 1  # never below: every pass runs
    hp = hp.with_overrides(early_stop_loss=threshold)
    *_, delta, stats = optimise_target(tiny_llama, REQUEST, hp, templates, None)
    expected, updates, *_ = paper_delta(tiny_llama, REQUEST, hp, templates)
    assert stats.steps == updates == by_loss
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-5)


def test_kept_text_positions(tiny_llama):
    """The KL reads the essence prompt at the subject's last token only (the paper), or from
    there over the unedited description, and the continuation after the target per row."""
    tok = tiny_llama.tokenizer
    templates = ["{}", "Hello there. {}"]
    paper = build_loss_batch(tiny_llama, REQUEST, templates)
    essence = encode(tok, ESSENCE_PROMPT, REQUEST.subject)
    assert paper.kl_rows.tolist() == [2] and paper.kl_pos.tolist() == [essence.subject_last]
    assert paper.kl_weight.tolist() == [1.0]

    description, follow = [5, 6, 7], [8, 9]
    kept = build_loss_batch(tiny_llama, REQUEST, templates, description, follow)
    rows = [
        encode(tok, t.replace("{}", REQUEST.prompt), REQUEST.subject, REQUEST.target)
        for t in templates
    ]
    expected_pos = []
    for enc in rows:  # the last target token and each continuation token but the last
        expected_pos += list(range(len(enc.ids) - 1, len(enc.ids) + len(follow) - 1))
    last = len(essence.ids) + len(description) - 1
    expected_pos += list(range(essence.subject_last, last + 1))
    assert kept.kl_pos.tolist() == expected_pos
    assert kept.kl_rows.tolist() == [0, 0, 1, 1] + [2] * (last + 1 - essence.subject_last)
    # Two terms, each a mean: continuation weights sum to 1, essence weights sum to 1.
    assert abs(float(kept.kl_weight[:4].sum()) - 1) < 1e-6
    assert abs(float(kept.kl_weight[4:].sum()) - 1) < 1e-6
    # The rewrite rows now feed the target's last token and the continuation.
    for row, enc in enumerate(rows):
        width = len(enc.ids) + len(follow) - 1
        assert kept.ids[row, :width].tolist() == (enc.ids + follow)[:-1]
    # NLL positions are unchanged by the extension.
    assert kept.nll_pos.tolist() == paper.nll_pos.tolist()


def test_one_pass_or_none_makes_no_update(tiny_llama, tiny_hparams):
    templates = context_templates(tiny_llama, list(tiny_hparams.templates), 0)
    for steps in (0, 1):
        hp = tiny_hparams.with_overrides(steps=steps, early_stop_loss=0.0)
        *_, delta, stats = optimise_target(tiny_llama, REQUEST, hp, templates, None)
        assert stats.steps == 0 and not delta.any()


def test_reduced_precision_optimisation(tiny, tiny_hparams):
    """``optimise_dtype``: the steps run on a bfloat16 copy of the blocks above the edited layer
    and the head; δ follows the float32 one closely and the served model is untouched."""
    templates = context_templates(tiny, list(tiny_hparams.templates), tiny_hparams.template_seed)
    weights = {name: p.detach().clone() for name, p in tiny.model.named_parameters()}
    *_, exact, _ = optimise_target(tiny, REQUEST, tiny_hparams, templates, None)
    same_hp = tiny_hparams.with_overrides(optimise_dtype="float32")
    *_, same, _ = optimise_target(tiny, REQUEST, same_hp, templates, None)
    assert torch.equal(same, exact)  # the model's own dtype: no copy, bit for bit
    half_hp = tiny_hparams.with_overrides(optimise_dtype="bfloat16")
    *_, half, stats = optimise_target(tiny, REQUEST, half_hp, templates, None)
    assert half.dtype == torch.float32 and stats.steps == exact_steps(tiny_hparams)
    cosine = float(half @ exact / (half.norm() * exact.norm()))
    assert cosine > 0.99, cosine
    assert not torch.equal(half, exact)  # it did run in bfloat16
    for name, p in tiny.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, weights[name]), name
        assert not p.requires_grad or p.grad is None


def exact_steps(hp) -> int:
    return hp.steps - 1  # the tiny settings never stop early (weight decay 0, loss > 0.05)


def test_optimise_dtype_is_checked(tiny_hparams):
    with pytest.raises(ValueError, match="optimise_dtype"):
        tiny_hparams.with_overrides(optimise_dtype="int8")


def test_essence_questions_are_the_papers_kl_at_each_answer(tiny_llama, tiny_hparams):
    """``essence_questions``: a third KL term, the mean over the kept questions of KL(P_δ ‖
    P_orig) at each question's last position; only questions the unedited model does not answer
    as it answers the edited prompt (or with the new target) are kept."""
    hp = tiny_hparams.with_overrides(
        kl_factor=20.0, steps=6, early_stop_loss=0.0, essence_questions=len(ESSENCE_QUESTIONS)
    )
    kept = other_questions(tiny_llama, REQUEST, hp.essence_questions, [])
    tok = tiny_llama.tokenizer

    def top(text: str) -> int:
        logits = tiny_llama.model(input_ids=torch.tensor([tok(text)["input_ids"]])).logits
        return int(logits[0, -1].argmax())

    edited = top(REQUEST.text)
    new_first = encode(tok, REQUEST.prompt, REQUEST.subject, REQUEST.target).target_ids[0]
    for question in ESSENCE_QUESTIONS:
        answer = top(question.replace("{}", REQUEST.subject))
        assert (question in kept) == (answer not in (edited, new_first)), question
    assert kept, "the tiny model must keep some question for the test to see the term"

    templates = context_templates(tiny_llama, list(hp.templates), hp.template_seed)
    *_, delta, _ = optimise_target(tiny_llama, REQUEST, hp, templates, None)
    expected, *_ = paper_delta(tiny_llama, REQUEST, hp, templates, questions=kept)
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-5)
    without, *_ = paper_delta(tiny_llama, REQUEST, hp, templates)
    assert (without - expected).norm() > 1e-3 * expected.norm(), "the test cannot see the term"


def test_auto_dtype_is_bfloat16_only_where_native():
    cpu = torch.device("cpu")
    assert resolve_optimise_dtype("model", cpu, torch.float32) == torch.float32
    assert resolve_optimise_dtype("bfloat16", cpu, torch.float32) == torch.bfloat16
    assert resolve_optimise_dtype("auto", cpu, torch.float16) == torch.float16  # never upcast
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    expected = torch.bfloat16 if native else torch.float32
    assert resolve_optimise_dtype("auto", cpu, torch.float32) == expected


def test_packed_passes_are_the_full_passes(tiny, tiny_hparams):
    """After the first pass only each row's positions from the subject on are re-run, packed
    into one sequence (editing/packed.py): in every family δ is still the plain loss's (Gemma 3
    here has a sliding window of 8 < the rows' 17 tokens, so the window is in the mask)."""
    hp = tiny_hparams.with_overrides(kl_factor=20.0, steps=6, early_stop_loss=0.0)
    templates = context_templates(tiny, list(hp.templates), hp.template_seed)
    *_, delta, stats = optimise_target(tiny, REQUEST, hp, templates, None)
    full, packed = stats.positions
    assert packed < full / 2, stats.positions  # the packing was used, and it saves
    expected, *_ = paper_delta(tiny, REQUEST, hp, templates)
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-5)
