"""Where does the edit act? r_j = uᵀk_j/uᵀk̄ and ‖r_j δ‖/‖v_j‖ at each position, and greedy text
when the rank-one term is applied only at some positions."""

import json
import sys

import torch

from factpatch.editing import EditRequest, compute_edit
from factpatch.editing.hparams import default_hparams
from factpatch.editing.prompts import encode
from factpatch.models import load_model
from factpatch.models.hooks import thread_hooks

h = load_model("gemma-3-270m", device="cpu")
tok = h.tokenizer
overrides = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
hp = default_hparams(h, **overrides)
prompt, subj, tgt = "{} is located in the city of", "The Eiffel Tower", "Rome"
if len(sys.argv) > 2:
    prompt, subj, tgt = sys.argv[2].split("|")
d = compute_edit(h, EditRequest(prompt, subj, tgt), hp)
path = h.adapter.rewrite_path(hp.layer)
left, right = d.factors[path]  # [out,1], [in,1]
mod = h.rewrite_module(hp.layer)
text0 = prompt.replace("{}", subj)
subj_last = encode(tok, prompt, subj).subject_last


def greedy(mode, n=16):
    ids = tok(text0, return_tensors="pt").input_ids[0].tolist()
    stats = {}

    def hook(_m, args, out):
        k = args[0][0].float()  # [T, in]
        r = (k @ right)[:, 0]  # [T]: (C⁻¹k̄)ᵀk_j / denominator folded into left
        add = r[:, None] * left[:, 0][None]  # [T, out]
        T = k.shape[0]
        m = torch.zeros(T, 1)
        if mode == "all":
            m[:] = 1
        elif mode == "subject":
            m[subj_last] = 1
        elif mode == "upto_subject":
            m[: subj_last + 1] = 1
        elif mode == "none":
            pass
        stats["r"] = r.tolist()
        stats["ratio"] = (add.norm(dim=1) / out[0].float().norm(dim=1)).tolist()
        return out + (m * add)[None].to(out.dtype)

    with torch.no_grad(), thread_hooks(forward=[(mod, hook)]):
        for _ in range(n):
            logits = h.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
    return tok.decode(ids), stats


for mode in ["none", "all", "subject", "upto_subject"]:
    text, st = greedy(mode)
    print(f"[{mode}] {text!r}")
_, st = greedy("all", n=4)
toks = [tok.decode([i]) for i in tok(text0 + " Rome<start_of_image>")["input_ids"]]
full_ids = tok(text0, return_tensors="pt").input_ids[0].tolist()
print("positions (token, r_j, ‖r_j δ‖/‖v_j‖):")
ids = (
    full_ids
    + tok(" " + tgt, add_special_tokens=False)["input_ids"]
    + [tok.convert_tokens_to_ids("<start_of_image>")] * 2
)
cap = {}


def h2(_m, args, out):
    k = args[0][0].float()
    r = (k @ right)[:, 0]
    cap["r"] = r
    cap["ratio"] = (r.abs() * left.norm()) / out[0].float().norm(dim=1)


with torch.no_grad(), thread_hooks(forward=[(mod, h2)]):
    h.model(input_ids=torch.tensor([ids]), use_cache=False)
for i, t in enumerate(ids):
    print(f"  {i:2d} {tok.decode([t])!r:22} r={cap['r'][i]:+.3f}  ratio={cap['ratio'][i]:.3f}")
