"""GRPO: Group Relative Policy Optimization, in one file.

Paper: DeepSeekMath, Shao et al. 2024, https://arxiv.org/abs/2402.03300 (section 4.1).

For each prompt, sample G completions; each completion's advantage is its reward's z-score within
its group, the same for every token; no value model. The loss is PPO's clipped surrogate on the
per-token ratio π_θ/π_old plus β times the k3 estimate of the KL to the frozen start model π_ref:

    J = mean_i 1/|o_i| Σ_t [ min(ρ_it A_i, clip(ρ_it, 1-ε, 1+ε_high) A_i) - β KL_it ]

Implemented: group/batch/no advantage scaling; the paper's per-sequence aggregation and the Dr. GRPO
and DAPO ones; asymmetric clipping (ε_high); μ updates per batch; the k3, k1 and k3-ratio KL terms;
DAPO's dynamic sampling, overlong shaping and truncated-completion masking; GSPO's sequence-level
ratio; rule rewards, a reward model and your own reward function. Left out: vLLM, multi-turn rollouts.

Walkthrough: docs/walkthrough.md §6 (GRPO: the group is the baseline), §4 (Two other policies: π_old and π_ref).
Run: `python grpo.py` (embedded SmolLM2-135M-Instruct, arithmetic), `python grpo.py --help`.
Several processes: `torchrun --nproc-per-node N grpo.py ...` (DDP; `--fsdp` shards the models; README, "Several processes").
The run's machinery (loading, processes, checkpoints, Ctrl-C, logging) is in plumbing/; the loop is `main`.
"""

import sys
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

import common
import plumbing


@dataclass
class Args(plumbing.TrainArgs):
    """GRPO: G completions per prompt, group-normalised rewards as advantages, no value model. The flags every
    RL script shares (--model, --data, --steps, --seed, ...) are declared once in plumbing.RLArgs and TrainArgs."""

    prompts_per_step: int = 4
    """distinct prompts per step (over all processes)"""
    group_size: int = 8
    """G: completions sampled per prompt; advantages are computed within each group"""
    lr: float = 5e-6
    """AdamW learning rate (the paper uses 1e-6 for 7B models; 5e-6 suits the 135M default)"""
    beta: float = 0.04
    """β: weight of the KL penalty to the reference model (paper: 0.04; 0 skips the reference pass)"""
    kl_estimator: Literal["k3", "k1", "k3_ratio", "none"] = "k3"
    """the KL term in the loss: k3 (paper), k1, k3 weighted by π_θ/π_old (DeepSeek-V3.2), or none (no term, no reference pass)"""
    epsilon: float = 0.2
    """ε: lower clip of the ratio, 1-ε (0 < ε < 1)"""
    epsilon_high: float | None = None
    """upper clip 1+ε_high (DAPO uses 0.28; None: ε)"""
    num_iterations: int = 1
    """μ: optimizer steps on each batch of rollouts (1: the ratio is always 1, as in the paper)"""
    micro_batch_size: int = 8
    """completions (rows) per forward/backward pass; their gradients add up over the batch before each optimizer step (bounds memory, not the update)"""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "cispo"] = "grpo"
    """aggregation: per-sequence mean (paper), sum / (rows × max_new_tokens) (Dr. GRPO), token mean (DAPO); cispo: MiniMax-M1's clipped, detached IS weight times A log π, token mean"""
    is_correction: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "none"] = "token_truncate"
    """weight each token's loss by π_trainer/π_sampler (common.sampler_correction): truncated at --is-cap per token (TIS, the default: Yao et al. 2025; OLMo RL's setting) or per completion, or masked outside [1/cap, cap]. Sampler and trainer share the weights here, so the gap is rounding and kernels and truncation never drops a token; TRL's sequence_mask default is for vLLM's larger gaps"""
    is_cap: float = 2.0
    """C of --is-correction (Yao et al. 2025 use 2)"""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """the ratio per token (paper), or one per completion, the geometric mean of its token ratios (GSPO)"""
    dynamic_sampling: bool = False
    """DAPO: replace groups whose total rewards are all equal (no gradient) with fresh ones. DAPO filters on accuracy; this on the total reward (format, overlong and reward-model terms included)"""
    dynamic_sampling_rounds: int = 4
    """with --dynamic-sampling: at most this many generation rounds per step; then equal-reward groups fill the batch"""
    overlong_buffer: int = 0
    """DAPO's soft overlong penalty: 0 up to max_new_tokens − buffer tokens, then down to −1 (0: off)"""
    mask_truncated_completions: bool = False
    """leave completions without EOS out of the loss (DAPO, TRL's mask_truncated_completions)"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """divide advantages by the group's std (paper), the batch's std, or not at all (Dr. GRPO)"""


# ----------------------------------------------------------------------------------------------
# The math: pure functions of tensors.


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4,
                     batch_std: float | None = None) -> torch.Tensor:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps); rewards [B] with each group contiguous -> [B].

    A group whose rewards are all equal gets A = 0 (eps keeps 0/0 away). scale="batch" divides by the
    std of the whole batch (batch_std: over all processes; default this batch's), "none" not at all (Dr. GRPO)."""
    grouped = rewards.view(-1, group_size)  # [B/G, G]
    advantages = grouped - grouped.mean(1, keepdim=True)
    if scale == "group":
        advantages = advantages / (grouped.std(1, keepdim=True) + eps)
    elif scale == "batch":
        advantages = advantages / ((rewards.std() if batch_std is None else batch_std) + eps)
    return advantages.view(-1)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13): 0 up to max_new_tokens − buffer
    tokens, then falling linearly to −1 at max_new_tokens. lengths [B] -> [B]."""
    return ((max_new_tokens - buffer - lengths.float()) / buffer).clamp(-1.0, 0.0)


def kl_penalty(logprobs, ref_logprobs, old_logprobs, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) at the sampled tokens [B, T], for the loss. With r = π_ref/π_θ
    (Schulman, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html):
      k1:       −log r                 unbiased in value, but E_π[∇ log π] = 0: as a loss term it pulls nowhere on average
      k3:       r − log r − 1          the GRPO paper's: ≥ 0, unbiased and low-variance for tokens sampled from π_θ
      k3_ratio: (π_θ/π_old)(r − log r − 1)   DeepSeek-V3.2's: k3 importance-weighted to the tokens π_old sampled
    The gradients are not those of the KL each estimates: on-policy, E[∇k3] = ∇KL(π_ref ‖ π_θ), the forward
    KL (OpenRLHF#1309, verl#2953), while E[∇k3_ratio] = ∇KL(π_θ ‖ π_ref), the reverse one."""
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    k3 = torch.exp(log_r) - log_r - 1
    if estimator == "k3":
        return k3
    if estimator == "k3_ratio":
        return torch.exp(logprobs - old_logprobs) * k3
    raise ValueError(f"unknown KL estimator {estimator!r}")


