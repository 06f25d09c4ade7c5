"""PPO for language models (RLHF style), in one file.

Papers: Schulman et al. 2017, https://arxiv.org/abs/1707.06347 (PPO); Ziegler et al. 2019,
https://arxiv.org/abs/1909.08593 (KL-penalised reward, adaptive KL); Huang et al. 2024, "The N
Implementation Details of RLHF with PPO" (https://iclr-blogposts.github.io/2024/blog/the-n-implementation-details-of-rlhf-with-ppo/).

One completion per prompt. Each completion token is an action; its reward is
    r_t = −β (log π_θ(y_t) − log π_ref(y_t))        (the KL penalty, at every token)
        + score                                      (task or reward-model score, at the last token)
A value head on the policy's last hidden state estimates V(s_t); GAE turns rewards and values into
advantages; the policy minimises the clipped surrogate and the value head a clipped squared error,
for several epochs of minibatches per batch of rollouts.

Implemented: fixed or adaptive β, missing-EOS penalty, advantage and reward whitening, value
clipping, a value head on the shared backbone with its own learning rate (saved with the
checkpoint). Left out: a separate value network, reward-model-based critic initialisation,
gradient accumulation.

Walkthrough: docs/walkthrough.md §3 (A value model as the baseline: returns and GAE), §5 (TRPO and PPO: improve the surrogate, stay close to π_old).
Run: `python ppo.py` (embedded SmolLM2-135M-Instruct, arithmetic), `python ppo.py --help`.
Several processes: `torchrun --nproc-per-node N ppo.py ...` (DDP; `--fsdp` shards the models; README, "Several processes").
The run's machinery (loading, processes, checkpoints, Ctrl-C, logging) is in plumbing/; the loop is `main`.
"""

from dataclasses import dataclass
from typing import Literal

import torch
import tyro

import common
import plumbing


@dataclass
class Args(plumbing.TrainArgs):
    """PPO for RLHF: one completion per prompt, a value head and GAE, a KL-penalised per-token reward. The flags every
    RL script shares (--model, --data, --steps, --seed, ...) are declared once in plumbing.RLArgs and TrainArgs."""

    prompts_per_step: int = 16
    """rollouts per step, one completion per prompt (over all processes)"""
    lr: float = 2e-6
    """AdamW learning rate of the policy"""
    value_lr: float = 1e-4
    """AdamW learning rate of the value head: a fresh linear layer, which the policy's rate would leave near its zero start"""
    beta: float = 0.05
    """β: KL-penalty coefficient in the per-token reward (initial value when --adaptive-kl)"""
    adaptive_kl: bool = False
    """adapt β towards --kl-target (Ziegler et al. 2019)"""
    kl_target: float = 6.0
    """with --adaptive-kl: target sequence KL (nats)"""
    kl_horizon: int = 10000
    """with --adaptive-kl: horizon of the controller, in rollouts"""
    gamma: float = 1.0
    """γ: discount"""
    lam: float = 0.95
    """λ: GAE parameter"""
    ppo_epochs: int = 4
    """passes over each batch of rollouts"""
    minibatch_size: int = 4
    """completions (rows) per optimizer step: each epoch shuffles the batch and takes one step per minibatch"""
    cliprange: float = 0.2
    """ε: policy ratio clip"""
    cliprange_value: float = 0.2
    """value prediction clip around the old value"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    missing_eos_penalty: float | None = -1.0
    """score given instead of the task/reward-model score to completions with no EOS (None: off)"""
    whiten_rewards: bool = False
    """scale per-token rewards to unit variance (mean kept) before GAE"""
    whiten_advantages: bool = True
    """whiten advantages over the batch (masked)"""
    is_correction: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "none"] = "token_truncate"
    """weight each token's policy loss by π_trainer/π_sampler (common.sampler_correction): truncated at --is-cap per token (TIS, the default: Yao et al. 2025) or per completion, or masked outside [1/cap, cap]; see grpo.py --help"""
    is_cap: float = 2.0
    """C of --is-correction (Yao et al. 2025 use 2)"""


