"""GRPO: Group Relative Policy Optimization, in one file.

Paper: DeepSeekMath, Shao et al. 2024, https://arxiv.org/abs/2402.03300 (section 4.1).

For each prompt, sample G completions; each completion's advantage is its reward's z-score within
its group, the same for every token; no value model. The loss is PPO's clipped surrogate on the
per-token ratio π_θ/π_old plus β times the k3 estimate of KL(π_θ ‖ π_ref) to the frozen start model:

    J = mean_i 1/|o_i| Σ_t [ min(ρ_it A_i, clip(ρ_it, 1-ε, 1+ε_high) A_i) - β KL_it ]

Implemented: group/batch/no advantage scaling, the paper's per-sequence aggregation and the Dr. GRPO
and DAPO ones, asymmetric clipping (ε_high), μ updates per batch, rule rewards and a reward model.
Left out: DAPO's dynamic sampling and overlong shaping, GSPO's sequence-level ratio, vLLM.

Walkthrough: docs/walkthrough.md §6 (group z-scores, k3, the loss), §1 (log-probabilities).
Run: `python grpo.py` (embedded SmolLM2-135M-Instruct, arithmetic), `python grpo.py --help`.
Several processes: `torchrun --nproc-per-node N grpo.py ...` (DDP; README, "Several processes").
"""

import contextlib
import copy
import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from tqdm import tqdm

import common