def grpo_loss(logprobs, old_logprobs, advantages, mask, *, kl=None, beta: float, epsilon: float, epsilon_high: float,
              loss_type: str, max_new_tokens: int, importance_sampling_level: str = "token",
              num_rows: int | None = None, num_tokens=None, is_weights=None):
    """The negated GRPO objective over a batch -> (loss, stats).

    logprobs, old_logprobs, mask: [B, T]; advantages: [B]; kl: the per-token KL estimate [B, T]
    (kl_penalty), or None for no KL term; is_weights: the sampler correction w_it [B, T] (no gradient),
    or None. Per token:
      l_it = -w_it min(ρ_it A_i, clip(ρ_it, 1-ε, 1+ε_high) A_i) + β KL_it,   ρ_it = π_θ/π_old (token level),
    or at sequence level (GSPO, arXiv 2507.18071) one ratio per completion, ρ_i = exp(mean_t log ρ_it),
    clipped as a whole; or (cispo, MiniMax-M1 arXiv 2506.13585) the clipped ratio as a detached weight,
      l_it = -w_it sg(min(ρ_it, 1+ε_high)) A_i log π_θ(o_it) + β KL_it,
    so that no token's gradient is switched off. Then
      grpo:    (1/N) Σ_i (1/|o_i|) Σ_t l_it
      dr_grpo: 1/(N·T_max) Σ_i Σ_t l_it
      dapo, cispo: (1/Σ_i |o_i|) Σ_i Σ_t l_it
    N and Σ|o_i| default to this batch's; pass the whole batch's (num_rows, num_tokens) when it is
    split into minibatches, so that the minibatch losses add up to the whole batch's loss."""
    real = mask.bool()
    n_real = real.sum().clamp(min=1)
    num_rows = num_rows or mask.shape[0]
    num_tokens = num_tokens or n_real
    log_ratio = torch.where(real, logprobs - old_logprobs, 0.0)
    if importance_sampling_level == "sequence":  # the geometric mean of the token ratios, at every token
        log_ratio = (log_ratio.sum(1, keepdim=True) / real.sum(1, keepdim=True).clamp(min=1)).expand_as(log_ratio)
    ratio = torch.exp(log_ratio)  # ρ
    A = advantages[:, None]
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=1 + epsilon_high).detach() * A * logprobs
    else:
        per_token = -torch.min(ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * A)
    if is_weights is not None:
        per_token = is_weights * per_token
    stats = {}
    if kl is not None:
        per_token = per_token + beta * kl
        stats["kl"] = torch.where(real, kl, 0.0).sum().detach() / n_real
    per_token = torch.where(real, per_token, 0.0)  # not per_token * mask: a NaN after the EOS stays out
    if loss_type == "grpo":
        loss = (per_token.sum(1) / real.sum(1).clamp(min=1)).sum() / num_rows
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (num_rows * max_new_tokens)
    elif loss_type in ("dapo", "cispo"):
        loss = per_token.sum() / num_tokens
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    with torch.no_grad():  # where the clip is active the token's gradient is zero (cispo: only its weight is capped)
        cispo = loss_type == "cispo"  # one cap, whatever the advantage's sign
        stats["clip_low"] = ((ratio < 1 - epsilon) & (A < 0) & real & (not cispo)).sum() / n_real
        stats["clip_high"] = ((ratio > 1 + epsilon_high) & ((A > 0) | cispo) & real).sum() / n_real
        stats["ratio"] = torch.where(real, ratio, 0.0).sum() / n_real
    return loss, stats


