"""TRPO for language models: conjugate gradient on Fisher-vector products, in one file.

Paper: Schulman et al. 2015, Trust Region Policy Optimization, https://arxiv.org/abs/1502.05477.
Reference implementations for RL (not LLMs): OpenAI Spinning Up (spinup/algos/tf1/trpo/trpo.py:
`cg`, the Hessian-vector product and the line search called from one `update`) and OpenAI
baselines (trpo_mpi).

Each iteration maximises the surrogate L(θ) = mean_t ρ_t A_t, ρ_t = π_θ(y_t)/π_old(y_t), subject to
the trust region KL̄(θ) = mean_t KL(π_old(·|s_t) ‖ π_θ(·|s_t)) ≤ δ (exact, over the vocabulary):

1. g = ∇L at θ_old; F = ∇²KL̄ at θ_old (the Fisher), used only through products F v;
2. x ≈ (F + λI)⁻¹ g by conjugate gradient (λ: damping); full step s = √(2δ / xᵀF x) · x;
3. backtracking line search on s, c·s, c²·s, ... (c: --line-search-shrink): accept the first step with
   KL̄ ≤ δ and L improved, else keep θ_old (restored bit for bit).

On its defaults λ (1000) is above the Fisher's curvature along g, so x keeps g's direction and F sets the
step's length: a trust-region step along the gradient. `--cg-damping 1 --cg-iters 10 --fisher-fraction 1` is
the natural gradient; over a 135M-parameter model and a batch of 16 completions it learned less here and costs
about 6 times as much (docs/benchmarks.md, "What limits TRPO here").

Advantages come from GAE on a KL-penalised per-token reward (as in ppo.py) with a value head
trained separately (a linear head on the policy's detached last hidden state, its own optimizer),
or from group z-scores (as in grpo.py) with --advantage group.

Implemented: all parameters or the top N layers under the trust region, a Fisher subsample, CG
damping. Left out: a separate value network, FSDP (its Fisher-vector products differentiate with respect
to the parameters twice; FSDP runs the forward on gathered copies of them). The Fisher pass runs attention as
plain operations (fused attention kernels have no double backward), and the policy math runs in fp32.

Walkthrough: docs/walkthrough.md §5 (TRPO and PPO: improve the surrogate, stay close to π_old), §3 (A value model as the baseline: returns and GAE).
Run: `python trpo.py` (embedded SmolLM2-135M-Instruct, every parameter under the trust region), `python trpo.py --help`.
Several processes: `torchrun --nproc-per-node N trpo.py ...` (DDP; README, "Several processes").
The run's machinery (loading, processes, checkpoints, Ctrl-C, logging) is in plumbing/; the loop is `main`.
"""

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from torch.nn.attention import SDPBackend, sdpa_kernel

import common
import plumbing


