"""How well trpo.py's conjugate gradient solves (F + λI) x = g, and what step it gives, for several dampings λ.

    python benchmarks/trpo_cg.py [--layers 2] [--dampings 0.1 1 10] [--iters 5 10 20 40] [--seed 1]

One batch as trpo.py's first step sees it: 16 arithmetic prompts, one sampled completion each, the
embedded SmolLM2-135M-Instruct, scores (1 correct, −1 without EOS) turned into whitened advantages with
a zero value head. For each λ, CG runs to the largest iteration count; after each listed count it
prints the relative residual ‖g − (F + λI) x‖ / ‖g‖, the cosine of x with g (1: a plain gradient
step), and the step along x applied: the surrogate's improvement and the exact mean KL there, with the
step scaled to δ = 0.01 by the damped quadratic model xᵀ(F + λI)x and by the undamped xᵀFx
(trpo.natural_step, what trpo.py does). The natural-gradient step is the one that improves the
surrogate most for its KL.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import tasks  # noqa: E402
import trpo  # noqa: E402
from plumbing.models import EMBEDDED_MODEL, load_model  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--layers", type=int, default=2, help="top transformer layers under the trust region (0: all)")
parser.add_argument("--dampings", type=float, nargs="+", default=[0.1, 1.0, 10.0])
parser.add_argument("--iters", type=int, nargs="+", default=[5, 10, 20, 40])
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--seed", type=int, default=1)
parser.add_argument("--max-kl", type=float, default=0.01)
a = parser.parse_args()

torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)
model, tokenizer = load_model(EMBEDDED_MODEL, torch.device("cpu"))
if a.layers:
    model.requires_grad_(False)
    trpo.transformer_layers(model)[-a.layers:].requires_grad_(True)
params = [p for p in model.parameters() if p.requires_grad]
train, _ = tasks.task_prompts("arithmetic", a.seed)
rows = [train[i] for i in torch.randint(len(train), (16,)).tolist()]
rollout = common.generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=32)
mask = rollout.completion_mask
scores = torch.tensor([tasks.correct_reward(c, r["answer"]) for c, r in zip(rollout.texts, rows)])
scores = torch.where(rollout.truncated, -1.0, scores)
old_logprobs, old_log_dist, _, _ = trpo.old_policy(model, None, rollout, 1.0)
rewards = torch.zeros_like(old_logprobs)
rewards[torch.arange(16), mask.sum(1) - 1] = scores
advantages = trpo.whiten(trpo.gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=0.95)[0], mask)
print(f"{sum(p.numel() for p in params) / 1e6:.2f} M parameters; {int(mask.sum())} tokens; "
      f"correct {float((scores == 1).float().mean()):.2f}, no EOS {float(rollout.truncated.float().mean()):.2f}")

model.zero_grad()
trpo.surrogate(common.completion_logprobs(model, rollout, 1.0), old_logprobs, advantages, mask).backward()
g = torch.cat([p.grad.reshape(-1) for p in params])
surrogate_before = float(trpo.surrogate(old_logprobs, old_logprobs, advantages, mask))
with sdpa_kernel(SDPBackend.MATH):
    log_dist = trpo.log_distributions(common.forward_completion(model, rollout), mask, 1.0)
    kl_grad = torch.cat([k.reshape(-1) for k in torch.autograd.grad(trpo.mean_kl(old_log_dist, log_dist, mask), params,
                                                                       create_graph=True)])
old = torch.nn.utils.parameters_to_vector(params).detach().clone()


@torch.no_grad()
def step_figures(step):  # (surrogate gain, exact KL̄) at θ_old + step; θ_old written back
    torch.nn.utils.vector_to_parameters(old + step, params)
    log_dist = trpo.log_distributions(common.forward_completion(model, rollout), mask, 1.0)
    logprobs = log_dist.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    gain = float(trpo.surrogate(logprobs, old_logprobs, advantages, mask)) - surrogate_before
    kl = float(trpo.mean_kl(old_log_dist, log_dist, mask))
    torch.nn.utils.vector_to_parameters(old, params)
    return gain, kl


print("| λ | CG iterations | relative residual | cos(x, g) | surrogate gain / KL̄ at s, scaled by xᵀ(F + λI)x "
      "| the same, scaled by xᵀFx (trpo.py) | CG seconds |")
print("|---|---|---|---|---|---|---|")
with sdpa_kernel(SDPBackend.MATH):  # x = g: the gradient, scaled to the same quadratic KL
    gain, kl = step_figures(trpo.natural_step(g, trpo.fisher_vector_product(kl_grad, params, g, damping=0), a.max_kl))
print(f"| (the gradient) | 0 | | 1 | | {gain:.3f} / {kl:.4f} | |", flush=True)
for damping in a.dampings:
    with sdpa_kernel(SDPBackend.MATH):
        def Fvp(v):
            return trpo.fisher_vector_product(kl_grad, params, v, damping=damping)

        # trpo.conjugate_gradient, with the figures taken after the listed iteration counts
        x, r, p, t0 = torch.zeros_like(g), g.clone(), g.clone(), time.time()
        rr = r @ r
        for k in range(1, max(a.iters) + 1):
            Ap = Fvp(p)
            alpha = rr / (p @ Ap)
            x += alpha * p
            r -= alpha * Ap
            rr_new = r @ r
            p, rr = r + (rr_new / rr) * p, rr_new
            if k in a.iters:
                seconds = time.time() - t0
                Ax = Fvp(x)
                residual = float((g - Ax).norm() / g.norm())  # the true residual, not CG's recursion
                damped = step_figures(trpo.natural_step(x, Ax, a.max_kl))  # scaled by xᵀ(F + λI)x
                undamped = step_figures(trpo.natural_step(x, trpo.fisher_vector_product(kl_grad, params, x, damping=0.0),
                                                          a.max_kl))  # scaled by xᵀFx, as trpo.py
                print(f"| {damping:g} | {k} | {residual:.3f} | {float(x @ g / x.norm() / g.norm()):.3f} | "
                      f"{damped[0]:.3f} / {damped[1]:.4f} | {undamped[0]:.3f} / {undamped[1]:.4f} | {seconds:.0f} |", flush=True)
                t0 = time.time() - seconds