# ----------------------------------------------------------------------------------------------
# The loop's phases, then the loop.


@dataclass
class Groups:
    """A step's rollouts: groups of G completions of one prompt each, each group's rows contiguous."""

    rows: list[dict]  # [B] the prompt row of each completion ({"prompt", "answer", ...})
    rollout: common.Rollout  # [B] the completions and their masks
    rewards: torch.Tensor  # [B] total reward
    reward_terms: dict  # {name: [B]} each reward term, before weighting
    groups_drawn: int  # groups sampled for it (more than it holds under --dynamic-sampling)
    sampled_tokens: int  # completion tokens sampled for it, those of groups set aside included


def sample_groups(model, tokenizer, run, n_groups: int, args: Args) -> Groups:
    """Draw n_groups prompts, sample G completions for each and reward them. With --dynamic-sampling
    (DAPO §3.2), a group whose rewards are all equal (A = 0: no gradient) is set aside and fresh groups
    are drawn, for up to --dynamic-sampling-rounds rounds; informative groups fill the batch first.
    Under torchrun every process runs the same rounds (under FSDP, generation gathers shards: collective)."""
    G, prompts, candidates = args.group_size, run.train_rows, []  # candidates: (informative, one group), in the order drawn
    for _ in range(args.dynamic_sampling_rounds if args.dynamic_sampling else 1):
        picks = torch.randint(len(prompts), (n_groups,), generator=run.rng).tolist()
        with common.autocast(model.device, args.dtype), plumbing.gathered(model):  # FSDP: gathered once
            rollout = common.generate(model, tokenizer, [prompts[i]["prompt"] for i in picks], group_size=G, **run.sampling)
        rows = [prompts[i] for i in picks for _ in range(G)]
        rewards, terms = run.reward_fn(rows, rollout.texts)
        if args.overlong_buffer:
            lengths = rollout.completion_mask.sum(1).cpu()
            terms["overlong"] = overlong_penalty(lengths, args.max_new_tokens, args.overlong_buffer)
            rewards = rewards + terms["overlong"]
        for g in range(n_groups):
            r = slice(g * G, (g + 1) * G)
            group = Groups(rows[r], common.rollout_slice(rollout, r), rewards[r], {k: v[r] for k, v in terms.items()}, 1,
                           int(rollout.completion_mask[r].sum()))
            candidates.append((bool(rewards[r].std() > 0), group))
        full = sum(informative for informative, _ in candidates) >= n_groups
        if plumbing.all_agree(full, model.device):  # every process's batch is full
            break
    kept = [g for _, g in sorted(candidates, key=lambda c: not c[0])[:n_groups]]  # informative first, in the order drawn
    return Groups([row for g in kept for row in g.rows],
                  common.concat_rollouts([g.rollout for g in kept], tokenizer.pad_token_id),
                  torch.cat([g.rewards for g in kept]),
                  {k: torch.cat([g.reward_terms[k] for g in kept]) for k in kept[0].reward_terms},
                  len(candidates), sum(g.sampled_tokens for _, g in candidates))