# ----------------------------------------------------------------------------------------------
# The math: pure functions of tensors. Shapes: [B, T] over completion tokens unless noted.


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / sqrt(var + 1e-8) over mask == 1 (biased variance); shift_mean=False keeps the mean."""
    real = mask.bool()
    n = real.sum().clamp(min=1)
    mean = torch.where(real, x, 0.0).sum() / n
    var = torch.where(real, (x - mean) ** 2, 0.0).sum() / n
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(real, whitened, 0.0)


def per_token_rewards(logprobs, ref_logprobs, scores, mask, *, beta: float):
    """r_t = −β (log π − log π_ref) at every real token, + score [B] at the last real token.

    Returns (rewards, kl) with kl = log π − log π_ref (k1), both [B, T] and 0 after the EOS."""
    kl = torch.where(mask.bool(), logprobs - ref_logprobs, 0.0)
    rewards = -beta * kl
    last = mask.sum(1) - 1  # index of the EOS (or of the last token when there is none)
    rewards[torch.arange(len(last)), last] += scores
    return rewards, kl


def gae(rewards, values, mask, *, gamma: float, lam: float):
    """Generalised advantage estimation over the real tokens, bootstrapping from 0 after the last.

    δ_t = r_t + γ V_{t+1} − V_t ;  A_t = δ_t + γλ A_{t+1} ;  returns R_t = A_t + V_t.
    Rewards and values after the EOS are zeroed first, so nothing leaks across the end."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t + 1 < T else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, *, cliprange: float, is_weights=None):
    """L = mean_t w_t max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε, 1+ε)), ρ_t = π_θ/π_old -> (loss, stats); w_t: the
    sampler correction [B, T] (no gradient; common.sampler_correction), 1 when None."""
    real = mask.bool()
    n = real.sum().clamp(min=1)
    ratio = torch.exp(logprobs - old_logprobs)
    losses = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    per_token = torch.max(losses, clipped) * (1.0 if is_weights is None else is_weights)
    loss = torch.where(real, per_token, 0.0).sum() / n
    with torch.no_grad():
        stats = {
            "ratio": torch.where(real, ratio, 0.0).sum() / n,
            "clipfrac": ((clipped > losses) & real).sum() / n,
            # approx KL(π_old‖π_θ) ≈ (ρ − 1) − log ρ   (http://joschu.net/blog/kl-approx.html)
            "approxkl": torch.where(real, (ratio - 1) - (logprobs - old_logprobs), 0.0).sum() / n,
        }
    return loss, stats


def value_loss(values, old_values, returns, mask, *, cliprange_value: float):
    """L_V = ½ mean_t max((V − R)², (V_old + clip(V − V_old, −c, c) − R)²) -> (loss, stats)."""
    real = mask.bool()
    n = real.sum().clamp(min=1)
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses, losses_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * torch.where(real, torch.max(losses, losses_clipped), 0.0).sum() / n
    return loss, {"clipfrac": ((losses_clipped > losses) & real).sum().detach() / n}


