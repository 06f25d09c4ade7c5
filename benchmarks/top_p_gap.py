"""How far top-p sampling is from the distribution the scripts score with (the full softmax).

    python benchmarks/top_p_gap.py

For completions sampled with top-p, the log-probability of each sampled token under the truncated,
renormalised distribution exceeds its full-softmax log-probability by −log(nucleus mass). The
scripts compute every ratio and KL with the full softmax (as TRL does), so the ratio is still 1 and
the KL 0 at the first step; this gap is how off-policy the sampled tokens are.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import plumbing  # noqa: E402

torch.manual_seed(0)
model, tok = plumbing.load_model("smollm2", torch.device("cpu"))
train, _ = plumbing.load_prompts("arithmetic", None, 1)
prompts = [r["prompt"] for r in train[:4]]
for top_p in (0.9, 0.95):
    r = common.generate(model, tok, prompts, 32, temperature=1.0, top_p=top_p, group_size=4)
    with torch.no_grad():
        # full-softmax log-probs (what the scripts score with) and the nucleus's probability mass at each sampled token
        input_ids = torch.cat([r.prompt_ids, r.completion_ids], 1); am = torch.cat([r.prompt_mask, r.completion_mask], 1)
        logits = model(input_ids=input_ids, attention_mask=am, position_ids=(am.cumsum(1) - 1).clamp(min=0)).logits
        T = r.completion_ids.shape[1]; logp = torch.log_softmax(logits[:, -T - 1:-1].float(), -1)
        probs = logp.exp(); sp, _ = probs.sort(-1, descending=True)
        mass = torch.where(sp.cumsum(-1) - sp < top_p, sp, 0.0).sum(-1)  # nucleus mass per position
        m = r.completion_mask.bool()
        log_mass = mass.log()[m]
        print(f"top_p {top_p}: {int(m.sum())} tokens; log(nucleus mass) = log π_truncated − log π_full at the sampled token: "
              f"mean {(-log_mass).mean():.4f}, max {(-log_mass).max():.4f}; share of tokens with mass < 1: {(mass[m] < 0.999).float().mean():.2f}")