# Valid values of GRPO's numeric flags ("(": that end excluded; the shared ones: plumbing.RANGES).
RANGES = {"prompts_per_step": "[1, inf)", "group_size": "[2, inf)", "lr": "(0, inf)", "beta": "[0, inf)",
          "epsilon": "(0, 1)", "epsilon_high": "(0, inf)", "num_iterations": "[1, inf)", "micro_batch_size": "[1, inf)",
          "dynamic_sampling_rounds": "[1, inf)", "overlong_buffer": "[0, inf)", "is_cap": "(1, inf)"}


def check_args(args: Args) -> None:
    """GRPO's own errors, found before a model is loaded or a file written."""
    if args.group_size < 2:
        raise SystemExit(f"--group-size {args.group_size}: GRPO needs at least 2 completions per prompt to compare")
    plumbing.check_ranges(args, RANGES)
    rows = plumbing.per_process(args.prompts_per_step, "--prompts-per-step") * args.group_size  # on each process
    if rows % args.micro_batch_size:
        raise SystemExit(f"--prompts-per-step × --group-size = {rows} (per process) is not divisible by "
                         f"--micro-batch-size {args.micro_batch_size}; pick a micro-batch size that divides it")
    if args.overlong_buffer > args.max_new_tokens:
        raise SystemExit(f"--overlong-buffer {args.overlong_buffer} is longer than --max-new-tokens {args.max_new_tokens}")
    mu_1 = "at --num-iterations 1 the ratio π_θ/π_old is 1 (nothing is clipped; its gradient is the same per token and per sequence)"
    plumbing.refuse_idle_flags(args, [
        *[(name, args.num_iterations == 1, mu_1) for name in ("epsilon", "epsilon_high", "importance_sampling_level")],
        ("dynamic_sampling_rounds", not args.dynamic_sampling, "it bounds --dynamic-sampling, which is off"),
        ("kl_estimator", args.beta == 0, "--beta 0 has no KL term"),
        ("beta", args.kl_estimator == "none", "--kl-estimator none has no KL term"),
        ("is_cap", args.is_correction == "none", "--is-correction none applies no weight to cap")])
    if args.importance_sampling_level == "sequence" and args.loss_type != "grpo" and plumbing.rank() == 0:
        print(f"warning: GSPO's sequence ratio with --loss-type {args.loss_type} weights each completion by its length; "
              "GSPO's paper averages per sequence (--loss-type grpo)", file=sys.stderr)