def adaptive_kl_coef(beta: float, kl: float, *, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al.: e = clip(KL/target − 1, −0.2, 0.2); β ← β (1 + e · n_steps / horizon)."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return beta * (1 + error * n_steps / horizon)


def explained_variance(values, returns, mask) -> torch.Tensor:
    """1 − Var(R − V) / Var(R) over real tokens: 1 is a perfect critic, ≤ 0 a useless one."""
    real = mask.bool()
    n = real.sum().clamp(min=1)

    def var(x):  # masked, biased
        mean = torch.where(real, x, 0.0).sum() / n
        return torch.where(real, (x - mean) ** 2, 0.0).sum() / n

    return 1 - var(returns - values) / var(returns).clamp(min=1e-8)


# ----------------------------------------------------------------------------------------------
# The loop.


def make_value_head(model) -> torch.nn.Linear:
    """V(s_t): a linear layer on the policy's last hidden state, zero at the start (no noise in the first advantages)."""
    value_head = torch.nn.Linear(model.config.get_text_config().hidden_size, 1, device=model.device)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    return value_head


def forward(model, value_head, rollout, temperature: float):
    """Policy log-probs, entropy and values for a rollout (slice) -> three [B, T] tensors."""
    logits, hidden = common.forward_completion(model, rollout, hidden=True)  # [N, V], [N, H]: real tokens only
    mask = rollout.completion_mask
    logprobs, entropy = common.token_logprobs(logits, rollout.completion_ids[mask.bool()], temperature, entropy=True)
    with torch.autocast(hidden.device.type, enabled=False):  # values in fp32, also under bf16 autocast
        values = value_head(hidden.float()).squeeze(-1)
    return common.unpack(logprobs, mask), common.unpack(entropy, mask), common.unpack(values, mask)


# Valid values of PPO's numeric flags ("(": that end excluded; the shared ones: plumbing.RANGES).
RANGES = {"prompts_per_step": "[1, inf)", "lr": "(0, inf)", "value_lr": "(0, inf)", "beta": "[0, inf)", "kl_target": "(0, inf)",
          "kl_horizon": "[1, inf)", "gamma": "[0, 1]", "lam": "[0, 1]", "ppo_epochs": "[1, inf)",
          "minibatch_size": "[1, inf)", "is_cap": "(1, inf)", "cliprange": "(0, 1)", "cliprange_value": "(0, inf)", "vf_coef": "[0, inf)",
          "missing_eos_penalty": "[-inf, inf]"}


def check_args(args: Args) -> None:
    """PPO's own errors, found before a model is loaded or a file written."""
    plumbing.check_ranges(args, RANGES)
    rows = plumbing.per_process(args.prompts_per_step, "--prompts-per-step")
    if rows % args.minibatch_size:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} (per process: {rows}) is not divisible by "
                         f"--minibatch-size {args.minibatch_size}; pick a minibatch size that divides it")
    plumbing.refuse_idle_flags(args, [
        *[(name, not args.adaptive_kl, "it is a setting of --adaptive-kl, which is off") for name in ("kl_target", "kl_horizon")],
        ("adaptive_kl", args.beta == 0, "the controller multiplies β, and --beta 0 stays 0"),
        *[(name, args.vf_coef == 0, "--vf-coef 0 leaves the value loss out") for name in ("cliprange_value", "value_lr")],
        ("is_cap", args.is_correction == "none", "--is-correction none applies no weight to cap")])


