"""The target v* = W k̄ + δ: δ optimised so that the model states the new object (ROME sec. 3.1,
eq. 4; the reference's ``compute_v``; MEMIT's zᵢ comes from the same optimisation).

    L(δ) = mean NLL(target | prefix + prompt)                                (rewrite)
         + kl_factor · KL(P_δ ‖ P_orig) at the subject's last token of "{s} is a"  (essence)
         + weight_decay · ‖δ‖ / ‖v_init‖²                                    (reference form)

with Adam; ``steps`` forward passes and at most ``steps − 1`` updates, ‖δ‖ ≤ clamp_norm_factor ·
‖v_init‖ after every update, stopping early once the total loss is below ``early_stop_loss``
(as the reference code does) or, with ``early_stop_most_probable``, once every target token is
the most probable token at its position in every prefixed prompt (most-probable early stopping,
MPES: Gupta et al. 2025, arXiv 2502.01636).

Three extensions keep the text *around* the edit as the unedited model writes it (all off gives
the paper's loss exactly; research/NOTES.md, "The text after an edit"): ``essence_tokens`` > 0
extends the essence term from the one position to the unedited model's own greedy description
of the subject ("{s} is a" + that many tokens), averaged over every position from the subject's
last token on; ``continuation_tokens`` > 0 adds the mean KL(P_δ ‖ P_orig) over the unedited
model's greedy continuation of "prompt + new target" (in every prefixed prompt), so that what
follows the new object reads as the unedited model would write it; ``essence_questions`` > 0
adds the mean KL at the end of that many generic questions about the subject
(ESSENCE_QUESTIONS), leaving out those the unedited model answers as it answers the edited
prompt or with the new target.  Each extension is its own term, weighted to a mean over its
positions.

Speed, without changing the maths: the layers below the edited one do not depend on δ, so they
run once (:func:`factpatch.editing.keys.capture` records every block's inputs); each step runs
only the blocks from the edited layer up (:class:`UpperModules`), and the LM head only at the
positions the loss reads; after the first step only each row's positions from the subject on are
re-run, packed (:mod:`factpatch.editing.packed`).  With ``optimise_dtype`` the steps run on a
reduced-precision copy of those blocks and the head (a measured trade, docs/benchmarks.md).

δ enters through a forward hook that acts only in the calling thread and is removed afterwards
(:mod:`factpatch.models.hooks`): no weight is written.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from factpatch.editing.delta import output_hook
from factpatch.editing.hparams import RomeHParams
from factpatch.editing.keys import capture
from factpatch.editing.packed import Packing, PrefixKV, keyword_inputs, pack_inputs, with_cache
from factpatch.editing.prompts import encode, pad_batch
from factpatch.editing.requests import EditRequest
from factpatch.models.hooks import block_output, thread_hooks
from factpatch.models.loading import ModelHandle, softcap

ESSENCE_PROMPT = "{} is a"
# Questions about the subject whose unedited answers ``essence_questions`` keeps (the KL at each
# one's last position).  Chosen to be generic and apart from the evaluation's subject prompts
# (factpatch.evaluation.generation.subject_prompts).
ESSENCE_QUESTIONS = (
    "{} is a",
    "{} is best known as",
    "{} comes from",
    "{} is associated with",
    "{} belongs to the category of",
    "The main activity of {} is",
    "{} has its origins in",
    "People describe {} as",
)


@dataclass
class EditStats:
    """What one request's optimisation did; goes into the delta's provenance."""

    steps: int = 0
    nll_start: float = 0.0
    nll_end: float = 0.0
    delta_norm: float = 0.0
    v_init_norm: float = 0.0
    denominator_ratio: float = 1.0
    update_ratio: float = 0.0
    positions: list[int] = field(default_factory=list)  # per pass: the first, then the packed
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class LossBatch:
    ids: torch.Tensor  # [B, T] right-padded
    subject_pos: torch.Tensor  # [B] last subject token per row
    nll_rows: torch.Tensor  # [P] row of each target token
    nll_pos: torch.Tensor  # [P] position that predicts it
    nll_ids: torch.Tensor  # [P] the target token
    nll_weight: torch.Tensor  # [P] 1 / (rows · that row's target length): mean over rows
    kl_rows: torch.Tensor  # [Q] row of each position whose distribution is kept
    kl_pos: torch.Tensor  # [Q] the position
    kl_weight: torch.Tensor  # [Q] weights summing to 1 per term (essence, continuation)
    lengths: torch.Tensor  # [B] real tokens per row


def build_loss_batch(
    handle: ModelHandle,
    request: EditRequest,
    templates: list[str],
    essence: list[int] | None = None,
    continuation: list[int] | None = None,
    questions: list[str] | None = None,
) -> LossBatch:
    """Rows: every prefixed rewrite prompt + `` target`` (+ the continuation ids), then the
    essence prompt (+ the description ids), then each question about the subject.  ``None``:
    the paper's loss (no extension)."""
    tok = handle.tokenizer
    rows, subject_pos = [], []
    nll_rows, nll_pos, nll_ids, nll_weight = [], [], [], []
    kl_rows, kl_pos, kl_weight = [], [], []
    for row, template in enumerate(templates):
        enc = encode(tok, template.replace("{}", request.prompt), request.subject, request.target)
        targets = enc.target_ids
        subject_pos.append(enc.subject_last)
        for j, target_id in enumerate(targets):
            nll_rows.append(row)
            nll_pos.append(enc.n_prompt - 1 + j)
            nll_ids.append(target_id)
            nll_weight.append(1.0 / (len(templates) * len(targets)))
        if continuation:  # keep P(next) at the last target token and each continuation token
            ids = enc.ids + continuation
            first = len(enc.ids) - 1
            for pos in range(first, len(ids) - 1):
                kl_rows.append(row)
                kl_pos.append(pos)
                kl_weight.append(1.0 / (len(templates) * (len(ids) - 1 - first)))
            rows.append(ids[:-1])  # the last token is predicted, never fed
        else:
            rows.append(enc.ids[:-1])
    essence_enc = encode(tok, ESSENCE_PROMPT, request.subject)
    essence_ids = essence_enc.ids + list(essence or [])
    last = len(essence_ids) - 1 if essence else essence_enc.subject_last  # paper: one position
    for pos in range(essence_enc.subject_last, last + 1):
        kl_rows.append(len(rows))
        kl_pos.append(pos)
        kl_weight.append(1.0 / (last + 1 - essence_enc.subject_last))
    rows.append(essence_ids)
    subject_pos.append(essence_enc.subject_last)
    for question in questions or []:  # the answer's distribution, at the question's end
        enc = encode(tok, question, request.subject)
        kl_rows.append(len(rows))
        kl_pos.append(len(enc.ids) - 1)
        kl_weight.append(1.0 / len(questions))
        rows.append(enc.ids)
        subject_pos.append(enc.subject_last)
    device = handle.device

    def tensor(values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return LossBatch(
        ids=pad_batch(rows, tok.pad_token_id, device),
        subject_pos=tensor(subject_pos),
        nll_rows=tensor(nll_rows),
        nll_pos=tensor(nll_pos),
        nll_ids=tensor(nll_ids),
        nll_weight=tensor(nll_weight, torch.float32),
        kl_rows=tensor(kl_rows),
        kl_pos=tensor(kl_pos),
        kl_weight=tensor(kl_weight, torch.float32),
        lengths=tensor([len(row) for row in rows]),
    )


@torch.no_grad()
def _greedy(
    handle: ModelHandle, text: str, n_tokens: int, hooks: list[tuple[Any, Any]]
) -> list[int]:
    """The model's greedy continuation of ``text`` (``n_tokens`` ids, fewer at EOS), with
    ``hooks`` (earlier edits of this call) in place: the state the edit starts from."""
    if n_tokens <= 0:
        return []
    tok = handle.tokenizer
    ids = tok(text)["input_ids"]
    out: list[int] = []
    with thread_hooks(forward=hooks):  # a few short passes: no KV cache needed
        for _ in range(n_tokens):
            logits = handle.model(input_ids=torch.tensor([ids + out], device=handle.device)).logits
            next_id = int(logits[0, -1].argmax())
            if next_id == tok.eos_token_id:
                break
            out.append(next_id)
    return out


@dataclass
class UpperModules:
    """What each optimisation step re-runs: the blocks from the edited layer up (by layer
    index), the rewrite module δ is added to, the final norm and the LM head — the model's own
    modules, or a reduced-precision copy of them (``optimise_dtype``)."""

    blocks: dict[int, nn.Module]
    rewrite: nn.Module
    final_norm: nn.Module
    head_weight: torch.Tensor  # [vocab, d]
    head_bias: torch.Tensor | None
    cap: float | None  # final logit soft-capping
    dtype: torch.dtype

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (+ logit soft-capping where the family uses it) on [N, d]."""
        return softcap(
            F.linear(self.final_norm(hidden), self.head_weight, self.head_bias), self.cap
        )


def resolve_optimise_dtype(
    name: str, device: torch.device, model_dtype: torch.dtype
) -> torch.dtype:
    """``optimise_dtype`` as a torch dtype: "model" is the model's own; "auto" is bfloat16 for a
    float32 model where the device multiplies bfloat16 natively (CUDA with bf16; a CPU whose
    oneDNN has bf16 kernels, e.g. AVX-512 BF16 or AMX), else the model's own."""
    if name == "model":
        return model_dtype
    if name == "auto":
        if model_dtype != torch.float32:
            return model_dtype
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            try:
                native = device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            except (AttributeError, RuntimeError):  # a torch build without oneDNN
                native = False
        return torch.bfloat16 if native else model_dtype
    return getattr(torch, name)


def upper_modules(handle: ModelHandle, layer: int, optimise_dtype: str = "model") -> UpperModules:
    """The modules above ``layer`` (inclusive) as they are, or copied to ``optimise_dtype``
    (the copy carries no hooks and shares nothing with the serving model)."""
    adapter = handle.adapter
    blocks = handle.module(adapter.blocks)
    head = handle.module(adapter.head)
    upper = UpperModules(
        blocks={i: blocks[i] for i in range(layer, handle.n_layers)},
        rewrite=handle.rewrite_module(layer),
        final_norm=handle.module(adapter.final_norm),
        head_weight=head.weight,
        head_bias=head.bias,
        cap=handle.logit_softcap,
        dtype=head.weight.dtype,
    )
    dtype = resolve_optimise_dtype(optimise_dtype, handle.device, upper.dtype)
    if dtype == upper.dtype:
        return upper

    def cast(module: nn.Module) -> nn.Module:
        # Each parameter goes straight to its cast copy (no full-precision clone on the way).
        memo = {id(p): nn.Parameter(p.detach().to(dtype), False) for p in module.parameters()}
        module = copy.deepcopy(module, memo).to(dtype).requires_grad_(False)
        for sub in module.modules():  # other threads' hooks stay on the originals
            sub._forward_hooks.clear()
            sub._forward_pre_hooks.clear()
        return module

    upper.blocks = {i: cast(block) for i, block in upper.blocks.items()}
    upper.rewrite = upper.blocks[layer].get_submodule(adapter.rewrite)
    upper.final_norm = cast(upper.final_norm)
    upper.head_weight = head.weight.detach().to(dtype)
    upper.head_bias = None if head.bias is None else head.bias.detach().to(dtype)
    upper.dtype = dtype
    return upper


@torch.no_grad()
def other_questions(
    handle: ModelHandle, request: EditRequest, n: int, hooks: list[tuple[Any, Any]]
) -> list[str]:
    """The first ``n`` of ESSENCE_QUESTIONS whose unedited top answer is neither the edited
    prompt's top answer (the relation being edited) nor the new target's first token: the
    subject's other facts, which the edit should leave as they are."""
    if n == 0:
        return []
    if n > len(ESSENCE_QUESTIONS):
        raise ValueError(f"essence_questions: at most {len(ESSENCE_QUESTIONS)}")
    tok = handle.tokenizer
    asked = list(ESSENCE_QUESTIONS[:n])
    rows = [tok(request.text)["input_ids"]]
    rows += [tok(q.replace("{}", request.subject))["input_ids"] for q in asked]
    with thread_hooks(forward=hooks):
        logits = handle.model(
            input_ids=pad_batch(rows, tok.pad_token_id, handle.device), use_cache=False
        ).logits
    top = [int(logits[i, len(row) - 1].argmax()) for i, row in enumerate(rows)]
    new_first = encode(tok, request.prompt, request.subject, request.target).target_ids[0]
    kept = zip(asked, top[1:], strict=True)
    return [question for question, answer in kept if answer not in (top[0], new_first)]


class Target(NamedTuple):
    """One request's optimised target, all float32: v* = W k̄ + δ."""

    key: torch.Tensor  # k̄ [in]: the bare prompt's and every prefixed prompt's key, averaged
    bare_key: torch.Tensor  # k₀ [in]: the bare prompt's key
    delta: torch.Tensor  # δ [out]
    stats: EditStats


def optimise_target(
    handle: ModelHandle,
    request: EditRequest,
    hp: RomeHParams,
    templates: list[str],
    prior: tuple[torch.Tensor, torch.Tensor] | None = None,
    upper: UpperModules | None = None,
    *,
    packed: bool = True,
) -> Target:
    """δ for one request (eq. 4), with ``prior`` = (left [out, n], right [in, n]) the earlier
    updates of the same call, added on the fly.  ``upper``: the modules the steps re-run (built
    from ``hp.optimise_dtype`` when not given).  ``packed=False`` re-runs every position in
    every pass (the same δ up to float rounding, slower; for comparison)."""
    upper = upper or upper_modules(handle, hp.layer, hp.optimise_dtype)
    stats = EditStats()
    t0 = time.perf_counter()
    prior_hooks = []  # earlier edits of this call, for the unedited model's greedy text
    if prior is not None:
        left, right = (t.to(handle.device) for t in prior)
        prior_hooks = [(handle.rewrite_module(hp.layer), output_hook(left, right))]
    essence = _greedy(
        handle, ESSENCE_PROMPT.replace("{}", request.subject), hp.essence_tokens, prior_hooks
    )
    continuation = _greedy(
        handle, f"{request.text} {request.target}", hp.continuation_tokens, prior_hooks
    )
    questions = other_questions(handle, request, hp.essence_questions, prior_hooks)
    batch = build_loss_batch(
        handle, request, templates, essence or None, continuation or None, questions or None
    )
    n_rewrite = len(templates)
    rows = torch.arange(batch.ids.shape[0], device=batch.ids.device)

    captured, io = capture(handle, batch.ids, hp.layer)
    captured = {i: keyword_inputs(upper.blocks[i], *inputs) for i, inputs in captured.items()}
    if upper.dtype != io["values"].dtype:
        captured = {i: _cast(inputs, upper.dtype) for i, inputs in captured.items()}
    keys = io["keys"][rows, batch.subject_pos].float()  # [B, in]
    key = keys[:n_rewrite].mean(0)  # k̄: the bare prompt and every prefix
    bare_key = keys[0]
    v_init = io["values"][0, batch.subject_pos[0]].float()  # W's output, bare prompt
    stats.v_init_norm = float(v_init.norm())
    # Earlier edits of this call: W's output gains (Σ left rightᵀ) k at every position.
    prior_out = None
    if prior is not None:
        prior_out = (io["keys"].float() @ right) @ left.T
    stats.seconds["keys"] = time.perf_counter() - t0

    # Optimise δ.  The first pass runs every position and records the keys/values; later
    # passes re-run only each row's positions from the subject on, packed (editing/packed.py).
    t0 = time.perf_counter()
    dtype = upper.dtype
    at_subject = torch.zeros((*batch.ids.shape, 1), dtype=dtype, device=batch.ids.device)
    at_subject[rows, batch.subject_pos] = 1.0
    layout = {"at": at_subject, "prior": None if prior_out is None else prior_out.to(dtype)}
    packing = Packing.plan(batch.subject_pos, batch.lengths, batch.ids.shape[1])
    recorder = PrefixKV()
    inputs = with_cache(captured, handle.adapter.cache_kwarg, recorder)
    is_packed = False  # the later passes' inputs are packed (set after the first pass)
    stats.positions = [batch.ids.numel(), batch.ids.numel()]
    delta = torch.zeros_like(v_init, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=hp.lr)
    max_norm = hp.clamp_norm_factor * v_init.norm()
    n_nll = len(batch.nll_ids)
    loss_rows = torch.cat([batch.nll_rows, batch.kl_rows])
    loss_pos = torch.cat([batch.nll_pos, batch.kl_pos])

    def add_delta(_module, _args, output):
        out = output + layout["at"] * delta.to(dtype)
        return out if layout["prior"] is None else out + layout["prior"]

    log_p_orig = None
    step = 0
    with thread_hooks(forward=[(upper.rewrite, add_delta)]):
        for step in range(max(hp.steps, 1)):
            hidden = run_blocks(upper.blocks, inputs, range(hp.layer, handle.n_layers))
            if is_packed:  # [1, Q, d]
                picked = hidden[0, packing.index[loss_rows, loss_pos]]
            else:  # [B, T, d]
                picked = hidden[loss_rows, loss_pos]
            log_probs = F.log_softmax(upper.logits(picked).float(), dim=-1)
            token_nll = -log_probs[:n_nll].gather(1, batch.nll_ids[:, None]).squeeze(1)
            nll = (token_nll * batch.nll_weight).sum()
            log_p = log_probs[n_nll:]  # [Q, vocab]
            if log_p_orig is None:
                log_p_orig = log_p.detach()
                stats.nll_start = float(nll.detach())
            # KL(P_δ ‖ P_orig) per kept position (eq. 4: the edited distribution from the
            # original one), weighted to a mean per term.
            kl = (log_p.exp() * (log_p - log_p_orig)).sum(-1) @ batch.kl_weight
            decay = hp.weight_decay * delta.norm() / v_init.norm() ** 2
            loss = nll + hp.kl_factor * kl + decay
            stats.nll_end = float(nll.detach())
            stop = step >= hp.steps - 1 or float(loss.detach()) < hp.early_stop_loss
            if not stop and hp.early_stop_most_probable:  # MPES: every target token on top
                stop = bool((log_probs[:n_nll].argmax(-1) == batch.nll_ids).all())
            if stop:
                break
            (grad,) = torch.autograd.grad(loss, [delta])
            delta.grad = grad
            optimiser.step()
            with torch.no_grad():
                norm = delta.norm()
                if norm > max_norm:
                    delta.mul_(max_norm / norm)
            if step == 0 and packed:
                packed_inputs = _switch_to_packed(
                    handle, upper, captured, packing, recorder, layout
                )
                is_packed = packed_inputs is not None
                if is_packed:
                    inputs = packed_inputs
                    stats.positions[1] = len(packing.rows)
    stats.steps = step  # updates made
    stats.delta_norm = float(delta.detach().norm())
    stats.seconds["optimise"] = time.perf_counter() - t0
    return Target(key.detach(), bare_key.detach(), delta.detach(), stats)


def _switch_to_packed(
    handle: ModelHandle,
    upper: UpperModules,
    captured: dict[int, tuple[tuple, dict]],
    packing: Packing,
    recorder: PrefixKV,
    layout: dict[str, torch.Tensor | None],
) -> dict[int, tuple[tuple, dict]] | None:
    """After the first (full) pass: the packed block inputs, with the hook's per-position terms
    moved to the packed layout; None (full passes go on) where a block cannot be packed or its
    attention recorded nothing."""
    layers = sorted(upper.blocks)
    if sorted(recorder.recorded) != layers:  # every attention recorded, under its layer index
        return None
    windows = {i: _sliding_window(handle, upper.blocks[i]) for i in layers}
    packed = pack_inputs(captured, packing, handle.adapter.cache_kwarg, recorder, windows)
    if packed is None:
        return None
    recorder.prefix = packing.prefix(recorder.recorded)
    layout["at"] = packing.gather(layout["at"])
    if layout["prior"] is not None:
        layout["prior"] = packing.gather(layout["prior"])
    return packed


def _sliding_window(handle: ModelHandle, block: nn.Module) -> int | None:
    """The attention window of a block's attention (Gemma 2/3, Mistral, Qwen 2), or None."""
    attn = block.get_submodule(handle.adapter.attn)
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(handle.model.config, "sliding_window", None)


def run_blocks(blocks: Any, captured: dict[int, tuple[tuple, dict]], layers: range) -> torch.Tensor:
    """Run ``blocks[layers]`` from their captured inputs, feeding each one's output upward."""
    hidden = None
    for index in layers:
        args, kwargs = captured[index]
        if hidden is None:  # the edited layer's own input, as captured
            out = blocks[index](*args, **kwargs)
        elif args:
            out = blocks[index](hidden, *args[1:], **kwargs)
        else:
            out = blocks[index](*args, **{**kwargs, "hidden_states": hidden})
        hidden = block_output(out)
    return hidden


def _cast(inputs: Any, dtype: torch.dtype) -> Any:
    """Captured block inputs with every floating tensor in ``dtype`` (masks, ids untouched)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(dtype) if inputs.is_floating_point() else inputs
    if isinstance(inputs, tuple | list):
        return type(inputs)(_cast(x, dtype) for x in inputs)
    if isinstance(inputs, dict):
        return {k: _cast(v, dtype) for k, v in inputs.items()}
    return inputs


def mlp_contribution(norm: torch.nn.Module | None, v: torch.Tensor) -> torch.Tensor:
    """g(v): what a block adds to the residual stream for the rewrite module's output v — v
    itself, or the post-MLP norm of it (Gemma 2/3; ``ModelHandle.post_mlp_norm``).  MEMIT's
    target for the residual stream is zᵢ = hᵢ + g(vᵢ + δᵢ) − g(vᵢ)."""
    return v if norm is None else norm(v)


def mlp_output_for(norm: torch.nn.Module | None, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A rewrite-module output x with g(x) ≈ g(v) + r, for rows v, r [B, d].

    RMSNorm(x) = γ ⊙ x / rms(x) is invariant to the scale of x, so x = c·a with
    a = (g(v) + r) / γ reaches the wanted direction exactly (its size is the norm's to set);
    c is the scale that keeps x closest to v."""
    if norm is None:
        return v + r
    wanted = norm(v) + r
    gain = norm(torch.ones_like(v[:1]))  # γ (up to √(1+ε))
    gain = torch.where(gain.abs() < 1e-6, torch.full_like(gain, 1e-6), gain)
    a = wanted / gain
    c = (a * v).sum(-1, keepdim=True) / (a * a).sum(-1, keepdim=True).clamp(min=1e-30)
    rms_match = v.pow(2).mean(-1, keepdim=True).sqrt() / a.pow(2).mean(-1, keepdim=True).sqrt()
    return torch.where(c > 0, c, rms_match) * a