@dataclass
class Args(plumbing.RLArgs):
    """TRPO: a step by conjugate gradient on the damped Fisher (on the defaults, along the gradient), scaled to a KL
    radius, and a line search. The flags every RL script shares (--model, --data, --steps, --seed, ...) are
    declared once in plumbing.RLArgs."""

    fsdp: tyro.conf.Suppress[bool] = False  # not a flag of trpo.py: its Fisher-vector products need gradients FSDP cannot give

    prompts_per_step: int = 16
    """distinct prompts per step (over all processes)"""
    group_size: int = 1
    """completions per prompt (at least 2 with --advantage group)"""
    advantage: Literal["gae", "group"] = "gae"
    """`gae`: value head + GAE on the KL-penalised reward; `group`: z-score of the score within each group"""
    beta: float = 0.05
    """β: KL-to-reference penalty in the per-token reward (gae only; 0 skips the reference pass)"""
    gamma: float = 1.0
    """γ: discount (gae only)"""
    lam: float = 0.95
    """λ: GAE parameter (gae only)"""
    whiten_advantages: bool = True
    """whiten advantages over the batch, masked (gae only)"""
    missing_eos_penalty: float | None = -1.0
    """score given instead of the task/reward-model score to completions with no EOS (None: off)"""
    max_kl: float = 0.03
    """δ: trust-region radius, mean per-token KL(π_old ‖ π_θ) in nats (0.01 moved the policy a third as far as PPO's default steps do; docs/benchmarks.md)"""
    cg_iters: int = 1
    """conjugate-gradient iterations (at the default λ the first, x ∝ g, leaves a relative residual of 0.04-0.41 here, median 0.11; at λ 1 over every parameter, 10 leave 0.28-0.57)"""
    cg_damping: float = 1000.0
    """λ added to the Fisher in CG, (F + λI) x = g. 1000 is above F's curvature along the gradient here (gᵀFg/gᵀg: 19-450, medians 61-70), so x keeps g's direction and F sets only the step's length. At λ 1 (the whole batch's Fisher) the step turns into directions of curvature at most 2-7 that the batch's 16 completions hardly bind: at least 3.6 times as long for the same KL (the medians), and held-out accuracy fell (docs/benchmarks.md)"""
    line_search_steps: int = 10
    """backtracking tries before the step is rejected"""
    line_search_shrink: float = 0.8
    """the step is multiplied by this after each failed try (Spinning Up's 0.8; 0.5 quarters the KL after a near miss)"""
    fisher_fraction: float = 0.25
    """share of the batch's completions the Fisher-vector products use (the TRPO paper: 10 % of the data). 0.25 against the whole batch here: 30 s a step instead of 48, peak memory 10 GB instead of 18, and a held-out gain of +0.33 instead of +0.30 on three seeds"""
    trust_region_layers: int | None = None
    """train only the top N transformer layers (None: all parameters, 30 s a step for the 135M model on 2 CPU cores; on the top 2, 26 s, but there neither TRPO nor PPO gained more than 0.06 on seed 2)"""
    value_lr: float = 1e-4
    """Adam learning rate of the value head (gae only; PPO's rate. At 1e-3, TRPO learned less with its critic than without one: 0.312 against 0.484 on seed 2; at 1e-4, 0.453)"""
    value_iters: int = 20
    """value-head gradient steps per step, full batch (gae only)"""
    is_correction: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "none"] = "token_truncate"
    """weight each token's surrogate term by π_trainer/π_sampler (common.sampler_correction): truncated at --is-cap per token (TIS, the default: Yao et al. 2025) or per completion, or masked outside [1/cap, cap]; see grpo.py --help"""
    is_cap: float = 2.0
    """C of --is-correction (Yao et al. 2025 use 2)"""


# ----------------------------------------------------------------------------------------------
# The math: pure functions of tensors. Shapes: [B, T] over completion tokens, [B, T, V] for distributions.


def surrogate(logprobs, old_logprobs, advantages, mask) -> torch.Tensor:
    """L(θ) = mean_t ρ_t A_t over real tokens, ρ_t = exp(log π_θ − log π_old)."""
    real = mask.bool()
    return torch.where(real, torch.exp(logprobs - old_logprobs) * advantages, 0.0).sum() / real.sum().clamp(min=1)


def mean_kl(old_log_dist, log_dist, mask) -> torch.Tensor:
    """KL̄ = mean_t Σ_v π_old(v) (log π_old(v) − log π_θ(v)); log-distributions [B, T, V]."""
    kl = (old_log_dist.exp() * (old_log_dist - log_dist)).sum(-1)  # [B, T]
    real = mask.bool()
    return torch.where(real, kl, 0.0).sum() / real.sum().clamp(min=1)


def fisher_vector_product(kl_grad: torch.Tensor, params: list, v: torch.Tensor, *, damping: float) -> torch.Tensor:
    """F v + damping·v, with F v = ∇_θ (∇_θ KL̄ · v) (double backward; the Hessian of KL̄ at θ_old is
    the Fisher). kl_grad: the flat ∇KL̄, built with create_graph=True, reused for every v."""
    hv = torch.autograd.grad((kl_grad * v).sum(), params, retain_graph=True)
    return torch.cat([h.reshape(-1) for h in hv]) + damping * v


