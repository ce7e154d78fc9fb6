"""ROME's target optimisation against the paper's loss written the plain way (Meng et al. 2022,
eq. 4): the whole model, δ added by a hook, every prompt run on its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from factpatch.editing import EditRequest
from factpatch.editing.prompts import encode
from factpatch.editing.rome import ESSENCE_PROMPT, _build_batch, _optimise
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


def paper_delta(handle, request, hp, templates, reverse_kl=False):
    """Eq. 4: mean target NLL over the prefixed prompts + kl_factor · KL(P_δ ‖ P_orig) at the
    subject's last token of "{s} is a" + weight_decay · ‖δ‖/‖v_init‖²; Adam, ``steps`` passes
    (the last one only evaluates), stop once the total loss < early_stop_loss, clamp ‖δ‖."""
    tok = handle.tokenizer
    rows = [
        encode(tok, t.replace("{}", request.prompt), request.subject, request.target)
        for t in templates
    ]
    essence = encode(tok, ESSENCE_PROMPT, request.subject)
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
    *_, delta, stats = _optimise(tiny_llama, REQUEST, hp, templates, None)
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
    *_, delta, stats = _optimise(tiny_llama, REQUEST, hp, templates, None)
    expected, updates, *_ = paper_delta(tiny_llama, REQUEST, hp, templates)
    assert stats.steps == updates == by_loss
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-5)


def test_kept_text_positions(tiny_llama):
    """The KL reads the essence prompt at the subject's last token only (the paper), or from
    there over the unedited description, and the continuation after the target per row."""
    tok = tiny_llama.tokenizer
    templates = ["{}", "Hello there. {}"]
    paper = _build_batch(tiny_llama, REQUEST, templates)
    essence = encode(tok, ESSENCE_PROMPT, REQUEST.subject)
    assert paper.kl_rows.tolist() == [2] and paper.kl_pos.tolist() == [essence.subject_last]
    assert paper.kl_weight.tolist() == [1.0]

    description, follow = [5, 6, 7], [8, 9]
    kept = _build_batch(tiny_llama, REQUEST, templates, description, follow)
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
        *_, delta, stats = _optimise(tiny_llama, REQUEST, hp, templates, None)
        assert stats.steps == 0 and not delta.any()
