"""Context templates: short prefixes sampled from the model itself (Meng et al. 2022, sec. 3.1).

ROME averages the key over the subject in several contexts ("<prefix>. {subject} ..."), so the
edit holds wherever the subject appears.  The prefixes are sampled once per model with a seed
and cached, so every later edit on that model (and every replica) uses the same ones.
"""

from __future__ import annotations

import json

import torch

from factpatch.models.loading import ModelHandle
from factpatch.paths import cache_dir, staging_path

# Sentence openers the prefixes start from (as in the reference implementation).
OPENERS = ("The", "Therefore", "Because", "I", "You")
TOP_K = 5


def context_templates(handle: ModelHandle, spec: list[tuple[int, int]], seed: int) -> list[str]:
    """``["{}", "<prefix>. {}", ...]``: the bare prompt plus ``count`` prefixes of ``length``
    sampled tokens for each ``(length, count)`` in ``spec``."""
    spec_key = "-".join(f"{length}x{count}" for length, count in spec)
    path = cache_dir("templates") / f"{handle.base_hash[:16]}-{spec_key}-seed{seed}.json"
    memo = ("templates", str(path))
    if memo in handle.cache:
        return handle.cache[memo]
    if path.is_file():
        templates = json.loads(path.read_text())
    else:
        generator = torch.Generator().manual_seed(seed)
        templates = ["{}"]
        for length, count in spec:
            openers = [OPENERS[i % len(OPENERS)] for i in range(count)]
            for text in sample(handle, openers, length, generator):
                clean = " ".join(text.replace("{", " ").replace("}", " ").split())
                templates.append(clean + ". {}")
        tmp = staging_path(path)
        tmp.write_text(json.dumps(templates, indent=1))
        tmp.replace(path)
    handle.cache[memo] = templates
    return templates


@torch.no_grad()
def sample(
    handle: ModelHandle, openers: list[str], n_tokens: int, generator: torch.Generator
) -> list[str]:
    """Top-k sampling of ``n_tokens`` after each opener; deterministic for a seeded generator."""
    tok = handle.tokenizer
    rows = [tok(o)["input_ids"] for o in openers]
    n_special = len(tok("")["input_ids"])  # BOS-style tokens the tokenizer prepends
    for _ in range(n_tokens):
        width = max(len(r) for r in rows)
        # Left-pad so every row's next token is predicted at the last column.
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = (
            handle.model(
                input_ids=ids.to(handle.device),
                attention_mask=mask.to(handle.device),
                position_ids=positions.to(handle.device),
                use_cache=False,
            )
            .logits[:, -1]
            .float()
            .cpu()
        )
        top = logits.topk(TOP_K, dim=-1)
        probs = torch.softmax(top.values, dim=-1)
        choice = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        for i, r in enumerate(rows):
            r.append(int(top.indices[i, choice[i]]))
    return [tok.decode(r[n_special:], skip_special_tokens=True) for r in rows]