def main(args: Args):
    # --- set-up: every check before anything loads; processes; policy + value head, reference, AdamW ---
    run = plumbing.Run("ppo", args, check_args)  # --resume, prompts, rewards, run folder, device, processes
    args, device = run.args, run.device
    model, ref_model, train_model, tokenizer = plumbing.load_policy(args, run)
    value_head = make_value_head(model)
    train_value_head = plumbing.distribute(run.resumed(value_head, "value_head"), args.fsdp)  # DDP, or FSDP in fp32
    policy_params, value_params = [p for p in model.parameters() if p.requires_grad], list(value_head.parameters())
    params = policy_params + value_params  # LoRA: the adapters and the value head
    optimizer, scheduler = plumbing.adamw([{"params": policy_params}, {"params": value_params, "lr": args.value_lr}], args)
    saved = run.restore(model, optimizer, scheduler, modules={"value_head": value_head})
    # Each process samples and whitens its own share of the prompts; β, adapted to the averaged KL, is the same everywhere.
    B, beta = plumbing.per_process(args.prompts_per_step, "--prompts-per-step"), saved.get("beta", args.beta)

    with run:  # the logs, Ctrl-C, the last line and the process group, whatever happens
        run.evaluate(0, model, tokenizer)
        for step in run.steps():
            # --- 1. rollouts: one completion per prompt ---
            rows = [run.train_rows[i] for i in torch.randint(len(run.train_rows), (B,), generator=run.rng).tolist()]
            with common.autocast(device, args.dtype), plumbing.gathered(model):  # FSDP: gathered once
                rollout = common.generate(model, tokenizer, [r["prompt"] for r in rows], **run.sampling)
            mask = rollout.completion_mask  # [B, T]
            run.lap("generation")

            # --- 2. scores; the missing-EOS penalty replaces the score of truncated completions ---
            scores, reward_terms = run.reward_fn(rows, rollout.texts)
            if args.missing_eos_penalty is not None:
                scores = torch.where(rollout.truncated.cpu(), args.missing_eos_penalty, scores)
            scores = scores.to(device)

            # --- 3. old log-probs and values, reference log-probs: no graph, in the first epoch's minibatches ---
            minibatches = [torch.randperm(B, generator=run.rng).split(args.minibatch_size) for _ in range(args.ppo_epochs)]
            old_logprobs, old_values, ref_logprobs = (torch.zeros(mask.shape, device=device) for _ in range(3))
            with torch.no_grad(), common.autocast(device, args.dtype):
                for rows_mb in minibatches[0]:
                    mb = common.rollout_slice(rollout, rows_mb)
                    old_logprobs[rows_mb], _, old_values[rows_mb] = forward(model, value_head, mb, args.temperature)
                    with plumbing.adapters_off(ref_model):  # with LoRA: the same network, adapters off
                        ref_logprobs[rows_mb] = common.completion_logprobs(ref_model, mb, args.temperature)
            is_weights, is_cut = common.sampler_correction(old_logprobs, rollout.sampler_logprobs, mask,  # sampler -> π_old
                                                           args.is_correction, args.is_cap)

            # --- 4. per-token rewards, GAE, whitening ---
            rewards, kl = per_token_rewards(old_logprobs, ref_logprobs, scores, mask, beta=beta)
            if args.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae(rewards, old_values, mask, gamma=args.gamma, lam=args.lam)
            if args.whiten_advantages:
                advantages = whiten(advantages, mask)

            # --- 5. PPO epochs over shuffled minibatches, one optimizer step each ---
            stats = []
            for epoch_minibatches in minibatches:
                for rows_mb in epoch_minibatches:
                    mb = common.rollout_slice(rollout, rows_mb)
                    with common.autocast(device, args.dtype):
                        logprobs, entropy, values = forward(train_model, train_value_head, mb, args.temperature)
                    pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[rows_mb], advantages[rows_mb], mb.completion_mask,
                                                    cliprange=args.cliprange, is_weights=is_weights[rows_mb])
                    vf_loss, vf_stats = value_loss(values, old_values[rows_mb], returns[rows_mb], mb.completion_mask,
                                                   cliprange_value=args.cliprange_value)
                    loss = pg_loss + args.vf_coef * vf_loss
                    optimizer.zero_grad()
                    loss.backward()
                    grad_norm = plumbing.clip_grad_norm(params, args.max_grad_norm)
                    plumbing.check_finite(grad_norm, "the gradient norm")  # a NaN loss gives NaN gradients: stop here
                    optimizer.step()
                    stats.append({"policy/loss": pg_loss.detach(), "value/loss": vf_loss.detach(), "train/grad_norm": grad_norm,
                                  "value/clipfrac": vf_stats["clipfrac"], **{f"policy/{k}": v for k, v in pg_stats.items()},
                                  "policy/entropy": common.masked_mean(entropy.detach(), mb.completion_mask)})
            run.lap("update")

            # --- 6. statistics (each figure is this process's, then averaged over processes) ---
            sequence_kl, non_score = plumbing.all_mean(kl.sum(1).mean()).item(), -beta * kl.sum(1)  # non-score reward [B]
            log_ratio = torch.where(mask.bool(), ref_logprobs - old_logprobs, 0.0).double()  # float64, expm1: k3 ≥ 0 at ~1e-9
            metrics = {
                "objective/scores": scores.mean(), "objective/kl": sequence_kl, "objective/kl_coef": beta,
                "objective/kl_k3_per_token": ((torch.expm1(log_ratio) - log_ratio) * mask).sum() / mask.sum(),
                "objective/non_score_reward": non_score.mean(), "objective/rlhf_reward": (scores + non_score).mean(),
                **{k: torch.stack([s[k] for s in stats]).mean() for k in stats[0]}, "train/lr": scheduler.get_last_lr()[0],
                "value/explained_variance": explained_variance(old_values, returns, mask),
                **common.sampler_mismatch(old_logprobs, rollout.sampler_logprobs, mask), "sampler/is_cut": is_cut,
            }

            # --- 7. the next step's learning rate; adaptive KL coefficient, from the mean sequence KL over all processes ---
            scheduler.step()
            if args.adaptive_kl:
                beta = adaptive_kl_coef(beta, sequence_kl, target=args.kl_target, horizon=args.kl_horizon,
                                        n_steps=args.prompts_per_step)

            # --- 8. evaluation, logging; checkpoint (policy, value head, β) when due, at the end, after a Ctrl-C ---
            run.evaluate(step, model, tokenizer)
            run.log(step, metrics, rows, rollout, scores, reward_terms, replicas=(model, value_head),
                    show={"score": "objective/scores", "kl": "objective/kl_k3_per_token"})
            run.checkpoint(step, model, tokenizer, optimizer, scheduler, modules={"value_head": value_head},
                           state={"beta": beta})
    return run.folder


if __name__ == "__main__":
    main(tyro.cli(Args))