def conjugate_gradient(Avp, b: torch.Tensor, iters: int, tol: float = 1e-10):
    """Solve A x = b for symmetric positive-definite A, given only v ↦ A v. Returns (x, ‖b − A x‖)."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()  # residual b − A x and search direction, x = 0 at the start
    rr = r @ r
    for _ in range(iters):
        if rr < tol:  # solved (or b = 0: nothing to do)
            break
        Ap = Avp(p)
        alpha = rr / (p @ Ap)
        x += alpha * p
        r -= alpha * Ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, rr.sqrt()


def natural_step(x: torch.Tensor, Fx: torch.Tensor, max_kl: float) -> torch.Tensor:
    """s = √(2δ / xᵀFx) · x: the step along x whose quadratic KL model ½ sᵀFs is δ. Fx is F x without the
    damping: the damping only conditions CG; kept in the model, it overstates the KL and the step falls short."""
    return torch.sqrt(2 * max_kl / (x @ Fx).clamp(min=1e-12)) * x


def line_search(params: list, full_step: torch.Tensor, evaluate, surrogate_before: float, *, max_kl: float,
                steps: int, shrink: float) -> dict:
    """Backtracking: θ = θ_old + shrink^k · step for k = 0, 1, ...; accept the first θ with
    KL̄ ≤ δ and L(θ) > L(θ_old). evaluate() -> (L, KL̄) at the current parameters. If none is
    accepted, θ_old is written back exactly (a copy of its bits, not θ − step)."""
    old = torch.nn.utils.parameters_to_vector(params).detach().clone()
    for k in range(steps):
        torch.nn.utils.vector_to_parameters(old + shrink**k * full_step, params)
        surr, kl = evaluate()
        if kl <= max_kl and surr > surrogate_before:
            return {"accepted": True, "tries": k + 1, "surrogate": surr, "kl": kl, "step_fraction": shrink**k}
    torch.nn.utils.vector_to_parameters(old, params)
    return {"accepted": False, "tries": steps, "surrogate": surrogate_before, "kl": 0.0, "step_fraction": 0.0}


def group_advantages(scores: torch.Tensor, group_size: int, mask: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A_it = (r_i − mean(r_group)) / (std(r_group) + eps) at every real token -> [B, T], as in grpo.py:
    a group whose scores are all equal gets 0. scores [B], each group contiguous; mask [B, T]."""
    grouped = scores.view(-1, group_size)
    z = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + eps)
    return z.view(-1, 1) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x − mean) / sqrt(var + 1e-8) over mask == 1 (biased variance)."""
    real = mask.bool()
    n = real.sum().clamp(min=1)
    mean = torch.where(real, x, 0.0).sum() / n
    var = torch.where(real, (x - mean) ** 2, 0.0).sum() / n
    return torch.where(real, (x - mean) * torch.rsqrt(var + 1e-8), 0.0)


def gae(rewards, values, mask, *, gamma: float, lam: float):
    """δ_t = r_t + γ V_{t+1} − V_t ; A_t = δ_t + γλ A_{t+1} ; R_t = A_t + V_t (0 after the EOS)."""
    rewards, values = rewards * mask, values * mask
    advantages, last, T = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0]), rewards.shape[1]
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * (values[:, t + 1] if t + 1 < T else 0.0) - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


def explained_variance(values, returns, mask) -> torch.Tensor:
    """1 − Var(R − V) / Var(R) over real tokens: 1 is a perfect critic, ≤ 0 a useless one."""
    real = mask.bool()
    n = real.sum().clamp(min=1)

    def var(x):  # masked, biased
        mean = torch.where(real, x, 0.0).sum() / n
        return torch.where(real, (x - mean) ** 2, 0.0).sum() / n

    return 1 - var(returns - values) / var(returns).clamp(min=1e-8)


# ----------------------------------------------------------------------------------------------
# The update: the math above applied to the model, in passes of a few rows.

SCORING_ROWS = 8  # rows per forward pass in the batch-wide passes (old policy, gradient, line search)
FISHER_ROWS = 4  # rows per twice-differentiable pass: plain-op attention costs the square of a pass's length


def log_distributions(logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """log π(· | context) from the packed logits [N, V] of common.forward_completion -> [B, T, V] fp32
    (uniform after the mask's end)."""
    return torch.log_softmax(common.unpack(logits, mask).float() / temperature, -1)


@torch.no_grad()
def old_policy(model, ref_model, rollout, temperature: float):
    """θ_old's log-probs [B, T], full log-distributions [B, T, V] (for the KL), last hidden states
    [B, T, H] (the value head's input), and the reference's log-probs [B, T] (None without ref_model)."""
    old_logprobs, old_log_dist, hidden, ref_logprobs = [], [], [], []
    for rows in torch.arange(len(rollout.texts)).split(SCORING_ROWS):
        mb = common.rollout_slice(rollout, rows)
        logits, h = common.forward_completion(model, mb, hidden=True)  # [N, V], [N, H]: real tokens
        old_log_dist.append(log_distributions(logits, mb.completion_mask, temperature))
        old_logprobs.append(old_log_dist[-1].gather(-1, mb.completion_ids[..., None]).squeeze(-1))
        hidden.append(common.unpack(h, mb.completion_mask).float())
        if ref_model is not None:
            ref_logprobs.append(common.completion_logprobs(ref_model, mb, temperature))
    return (torch.cat(old_logprobs), torch.cat(old_log_dist), torch.cat(hidden),
            torch.cat(ref_logprobs) if ref_model is not None else None)


def trpo_step(model, params, rollout, old_logprobs, old_log_dist, advantages, args, rng) -> dict:
    """One trust-region step: g = ∇L, x ≈ F⁻¹g by CG, s = √(2δ / xᵀFx)·x, line search. Under torchrun
    the gradient, the Fisher-vector products and the line search's figures are averaged over
    processes, so every process takes the same step. Returns the step's statistics."""
    mask, B = rollout.completion_mask, len(rollout.texts)
    chunks = torch.arange(B).split(SCORING_ROWS)
    num_tokens = plumbing.all_mean(mask.sum().float())  # all real tokens / world: each chunk's share of L

    # g = ∇L at θ_old, accumulated over chunks
    model.zero_grad()
    for rows in chunks:
        mb = common.rollout_slice(rollout, rows)
        logprobs = common.completion_logprobs(model, mb, args.temperature)
        share = mb.completion_mask.sum() / num_tokens
        (surrogate(logprobs, old_logprobs[rows], advantages[rows], mb.completion_mask) * share).backward()
    g = plumbing.all_mean(torch.cat([p.grad.reshape(-1) for p in params]))
    plumbing.check_finite(g.norm(), "the policy gradient")
    surrogate_before = (plumbing.all_mean((advantages * mask).sum()) / num_tokens).item()  # ρ = 1 at θ_old

    # ∇KL̄ with its graph, over a subsample; F v is its derivative along v. Attention as plain ops (the
    # fused kernels have no double backward), also in the recompute of --gradient-checkpointing.
    t0 = time.time()
    fisher_rows = torch.randperm(B, generator=rng)[: max(1, math.ceil(args.fisher_fraction * B))]
    fisher_kl, n_fisher = 0.0, mask[fisher_rows].sum()
    with sdpa_kernel(SDPBackend.MATH):
        for rows in fisher_rows.split(FISHER_ROWS):
            fb = common.rollout_slice(rollout, rows)
            log_dist = log_distributions(common.forward_completion(model, fb), fb.completion_mask, args.temperature)
            share = fb.completion_mask.sum() / n_fisher
            fisher_kl = fisher_kl + mean_kl(old_log_dist[rows], log_dist, fb.completion_mask) * share
        kl_grad = torch.cat([k.reshape(-1) for k in torch.autograd.grad(fisher_kl, params, create_graph=True)])

        def Fvp(v, damping=args.cg_damping):
            return plumbing.all_mean(fisher_vector_product(kl_grad, params, v, damping=damping))

        x, cg_residual = conjugate_gradient(Fvp, g, args.cg_iters)
        full_step = natural_step(x, Fvp(x, damping=0.0), args.max_kl)  # scaled by F x without the damping
    kl_grad = fisher_kl = log_dist = None  # free the double-backward graph before the line search
    cg_seconds = time.time() - t0

    @torch.no_grad()
    def evaluate():  # (L, KL̄) at the current parameters, averaged over processes
        surr, kl = torch.zeros((), device=g.device), torch.zeros((), device=g.device)
        for rows in chunks:
            mb = common.rollout_slice(rollout, rows)
            log_dist = log_distributions(common.forward_completion(model, mb), mb.completion_mask, args.temperature)
            logprobs = log_dist.gather(-1, mb.completion_ids[..., None]).squeeze(-1)
            share = mb.completion_mask.sum() / num_tokens
            surr += surrogate(logprobs, old_logprobs[rows], advantages[rows], mb.completion_mask) * share
            kl += mean_kl(old_log_dist[rows], log_dist, mb.completion_mask) * share
        return plumbing.all_mean(surr).item(), plumbing.all_mean(kl).item()

    t1 = time.time()
    result = line_search(params, full_step, evaluate, surrogate_before, max_kl=args.max_kl,
                         steps=args.line_search_steps, shrink=args.line_search_shrink)
    return {**result, "surrogate_before": surrogate_before, "expected_improvement": (g @ full_step).item(),
            "cg_residual": cg_residual.item(), "grad_norm": g.norm().item(), "cg_s": cg_seconds,
            "line_search_s": time.time() - t1}


def make_value_head(model) -> torch.nn.Linear:
    """V(s_t): a linear layer on the policy's last hidden state, zero at the start (no noise in the first advantages)."""
    value_head = torch.nn.Linear(model.config.get_text_config().hidden_size, 1, device=model.device)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    return value_head


def fit_value_head(value_head, optimizer, hidden, returns, mask, iters: int) -> float:
    """The critic, trained separately: `iters` full-batch steps of masked (V(h) − R)² on detached
    features h [B, T, H] -> the last loss. Gradients averaged over processes."""
    real = mask.bool()
    for _ in range(iters):
        value_loss = torch.where(real, (value_head(hidden).squeeze(-1) - returns) ** 2, 0.0).sum() / real.sum()
        optimizer.zero_grad()
        value_loss.backward()
        for p in value_head.parameters():
            p.grad = plumbing.all_mean(p.grad)
        optimizer.step()
    return value_loss.item() if iters else 0.0


def transformer_layers(model) -> torch.nn.ModuleList:
    """The model's list of transformer blocks (model.model.layers, transformer.h, ...)."""
    n = model.config.get_text_config().num_hidden_layers
    return next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n)