def main(args: Args):
    # --- set-up: every check before anything loads; processes; the policy, its reference, AdamW ---
    run = plumbing.Run("grpo", args, check_args)  # --resume, prompts, rewards, run folder, device, processes
    args, device = run.args, run.device
    no_kl = args.beta == 0 or args.kl_estimator == "none"
    model, ref_model, train_model, tokenizer = plumbing.load_policy(args, run, reference=not no_kl)
    params = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters only
    optimizer, scheduler = plumbing.adamw(params, args)
    run.restore(model, optimizer, scheduler)  # seeds (seed + rank), or the last checkpoint's states
    G, n_groups = args.group_size, plumbing.per_process(args.prompts_per_step, "--prompts-per-step")
    batch_size = n_groups * G  # completions on this process
    group_rows = G if args.micro_batch_size % G == 0 else 1  # micro-batches of whole groups run each prompt once (common.pack)
    epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high

    with run:  # the logs, Ctrl-C, the last line and the process group, whatever happens
        run.evaluate(0, model, tokenizer)
        for step in run.steps():
            # --- 1. rollouts: G completions for each of the prompts, and their rewards ---
            groups = sample_groups(model, tokenizer, run, n_groups, args)
            rollout, rewards, mask = groups.rollout, groups.rewards, groups.rollout.completion_mask  # mask: [B, T]
            # the loss's mask: without the completions that never ended, with --mask-truncated-completions
            loss_mask = mask * ~rollout.truncated[:, None] if args.mask_truncated_completions else mask
            run.lap("generation")

            # --- 2. group advantages (--scale-rewards batch: divided by the std of the whole batch, all processes) ---
            batch_std = plumbing.all_std(rewards.to(device)).cpu() if args.scale_rewards == "batch" else None
            advantages = group_advantages(rewards, G, args.scale_rewards, batch_std=batch_std).to(device)  # [B]

            # --- 3. reference log-probs (for the KL) and old log-probs (only needed when μ > 1) ---
            with torch.no_grad(), common.autocast(device, args.dtype):
                with plumbing.adapters_off(ref_model):  # with LoRA: the same network, adapters off
                    ref_logprobs = (common.completion_logprobs(ref_model, rollout, args.temperature, args.micro_batch_size,
                                                               group_size=group_rows) if ref_model is not None else None)
                old_logprobs = (common.completion_logprobs(model, rollout, args.temperature, args.micro_batch_size,
                                                           group_size=group_rows) if args.num_iterations > 1 else None)
            trainer_logprobs = torch.zeros(mask.shape, device=device)  # π_old as the trainer scores it, filled below

            # --- 4. μ optimizer steps, each adding up the gradients of the batch's micro-batches ---
            # The loss's token normaliser is the whole batch's (over all processes) / world: DDP's (FSDP's)
            # average of the per-process gradients is then the whole batch's gradient.
            num_tokens = plumbing.all_mean(loss_mask.sum().float())
            stats = []
            for _ in range(args.num_iterations):
                optimizer.zero_grad()
                micro_batches = torch.arange(batch_size).split(args.micro_batch_size)
                for k, rows in enumerate(micro_batches):
                    mb = common.rollout_slice(rollout, rows)
                    with common.autocast(device, args.dtype), plumbing.accumulating(train_model, last=k == len(micro_batches) - 1):
                        logprobs, entropy = common.completion_logprobs(train_model, mb, args.temperature, entropy=True,
                                                                       group_size=group_rows)  # [b, T] each
                        # With μ = 1 the old policy is the current one: ratio = 1, gradient of ρ·A is ∇logπ·A.
                        old = logprobs.detach() if old_logprobs is None else old_logprobs[rows]
                        trainer_logprobs[rows] = old  # the sampler's tokens are weighted towards it
                        is_weights, _ = common.sampler_correction(old, mb.sampler_logprobs, mb.completion_mask,
                                                                  args.is_correction, args.is_cap)
                        kl = None if no_kl else kl_penalty(logprobs, ref_logprobs[rows], old, args.kl_estimator)
                        loss, s = grpo_loss(logprobs, old, advantages[rows], loss_mask[rows], kl=kl, beta=args.beta,
                                            epsilon=args.epsilon, epsilon_high=epsilon_high, loss_type=args.loss_type,
                                            max_new_tokens=args.max_new_tokens, num_rows=batch_size, num_tokens=num_tokens,
                                            importance_sampling_level=args.importance_sampling_level, is_weights=is_weights)
                        loss.backward()
                    stats.append({**s, "loss": loss.detach(), "entropy": common.masked_mean(entropy, mb.completion_mask)})
                grad_norm = plumbing.clip_grad_norm(params, args.max_grad_norm)
                plumbing.check_finite(grad_norm, "the gradient norm")  # a NaN loss gives NaN gradients: stop here
                optimizer.step()
            lr = scheduler.get_last_lr()[0]  # this step's
            scheduler.step()
            run.lap("update")

            # --- 5. evaluation and logging (each figure is this process's, then averaged over processes) ---
            metrics = {
                "reward/mean": rewards.mean(), "reward/std": rewards.std(),
                "reward/zero_std_groups": (rewards.view(-1, G).std(1) < 1e-6).float().mean(),
                "advantage/mean": advantages.mean(), "advantage/std": advantages.std(),
                "advantage/abs_max": advantages.abs().max(), "sampling/groups_drawn": groups.groups_drawn,
                **{f"train/{k}": torch.stack([s[k] for s in stats]).mean() for k in stats[0]},
                "train/grad_norm": grad_norm, "train/lr": lr,
                **common.sampler_mismatch(trainer_logprobs, rollout.sampler_logprobs, mask),
                "sampler/is_cut": common.sampler_correction(trainer_logprobs, rollout.sampler_logprobs, mask,
                                                            args.is_correction, args.is_cap)[1],
            }
            run.evaluate(step, model, tokenizer)
            run.log(step, metrics, groups.rows, rollout, rewards, groups.reward_terms, replicas=(model,),
                    show={"reward": "reward/mean", "kl": "train/kl"}, sampled_tokens=groups.sampled_tokens)

            # --- 6. checkpoint: every --save-interval steps, at the end, and after a Ctrl-C ---
            run.checkpoint(step, model, tokenizer, optimizer, scheduler)
    return run.folder


if __name__ == "__main__":
    main(tyro.cli(Args))