@dataclass
class Args:
    model: str = common.EMBEDDED_MODEL
    """policy to train: `smollm2` (embedded SmolLM2-135M-Instruct), a hub id such as `gpt2`, or a local folder"""
    task: str = "arithmetic"
    """built-in task: `arithmetic` ("What is A + B?", rule rewards) or `letter` (share of the letter a)"""
    data: str | None = None
    """JSONL file of {"prompt", "answer"?} lines; replaces the built-in task (up to 10 % held out, see --eval-data)"""
    eval_data: str | None = None
    """JSONL file of held-out prompts (with --data: then all of --data trains)"""
    reward_model: str | None = None
    """folder written by reward_model.py; its normalised score is added to the rule rewards"""
    reward_model_weight: float = 1.0
    """weight of the reward-model score in the total reward"""
    rule_weight: float = 1.0
    """weight of the task's rule rewards in the total reward (0: reward model alone)"""
    format_weight: float = 0.0
    """weight of the format reward (1 when the completion is just a number) beside correctness (weight 1)"""
    steps: int = 100
    """number of training steps (one batch of rollouts each)"""
    prompts_per_step: int = 4
    """distinct prompts per step"""
    group_size: int = 8
    """G: completions sampled per prompt; advantages are computed within each group"""
    max_new_tokens: int = 32
    """completion budget; completions without EOS by then are marked truncated"""
    temperature: float = 1.0
    """sampling temperature; log-probabilities use the same temperature"""
    top_p: float = 1.0
    """nucleus sampling, 0 < top_p ≤ 1; 1.0 samples from the full distribution"""
    lr: float = 5e-6
    """AdamW learning rate (the paper uses 1e-6 for 7B models; 5e-6 suits the 135M default)"""
    beta: float = 0.04
    """β: weight of the k3 KL penalty to the reference model (paper: 0.04; 0 skips the reference pass)"""
    epsilon: float = 0.2
    """ε: lower clip of the ratio, 1-ε (0 < ε < 1)"""
    epsilon_high: float | None = None
    """upper clip 1+ε_high (DAPO uses 0.28); default: ε"""
    num_iterations: int = 1
    """μ: optimizer steps on each batch of rollouts (1: the ratio is always 1, as in the paper)"""
    minibatch_size: int = 8
    """rows per forward/backward pass; gradients are accumulated over the batch, which bounds memory"""
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    """aggregation: per-sequence mean (paper), sum / (rows × max_new_tokens) (Dr. GRPO), token mean (DAPO)"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """divide advantages by the group's std (paper), the batch's std, or not at all (Dr. GRPO)"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    eval_interval: int = 20
    """greedy held-out evaluation every this many steps (and before the first, and after the last)"""
    eval_prompts: int = 64
    """size of the held-out prompt set (0: no evaluation)"""
    save_interval: int = 50
    """checkpoint every this many steps, and at the end"""
    seed: int = 1
    """seeds prompts, sampling and initialisation"""
    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:1`, ..."""
    gradient_checkpointing: bool = False
    """recompute each layer's activations in the backward pass: much less activation memory, ~30 % more compute"""
    lora_rank: int = 0
    """LoRA rank r: train peft adapters on the attention and MLP projections (0: full fine-tuning)"""
    lora_alpha: float = 32.0
    """LoRA scale α: the adapted weight is W + (α/r)·B A"""
    lora_merge: bool = False
    """with --lora-rank: also save checkpoint-merged/, the adapters merged into a plain transformers model"""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast (weights stay fp32): `auto` uses it on CUDA only"""
    output_dir: str = "runs"
    """TensorBoard events and checkpoints go to output_dir/run_name"""
    run_name: str | None = None
    """default: grpo_<task>_<seed>_<time>"""
    resume: str | None = None
    """continue the run in this folder from its last checkpoint (only --steps and the intervals may change)"""


# ----------------------------------------------------------------------------------------------
# The math: pure functions of tensors.


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps); rewards [B] with each group contiguous -> [B].

    A group whose rewards are all equal gets A = 0 (eps keeps 0/0 away). scale="batch" divides by the
    std of the whole batch, "none" not at all (Dr. GRPO)."""
    grouped = rewards.view(-1, group_size)  # [B/G, G]
    advantages = grouped - grouped.mean(1, keepdim=True)
    if scale == "group":
        advantages = advantages / (grouped.std(1, keepdim=True) + eps)
    elif scale == "batch":
        advantages = advantages / (rewards.std() + eps)
    return advantages.view(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """KL_t = π_ref/π_θ - log(π_ref/π_θ) - 1 per token (Schulman's k3: unbiased for KL(π_θ‖π_ref), ≥ 0)."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, *, beta: float, epsilon: float,
              epsilon_high: float, loss_type: str, max_new_tokens: int, num_rows: int | None = None,
              num_tokens=None):
    """The negated GRPO objective over a batch -> (loss, stats).

    logprobs, old_logprobs, ref_logprobs, mask: [B, T]; advantages: [B]. ref_logprobs may be None
    when beta = 0. Per token: l_it = -min(ρ_it A_i, clip(ρ_it, 1-ε, 1+ε_high) A_i) + β KL_it. Then
      grpo:    (1/N) Σ_i (1/|o_i|) Σ_t l_it
      dr_grpo: 1/(N·T_max) Σ_i Σ_t l_it
      dapo:    (1/Σ_i |o_i|) Σ_i Σ_t l_it
    N and Σ|o_i| default to this batch's; pass the whole batch's (num_rows, num_tokens) when it is
    split into minibatches, so that the minibatch losses add up to the whole batch's loss."""
    real = mask.bool()
    n_real = real.sum().clamp(min=1)
    num_rows = num_rows or mask.shape[0]
    num_tokens = num_tokens or n_real
    ratio = torch.exp(logprobs - old_logprobs)  # ρ_it
    A = advantages[:, None]
    per_token = -torch.min(ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * A)
    stats = {}
    if beta != 0:
        log_ratio = ref_logprobs - logprobs  # k3: π_ref/π_θ - log(π_ref/π_θ) - 1 (k3_kl above)
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + beta * kl
        stats["kl"] = torch.where(real, kl, 0.0).sum().detach() / n_real
    per_token = torch.where(real, per_token, 0.0)  # not per_token * mask: a NaN after the EOS stays out
    if loss_type == "grpo":
        loss = (per_token.sum(1) / real.sum(1).clamp(min=1)).sum() / num_rows
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (num_rows * max_new_tokens)
    elif loss_type == "dapo":
        loss = per_token.sum() / num_tokens
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    with torch.no_grad():  # where the clip is active the token's gradient is zero
        stats["clip_low"] = ((ratio < 1 - epsilon) & (A < 0) & real).sum() / n_real
        stats["clip_high"] = ((ratio > 1 + epsilon_high) & (A > 0) & real).sum() / n_real
        stats["ratio"] = torch.where(real, ratio, 0.0).sum() / n_real
    return loss, stats


# ----------------------------------------------------------------------------------------------


# Valid values of the numeric flags ("(": that end excluded). Checked before anything loads.
RANGES = {"reward_model_weight": "[-inf, inf]", "rule_weight": "[-inf, inf]", "format_weight": "[-inf, inf]",
          "steps": "[1, inf)", "prompts_per_step": "[1, inf)", "group_size": "[2, inf)", "max_new_tokens": "[1, inf)",
          "temperature": "(0, inf)", "top_p": "(0, 1]", "lr": "(0, inf)", "beta": "[0, inf)", "epsilon": "(0, 1)",
          "epsilon_high": "(0, inf)", "num_iterations": "[1, inf)", "minibatch_size": "[1, inf)",
          "max_grad_norm": "(0, inf)", "eval_interval": "[1, inf)", "eval_prompts": "[0, inf)",
          "save_interval": "[1, inf)", "lora_rank": "[0, inf)", "lora_alpha": "(0, inf)"}
MAY_CHANGE = ("steps", "eval_interval", "save_interval")  # what --resume takes from its command line


def check_args(args: Args) -> None:
    """Every error that can be found before a model is loaded or a file written."""
    if args.group_size < 2:
        raise SystemExit(f"--group-size {args.group_size}: GRPO needs at least 2 completions per prompt to compare")
    common.check_ranges(args, RANGES)
    world = common.world_size()
    if args.prompts_per_step % world:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} is not divisible by the {world} processes; "
                         "each process samples the same number of prompts")
    batch = args.prompts_per_step // world * args.group_size  # rows on each process
    if batch % args.minibatch_size:
        raise SystemExit(f"--prompts-per-step × --group-size = {batch} (per process) is not divisible by "
                         f"--minibatch-size {args.minibatch_size}; pick a minibatch size that divides it")
    if args.lora_merge and not args.lora_rank:
        raise SystemExit("--lora-merge needs --lora-rank > 0")


def main(args: Args) -> Path:
    # --- checks, before anything is loaded or written ---
    state = None
    if args.resume:
        args, state = common.resume(args, "grpo", MAY_CHANGE)
    check_args(args)
    train_rows, eval_rows = common.load_prompts(args.task, args.data, args.seed, args.eval_prompts, args.eval_data)
    common.check_rewards(args.data, train_rows + eval_rows, args.reward_model, args.rule_weight)
    common.check_model_name(args.model)
    prompts_name = args.task if args.data is None else Path(args.data).stem
    run_dir = Path(args.resume) if args.resume else common.run_folder(args.output_dir, args.run_name,
                                                                       f"grpo_{prompts_name}_{args.seed}")
    device = common.pick_device(args.device)
    epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high

    # --- set-up: processes, seed, models, optimizer, logging (rank 0 only) ---
    rank, world = common.init_distributed(device), common.world_size()
    common.set_seed(args.seed)
    model, tokenizer = common.load_model(args.model, device)
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    if args.lora_rank:
        model = common.add_lora(model, args.lora_rank, args.lora_alpha)
    # The frozen start: a copy, or with LoRA the same network with its adapters off (common.adapters_off).
    ref_model = None if args.beta == 0 else model if args.lora_rank else copy.deepcopy(model).requires_grad_(False)
    # Under torchrun, DDP averages the gradients; generation and evaluation use the bare model.
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    scorer = common.RewardScorer(args.reward_model, device, args.dtype) if args.reward_model else None
    rules = common.rule_rewards(args.task, args.data, train_rows, args.format_weight)
    reward_fn = functools.partial(common.compute_rewards, rules=rules, rule_weight=args.rule_weight, scorer=scorer,
                                  scorer_weight=args.reward_model_weight)  # (rows, completions) -> (total, parts)
    params = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters only
    optimizer = torch.optim.AdamW(params, lr=args.lr, fused=True)  # fused: one pass, no temporaries
    # Each process samples its own prompts_per_step / world prompts: seeds seed + rank.
    G, n_prompts = args.group_size, args.prompts_per_step // world
    batch_size = n_prompts * G
    # Minibatches made of whole groups run each prompt once (common.pack).
    shared = G if args.minibatch_size % G == 0 else 1
    rng = torch.Generator().manual_seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    first_step = 1
    if state is not None:  # --resume: the weights, the optimizer and every random state of the last checkpoint
        common.load_weights(model, run_dir / "checkpoint")
        optimizer.load_state_dict(state["optimizer"])
        common.set_rng_states(state["rng"], rng)
        first_step = state["step"] + 1
    writer = common.make_writer(run_dir, args, first_step) if rank == 0 else None
    interrupt = common.Interrupt()
    if rank == 0:
        print(f"run folder: {run_dir}; {len(train_rows)} training prompts, {len(eval_rows)} held out"
              + (" (too few to hold any out: pass --eval-data)" if args.data and args.eval_prompts and not eval_rows
                 else ""))

    def run_eval(step):
        scores = common.evaluate(model, tokenizer, eval_rows, reward_fn, args.max_new_tokens, args.dtype)
        for k, v in scores.items():
            writer.add_scalar(f"eval/{k}", v, step)
        return scores

    saved = [first_step - 1 if state else None]  # the step of the last checkpoint

    def save(step):  # collective under torchrun (every process's random state); rank 0 writes
        saved[0] = step
        training = {"script": "grpo", "step": step, "args": asdict(args), "optimizer": optimizer.state_dict(),
                    "rng": common.rng_states(rng)}
        if rank == 0:
            common.save_checkpoint(model, tokenizer, run_dir / "checkpoint", {common.TRAINING_STATE: training})
            if args.lora_merge and step == args.steps:  # the adapters merged into a plain transformers model
                common.save_checkpoint(copy.deepcopy(model).merge_and_unload(), tokenizer, run_dir / "checkpoint-merged")

    scores, stop = {}, False
    try:
        if eval_rows and rank == 0 and state is None:
            print(f"evaluating on {len(eval_rows)} held-out prompts (greedy) ...", flush=True)
            scores = run_eval(0)
            print(f"held-out score before training: {scores['reward']:.3f}", flush=True)
        bar = tqdm(range(first_step, args.steps + 1), desc="grpo", mininterval=1, disable=rank != 0,
                   initial=first_step - 1, total=args.steps)
        for step in bar:
            # --- 1. rollouts: G completions for each of prompts_per_step prompts ---
            t0 = time.time()
            picks = torch.randint(len(train_rows), (n_prompts,), generator=rng).tolist()
            rows = [train_rows[i] for i in picks for _ in range(G)]  # groups are contiguous
            with common.autocast(device, args.dtype):
                rollout = common.generate(model, tokenizer, [train_rows[i]["prompt"] for i in picks],
                                          args.max_new_tokens, args.temperature, args.top_p, group_size=G)
            mask = rollout.completion_mask  # [B, T]
            gen_seconds = time.time() - t0

            # --- 2. rewards and group advantages ---
            rewards, parts = reward_fn(rows, rollout.texts)
            advantages = group_advantages(rewards, G, args.scale_rewards).to(device)  # [B]

            # --- 3. reference log-probs (for the KL) and old log-probs (only needed when μ > 1) ---
            t1 = time.time()
            with torch.no_grad(), common.autocast(device, args.dtype), common.adapters_off(ref_model):
                ref_logprobs = (common.completion_logprobs(ref_model, rollout, args.temperature, args.minibatch_size,
                                                           group_size=shared) if ref_model is not None else None)
                old_logprobs = (common.completion_logprobs(model, rollout, args.temperature, args.minibatch_size,
                                                           group_size=shared) if args.num_iterations > 1 else None)

            # --- 4. μ optimizer steps, each accumulating gradients over minibatches ---
            # The loss's token normaliser is the whole batch's (over all processes) / world: DDP's
            # average of the per-process gradients is then the whole batch's gradient.
            num_tokens = common.all_mean(mask.sum().float())
            stats = []
            for _ in range(args.num_iterations):
                optimizer.zero_grad()
                minibatches = torch.arange(batch_size).split(args.minibatch_size)
                for k, rows_mb in enumerate(minibatches):
                    mb = common.rollout_slice(rollout, rows_mb)
                    # Under DDP, gradients are all-reduced once per optimizer step, in the last minibatch's backward.
                    last = k == len(minibatches) - 1
                    with common.autocast(device, args.dtype), (train_model.no_sync() if world > 1 and not last
                                                                  else contextlib.nullcontext()):
                        logprobs, entropy = common.completion_logprobs(train_model, mb, args.temperature, entropy=True,
                                                                       group_size=shared)  # [b, T] each
                        # With μ = 1 the old policy is the current one: ratio = 1, gradient of ρ·A is ∇logπ·A.
                        old = logprobs.detach() if old_logprobs is None else old_logprobs[rows_mb]
                        ref = None if ref_logprobs is None else ref_logprobs[rows_mb]
                        loss, s = grpo_loss(logprobs, old, ref, advantages[rows_mb], mb.completion_mask,
                                            beta=args.beta, epsilon=args.epsilon, epsilon_high=epsilon_high,
                                            loss_type=args.loss_type, max_new_tokens=args.max_new_tokens,
                                            num_rows=batch_size, num_tokens=num_tokens)
                        loss.backward()
                    stats.append({**s, "loss": loss.detach(), "entropy": common.masked_mean(entropy, mb.completion_mask)})
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                common.check_finite(grad_norm, "the gradient norm")  # a NaN loss gives NaN gradients: stop here
                optimizer.step()
            update_seconds = time.time() - t1

            # --- 5. logging (each figure is this process's, then averaged over processes) ---
            lengths = mask.sum(1).float()
            group_std = rewards.view(-1, G).std(1)
            metrics = {
                "reward/mean": rewards.mean(), "reward/std": rewards.std(),
                "reward/zero_std_groups": (group_std < 1e-6).float().mean(),
                **{f"reward/{k}": v.mean() for k, v in parts.items()},
                "advantage/mean": advantages.mean(), "advantage/std": advantages.std(),
                "advantage/abs_max": advantages.abs().max(),
                "completion/length_mean": lengths.mean(), "completion/length_min": lengths.min(),
                "completion/length_max": lengths.max(), "completion/truncated": rollout.truncated.float().mean(),
                **{f"train/{k}": torch.stack([s[k] for s in stats]).mean() for k in stats[0]},
                "train/grad_norm": grad_norm, "train/lr": optimizer.param_groups[0]["lr"],
                "time/generation_s": gen_seconds, "time/update_s": update_seconds,
                "time/tokens_per_s": lengths.sum() / gen_seconds,
                "time/update_tokens_per_s": lengths.sum() * args.num_iterations / update_seconds,
            }
            metrics = common.reduce_metrics(metrics, device)  # one host sync (and one all-reduce) per step
            if world > 1:
                metrics["dist/replica_spread"] = common.replica_spread(model)  # 0 when all processes agree
            if rank == 0:
                for k, v in metrics.items():
                    writer.add_scalar(k, v, step)
                if step % 10 == 1:
                    common.log_samples(writer, step, [r["prompt"] for r in rows], rollout.texts, rewards)
                if eval_rows and (step % args.eval_interval == 0 or step == args.steps):
                    scores = run_eval(step)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics.get('train/kl', 0):.4f}",
                                eval=f"{scores.get('reward', float('nan')):.3f}")

            # --- 6. checkpoint: every --save-interval steps, at the end, and after a Ctrl-C ---
            stop = interrupt.stop_now(device)
            if step % args.save_interval == 0 or step == args.steps or stop:
                save(step)
            if stop:
                break
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, the last checkpoint as it was
        stop = True
    finally:
        interrupt.close()
        if writer is not None:
            writer.close()
    if world > 1:
        torch.distributed.barrier()  # rank 0 may still be evaluating or saving: leave together
        torch.distributed.destroy_process_group()
    if rank == 0:
        checkpoint = run_dir / "checkpoint"
        if stop and saved[0] is None:
            print("stopped before the first checkpoint: nothing to resume")
        elif stop:
            print(f"stopped; the checkpoint of step {saved[0]} is in {checkpoint}. Resume with: "
                  f"python grpo.py --resume {run_dir}" + (f" --steps {args.steps}" if args.steps != Args.steps else ""))
        else:
            print(f"done: held-out score {scores.get('reward', float('nan')):.3f} after {args.steps} steps; "
                  f"checkpoint: {checkpoint}; tensorboard --logdir {run_dir}")
    if stop:
        raise SystemExit(130)
    return run_dir


if __name__ == "__main__":
    main(tyro.cli(Args))