# Valid values of TRPO's numeric flags ("(": that end excluded; the shared ones: plumbing.RANGES).
RANGES = {"prompts_per_step": "[1, inf)", "group_size": "[1, inf)", "beta": "[0, inf)", "gamma": "[0, 1]",
          "lam": "[0, 1]", "missing_eos_penalty": "[-inf, inf]", "max_kl": "(0, inf)", "cg_iters": "[1, inf)",
          "cg_damping": "[0, inf)", "line_search_steps": "[1, inf)", "line_search_shrink": "(0, 1)",
          "fisher_fraction": "(0, 1]", "trust_region_layers": "[1, inf)", "value_lr": "(0, inf)", "value_iters": "[0, inf)",
          "is_cap": "(1, inf)"}


def check_args(args: Args) -> None:
    """TRPO's own errors, found before a model is loaded or a file written."""
    plumbing.check_ranges(args, RANGES)
    plumbing.per_process(args.prompts_per_step, "--prompts-per-step")
    if args.advantage == "group" and args.group_size < 2:
        raise SystemExit(f"--advantage group needs --group-size ≥ 2 (got {args.group_size})")
    plumbing.refuse_idle_flags(args, [(name, args.advantage == "group", "--advantage group has no value head and no "
                                       "per-token reward") for name in ("beta", "gamma", "lam", "whiten_advantages",
                                                                        "value_lr", "value_iters")]
                               + [("is_cap", args.is_correction == "none", "--is-correction none applies no weight to cap")])
    if args.fsdp:  # not a flag of trpo.py (hidden from --help); refused when Args(fsdp=True) is built in code
        raise SystemExit("--fsdp: not supported by trpo.py (its Fisher-vector products differentiate twice with respect "
                         "to the parameters, which FSDP gathers into copies); run under torchrun without it (DDP)")


def main(args: Args):
    # --- set-up: every check before anything loads; processes; policy, reference, value head ---
    run = plumbing.Run("trpo", args, check_args)  # --resume, prompts, rewards, run folder, device, processes
    args, device = run.args, run.device
    use_ref = args.advantage == "gae" and args.beta != 0
    # No DDP wrapper: trpo_step averages the gradient and the Fisher-vector products over processes itself.
    model, ref_model, _, tokenizer = plumbing.load_policy(args, run, reference=use_ref, ddp=False)
    if args.trust_region_layers is not None:
        model.requires_grad_(False)
        transformer_layers(model)[-args.trust_region_layers :].requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    value_head = make_value_head(model)
    value_optimizer = torch.optim.Adam(run.resumed(value_head, "value_head").parameters(), lr=args.value_lr)
    saved = run.restore(model)  # seeds (seed + rank), or the last checkpoint's random states
    if saved:
        value_optimizer.load_state_dict(saved["value_optimizer"])
    G, n_prompts = args.group_size, plumbing.per_process(args.prompts_per_step, "--prompts-per-step")  # this process's
    if run.rank == 0:
        print(f"trust region over {sum(p.numel() for p in params) / 1e6:.2f} M parameters")

    with run:  # the logs, Ctrl-C, the last line and the process group, whatever happens
        run.evaluate(0, model, tokenizer)
        for step in run.steps():
            # --- 1. rollouts: G completions for each prompt, and their scores ---
            picks = torch.randint(len(run.train_rows), (n_prompts,), generator=run.rng).tolist()
            rows = [run.train_rows[i] for i in picks for _ in range(G)]
            with common.autocast(device, args.dtype):
                rollout = common.generate(model, tokenizer, [run.train_rows[i]["prompt"] for i in picks], group_size=G,
                                          **run.sampling)
            mask = rollout.completion_mask  # [B, T]
            scores, reward_terms = run.reward_fn(rows, rollout.texts)
            if args.missing_eos_penalty is not None:
                scores = torch.where(rollout.truncated.cpu(), args.missing_eos_penalty, scores)
            scores = scores.to(device)
            run.lap("generation")

            # --- 2. the old policy: log-probs, log-distributions (for the KL), hidden states; the reference ---
            old_logprobs, old_log_dist, hidden, ref_logprobs = old_policy(model, ref_model, rollout, args.temperature)
            is_weights, is_cut = common.sampler_correction(old_logprobs, rollout.sampler_logprobs, mask,  # sampler -> π_old
                                                           args.is_correction, args.is_cap)

            # --- 3. advantages: GAE on the KL-penalised reward (whitened), or group z-scores (as in grpo.py) ---
            kl = torch.where(mask.bool(), old_logprobs - ref_logprobs, 0.0) if use_ref else torch.zeros_like(old_logprobs)
            if args.advantage == "gae":
                rewards = -args.beta * kl  # log π − log π_ref at every token ...
                rewards[torch.arange(len(rows)), mask.sum(1) - 1] += scores  # ... and the score at the EOS
                with torch.no_grad():
                    values = value_head(hidden).squeeze(-1)
                advantages, returns = gae(rewards, values, mask, gamma=args.gamma, lam=args.lam)
                if args.whiten_advantages:
                    advantages = whiten(advantages, mask)
            else:
                advantages = group_advantages(scores, G, mask)

            # --- 4. the trust-region step on the policy (the surrogate's terms weighted w_t A_t); 5. the value head ---
            result = trpo_step(model, params, rollout, old_logprobs, old_log_dist, is_weights * advantages, args, run.rng)
            value_metrics = {}
            if args.advantage == "gae":  # V above was fitted on earlier batches only: its explained variance is out of sample
                value_metrics = {"value/explained_variance": explained_variance(values, returns, mask), "value/loss":
                                 fit_value_head(value_head, value_optimizer, hidden, returns, mask, args.value_iters)}
            run.lap("update")

            # --- 6. evaluation and logging (each figure is this process's, then averaged over processes) ---
            metrics = {
                "objective/scores": scores.mean(), "objective/log_ratio_to_ref": kl.sum(1).mean(),  # k1 per sequence: may be < 0
                "objective/kl_k3_per_token": (torch.expm1(-kl.double()) + kl).sum() / mask.sum(),  # k3 of log π_ref − log π; float64
                "trpo/surrogate_before": result["surrogate_before"], "trpo/surrogate_after": result["surrogate"],
                "trpo/expected_improvement": result["expected_improvement"],
                "trpo/actual_improvement": result["surrogate"] - result["surrogate_before"],
                "trpo/kl_after": result["kl"], "trpo/accepted": float(result["accepted"]),
                "trpo/line_search_tries": result["tries"], "trpo/step_fraction": result["step_fraction"],
                "trpo/cg_residual": result["cg_residual"], "trpo/grad_norm": result["grad_norm"],
                "trpo/cg_relative_residual": result["cg_residual"] / max(result["grad_norm"], 1e-12),  # |b − Ax| / |b|
                **value_metrics, "time/cg_s": result["cg_s"], "time/line_search_s": result["line_search_s"],
                **common.sampler_mismatch(old_logprobs, rollout.sampler_logprobs, mask), "sampler/is_cut": is_cut,
            }
            run.evaluate(step, model, tokenizer)
            run.log(step, metrics, rows, rollout, scores, reward_terms, replicas=(model, value_head),
                    show={"score": "objective/scores", "kl": "objective/kl_k3_per_token", "tr_kl": "trpo/kl_after",
                          "tries": "trpo/line_search_tries"})

            # --- 7. checkpoint (policy, value head and its optimizer): every --save-interval, at the end, after a Ctrl-C ---
            run.checkpoint(step, model, tokenizer, modules={"value_head": value_head},
                           state={"value_optimizer": value_optimizer.state_dict()})
    return run.folder


if __name__ == "__main__":
    main(tyro.cli(Args))
