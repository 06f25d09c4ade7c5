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
Several processes: `torchrun --nproc-per-node N grpo.py ...` (DDP; `--fsdp` shards the models; README, "Several processes").
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
import plumbing


@dataclass
class Args:
    model: str = plumbing.EMBEDDED_MODEL
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
    reward_fn: str | None = None
    """your own reward, `path/to/file.py:function_name`: f(prompts=, completions=, answer=) -> one float (or None) each"""
    reward_fn_weight: float = 1.0
    """weight of --reward-fn in the total reward"""
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
    """nucleus sampling, 0 < top_p ≤ 1 (1: off). Ratios and KL use the full softmax, as TRL's do"""
    top_k: int = 0
    """sample among the k most likely tokens only (0: off)"""
    min_p: float = 0.0
    """sample among tokens at least min_p times as likely as the most likely one (0: off)"""
    max_prompt_length: int | None = None
    """keep the last this many tokens of longer prompts (None: all); the count is logged"""
    lr: float = 5e-6
    """AdamW learning rate (the paper uses 1e-6 for 7B models; 5e-6 suits the 135M default)"""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """learning rate after the warmup: constant, or decaying to 0 at --steps"""
    warmup_steps: int = 0
    """steps of linear warmup from 0"""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay (torch's default, 0.01; TRL's is 0)"""
    adam_beta1: float = 0.9
    """AdamW β1"""
    adam_beta2: float = 0.999
    """AdamW β2"""
    beta: float = 0.04
    """β: weight of the KL penalty to the reference model (paper: 0.04; 0 skips the reference pass)"""
    kl_estimator: Literal["k3", "k1", "k3_ratio", "none"] = "k3"
    """the KL term in the loss: k3 (paper), k1, k3 weighted by π_θ/π_old (DeepSeek-V3.2), none (see kl_penalty)"""
    epsilon: float = 0.2
    """ε: lower clip of the ratio, 1-ε (0 < ε < 1)"""
    epsilon_high: float | None = None
    """upper clip 1+ε_high (DAPO uses 0.28); default: ε"""
    num_iterations: int = 1
    """μ: optimizer steps on each batch of rollouts (1: the ratio is always 1, as in the paper)"""
    minibatch_size: int = 8
    """rows per forward/backward pass; gradients are accumulated over the batch, which bounds memory"""
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    """aggregation: per-sequence mean (paper; the token mean was within noise of it here: docs/benchmarks.md), sum / (rows × max_new_tokens) (Dr. GRPO), token mean (DAPO)"""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """the ratio per token (paper), or one per completion, the geometric mean of its token ratios (GSPO)"""
    dynamic_sampling: bool = False
    """DAPO: replace groups whose rewards are all equal (no gradient) with freshly sampled ones"""
    dynamic_sampling_rounds: int = 4
    """with --dynamic-sampling: at most this many generation rounds per step; then equal-reward groups fill the batch"""
    overlong_buffer: int = 0
    """DAPO's soft overlong penalty: 0 up to max_new_tokens − buffer tokens, then down to −1 (0: off)"""
    mask_truncated_completions: bool = False
    """leave completions without EOS out of the loss (DAPO, TRL's mask_truncated_completions)"""
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
    fsdp: bool = False
    """under torchrun: shard the policy, its gradients and AdamW state, and the reference over the processes (FSDP2) instead of a copy on each (DDP)"""
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
      k3_ratio: (π_θ/π_old)(r − log r − 1)   DeepSeek-V3.2's: k3 importance-weighted to the tokens π_old sampled"""
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
              num_rows: int | None = None, num_tokens=None):
    """The negated GRPO objective over a batch -> (loss, stats).

    logprobs, old_logprobs, mask: [B, T]; advantages: [B]; kl: the per-token KL estimate [B, T]
    (kl_penalty), or None for no KL term. Per token:
      l_it = -min(ρ_it A_i, clip(ρ_it, 1-ε, 1+ε_high) A_i) + β KL_it,   ρ_it = π_θ/π_old (token level),
    or at sequence level (GSPO, arXiv 2507.18071) one ratio per completion, ρ_i = exp(mean_t log ρ_it),
    clipped as a whole. Then
      grpo:    (1/N) Σ_i (1/|o_i|) Σ_t l_it
      dr_grpo: 1/(N·T_max) Σ_i Σ_t l_it
      dapo:    (1/Σ_i |o_i|) Σ_i Σ_t l_it
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
    per_token = -torch.min(ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * A)
    stats = {}
    if kl is not None:
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
          "save_interval": "[1, inf)", "lora_rank": "[0, inf)", "lora_alpha": "(0, inf)", "reward_fn_weight": "[-inf, inf]",
          "top_k": "[0, inf)", "min_p": "[0, 1)", "max_prompt_length": "[1, inf)", "warmup_steps": "[0, inf)",
          "weight_decay": "[0, inf)", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)", "dynamic_sampling_rounds": "[1, inf)",
          "overlong_buffer": "[0, inf)"}
MAY_CHANGE = ("steps", "eval_interval", "save_interval")  # what --resume takes from its command line


def check_args(args: Args) -> None:
    """Every error that can be found before a model is loaded or a file written."""
    if args.group_size < 2:
        raise SystemExit(f"--group-size {args.group_size}: GRPO needs at least 2 completions per prompt to compare")
    plumbing.check_ranges(args, RANGES)
    world = plumbing.world_size()
    if args.prompts_per_step % world:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} is not divisible by the {world} processes; "
                         "each process samples the same number of prompts")
    batch = args.prompts_per_step // world * args.group_size  # rows on each process
    if batch % args.minibatch_size:
        raise SystemExit(f"--prompts-per-step × --group-size = {batch} (per process) is not divisible by "
                         f"--minibatch-size {args.minibatch_size}; pick a minibatch size that divides it")
    if args.lora_merge and not args.lora_rank:
        raise SystemExit("--lora-merge needs --lora-rank > 0")
    plumbing.check_fsdp(args.fsdp, args.lora_rank)
    if args.overlong_buffer > args.max_new_tokens:
        raise SystemExit(f"--overlong-buffer {args.overlong_buffer} is longer than --max-new-tokens {args.max_new_tokens}")


def main(args: Args) -> Path:
    # --- checks, before anything is loaded or written ---
    state = None
    if args.resume:
        args, state = plumbing.resume(args, "grpo", MAY_CHANGE)
    check_args(args)
    train_rows, eval_rows = common.load_prompts(args.task, args.data, args.seed, args.eval_prompts, args.eval_data)
    plumbing.check_rewards(args.data, train_rows + eval_rows, args.reward_model, args.rule_weight, args.reward_fn)
    functions = dict([plumbing.load_reward_function(args.reward_fn)]) if args.reward_fn else {}
    plumbing.check_model_name(args.model)
    prompts_name = args.task if args.data is None else Path(args.data).stem
    run_dir = Path(args.resume) if args.resume else plumbing.run_folder(args.output_dir, args.run_name,
                                                                       f"grpo_{prompts_name}_{args.seed}")
    device = plumbing.pick_device(args.device)
    epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high

    # --- set-up: processes, seed, models, optimizer, logging (rank 0 only) ---
    rank, world = plumbing.init_distributed(device), plumbing.world_size()
    plumbing.set_seed(args.seed)
    model, tokenizer = plumbing.load_model(args.model, device)
    if args.gradient_checkpointing:
        plumbing.enable_gradient_checkpointing(model)
    if args.lora_rank:
        model = plumbing.add_lora(model, args.lora_rank, args.lora_alpha)
    # The frozen start: a copy, or with LoRA the same network with its adapters off (plumbing.adapters_off).
    no_kl = args.beta == 0 or args.kl_estimator == "none"
    ref_model = None if no_kl else model if args.lora_rank else copy.deepcopy(model).requires_grad_(False)
    if state is not None:  # --resume: the weights of the last checkpoint (the reference stays the start)
        plumbing.load_weights(model, run_dir / "checkpoint")
    # Under torchrun, DDP keeps a copy on each process and averages the gradients (generation and
    # evaluation use the bare model); FSDP shards each model over the processes (plumbing.shard).
    if args.fsdp:
        for m in (model, ref_model) if ref_model is not None else (model,):
            plumbing.shard(m, bf16=common.uses_bf16(device, args.dtype))
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 and not args.fsdp else model
    scorer = common.RewardScorer(args.reward_model, device, args.dtype) if args.reward_model else None
    rules = common.rule_rewards(args.task, args.data, train_rows, args.format_weight)
    reward_fn = functools.partial(common.compute_rewards, rules=rules, rule_weight=args.rule_weight, scorer=scorer,
                                  scorer_weight=args.reward_model_weight,  # (rows, completions) -> (total, parts)
                                  functions={k: (f, args.reward_fn_weight) for k, f in functions.items()})
    params = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters only
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay, fused=True)  # fused: one pass, no temporaries
    scheduler = plumbing.lr_scheduler(optimizer, args.lr_schedule, args.warmup_steps, args.steps)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p)
    # Each process samples its own prompts_per_step / world prompts: seeds seed + rank.
    G, n_prompts = args.group_size, args.prompts_per_step // world
    batch_size = n_prompts * G
    # Minibatches made of whole groups run each prompt once (common.pack).
    shared = G if args.minibatch_size % G == 0 else 1
    rng = torch.Generator().manual_seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    first_step = 1
    if state is not None:  # --resume: the optimizer and every random state of the last checkpoint
        plumbing.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        plumbing.set_rng_states(state["rng"], rng)
        first_step = state["step"] + 1
    writer = plumbing.make_writer(run_dir, args, first_step) if rank == 0 else None
    interrupt = plumbing.Interrupt()
    if rank == 0:
        print(f"run folder: {run_dir}; {len(train_rows)} training prompts, {len(eval_rows)} held out"
              + (" (too few to hold any out: pass --eval-data)" if args.data and args.eval_prompts and not eval_rows
                 else ""))

    # Rank 0 evaluates while the others wait; under FSDP every process takes part in the forward passes.
    evaluates = bool(eval_rows) and (rank == 0 or args.fsdp)

    def run_eval(step):
        with plumbing.gathered(model):
            scores = common.evaluate(model, tokenizer, eval_rows, reward_fn, args.max_new_tokens, args.dtype)
        for k, v in scores.items():
            if writer is not None:
                writer.add_scalar(f"eval/{k}", v, step)
        return scores

    saved = [first_step - 1 if state else None]  # the step of the last checkpoint

    def save(step):  # collective under torchrun (random states; FSDP's shards); rank 0 writes
        saved[0] = step
        weights = plumbing.full_state_dict(model)  # under FSDP gathered on rank 0; else None: the model's own
        training = {"script": "grpo", "step": step, "args": asdict(args), "scheduler": scheduler.state_dict(),
                    "optimizer": plumbing.optimizer_state(model, optimizer), "rng": plumbing.rng_states(rng)}
        if rank == 0:
            plumbing.save_checkpoint(model, tokenizer, run_dir / "checkpoint", {plumbing.TRAINING_STATE: training},
                                     state_dict=weights)
            if args.lora_merge and step == args.steps:  # the adapters merged into a plain transformers model
                plumbing.save_checkpoint(copy.deepcopy(model).merge_and_unload(), tokenizer, run_dir / "checkpoint-merged")

    scores, stop = {}, False
    try:
        if evaluates and state is None:  # under FSDP all processes evaluate; rank 0 speaks
            if rank == 0:
                print(f"evaluating on {len(eval_rows)} held-out prompts (greedy) ...", flush=True)
            scores = run_eval(0)
            if rank == 0:
                print(f"held-out score before training: {scores['reward']:.3f}", flush=True)
        bar = tqdm(range(first_step, args.steps + 1), desc="grpo", mininterval=1, disable=rank != 0,
                   initial=first_step - 1, total=args.steps)
        for step in bar:
            # --- 1. rollouts: G completions for each of prompts_per_step prompts, and their rewards ---
            # --dynamic-sampling (DAPO §3.2): a group whose rewards are all equal has A = 0 and no gradient;
            # such groups are set aside and fresh ones drawn, for up to --dynamic-sampling-rounds rounds.
            t0 = time.time()
            groups, drawn = [], 0  # groups: (informative, rows, rollout, rewards, parts), one group each
            for _ in range(args.dynamic_sampling_rounds if args.dynamic_sampling else 1):
                picks = torch.randint(len(train_rows), (n_prompts,), generator=rng).tolist()
                with common.autocast(device, args.dtype), plumbing.gathered(model):  # FSDP: gathered once
                    drawn_rollout = common.generate(model, tokenizer, [train_rows[i]["prompt"] for i in picks],
                                                    args.max_new_tokens, group_size=G,
                                                    max_prompt_length=args.max_prompt_length, **sampling)
                drawn_rows = [train_rows[i] for i in picks for _ in range(G)]  # groups are contiguous
                drawn_rewards, drawn_parts = reward_fn(drawn_rows, drawn_rollout.texts)
                if args.overlong_buffer:
                    lengths = drawn_rollout.completion_mask.sum(1).cpu()
                    drawn_parts["overlong"] = overlong_penalty(lengths, args.max_new_tokens, args.overlong_buffer)
                    drawn_rewards = drawn_rewards + drawn_parts["overlong"]
                for g in range(n_prompts):
                    rows_g = slice(g * G, (g + 1) * G)
                    groups.append((bool(drawn_rewards[rows_g].std() > 0), drawn_rows[rows_g],
                                   common.rollout_slice(drawn_rollout, rows_g), drawn_rewards[rows_g],
                                   {k: v[rows_g] for k, v in drawn_parts.items()}))
                drawn += n_prompts
                if sum(g[0] for g in groups) >= n_prompts:
                    break
            if args.dynamic_sampling:  # the informative groups first, in the order drawn
                groups = sorted(groups, key=lambda g: not g[0])[:n_prompts]
            rows = [row for g in groups for row in g[1]]
            rollout = common.concat_rollouts([g[2] for g in groups], tokenizer.pad_token_id)
            rewards = torch.cat([g[3] for g in groups])  # [B]
            parts = {k: torch.cat([g[4][k] for g in groups]) for k in groups[0][4]}
            mask = rollout.completion_mask  # [B, T]
            # the loss's mask: without the completions that never ended, with --mask-truncated-completions
            loss_mask = mask * ~rollout.truncated[:, None] if args.mask_truncated_completions else mask
            gen_seconds = time.time() - t0

            # --- 2. group advantages ---
            batch_std = None
            if args.scale_rewards == "batch":  # the std of the whole batch, over all processes
                n, mean = len(rewards) * world, plumbing.all_mean(rewards.mean())
                batch_std = (plumbing.all_mean(((rewards - mean) ** 2).mean()) * n / (n - 1)).sqrt()
            advantages = group_advantages(rewards, G, args.scale_rewards, batch_std=batch_std).to(device)  # [B]

            # --- 3. reference log-probs (for the KL) and old log-probs (only needed when μ > 1) ---
            t1 = time.time()
            with torch.no_grad(), common.autocast(device, args.dtype):
                with plumbing.adapters_off(ref_model):  # with LoRA: the same network, adapters off
                    ref_logprobs = (common.completion_logprobs(ref_model, rollout, args.temperature, args.minibatch_size,
                                                               group_size=shared) if ref_model is not None else None)
                old_logprobs = (common.completion_logprobs(model, rollout, args.temperature, args.minibatch_size,
                                                           group_size=shared) if args.num_iterations > 1 else None)

            # --- 4. μ optimizer steps, each accumulating gradients over minibatches ---
            # The loss's token normaliser is the whole batch's (over all processes) / world: DDP's (FSDP's)
            # average of the per-process gradients is then the whole batch's gradient.
            num_tokens = plumbing.all_mean(loss_mask.sum().float())
            stats = []
            for _ in range(args.num_iterations):
                optimizer.zero_grad()
                minibatches = torch.arange(batch_size).split(args.minibatch_size)
                for k, rows_mb in enumerate(minibatches):
                    mb = common.rollout_slice(rollout, rows_mb)
                    # Under DDP, gradients are all-reduced once per optimizer step, in the last minibatch's
                    # backward; FSDP reduce-scatters them in each (holding whole gradients costs memory).
                    accumulate = k < len(minibatches) - 1 and train_model is not model
                    with common.autocast(device, args.dtype), (train_model.no_sync() if accumulate
                                                                  else contextlib.nullcontext()):
                        logprobs, entropy = common.completion_logprobs(train_model, mb, args.temperature, entropy=True,
                                                                       group_size=shared)  # [b, T] each
                        # With μ = 1 the old policy is the current one: ratio = 1, gradient of ρ·A is ∇logπ·A.
                        old = logprobs.detach() if old_logprobs is None else old_logprobs[rows_mb]
                        kl = None if no_kl else kl_penalty(logprobs, ref_logprobs[rows_mb], old, args.kl_estimator)
                        loss, s = grpo_loss(logprobs, old, advantages[rows_mb], loss_mask[rows_mb], kl=kl,
                                            beta=args.beta, epsilon=args.epsilon, epsilon_high=epsilon_high,
                                            loss_type=args.loss_type, max_new_tokens=args.max_new_tokens,
                                            importance_sampling_level=args.importance_sampling_level,
                                            num_rows=batch_size, num_tokens=num_tokens)
                        loss.backward()
                    stats.append({**s, "loss": loss.detach(), "entropy": common.masked_mean(entropy, mb.completion_mask)})
                grad_norm = plumbing.clip_grad_norm(params, args.max_grad_norm)
                plumbing.check_finite(grad_norm, "the gradient norm")  # a NaN loss gives NaN gradients: stop here
                optimizer.step()
            lr = scheduler.get_last_lr()[0]  # this step's
            scheduler.step()
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
                "completion/prompts_truncated": rollout.prompt_truncated.float().mean(), "sampling/groups_drawn": drawn,
                **{f"train/{k}": torch.stack([s[k] for s in stats]).mean() for k in stats[0]},
                "train/grad_norm": grad_norm, "train/lr": lr,
                "time/generation_s": gen_seconds, "time/update_s": update_seconds,
                "time/tokens_per_s": lengths.sum() / gen_seconds,
                "time/update_tokens_per_s": lengths.sum() * args.num_iterations / update_seconds,
            }
            metrics = plumbing.reduce_metrics(metrics, device)  # one host sync (and one all-reduce) per step
            if train_model is not model:  # DDP
                metrics["dist/replica_spread"] = plumbing.replica_spread(model)  # 0 when all processes agree
            if evaluates and (step % args.eval_interval == 0 or step == args.steps):
                scores = run_eval(step)
            if rank == 0:
                for k, v in metrics.items():
                    writer.add_scalar(k, v, step)
                if step % 10 == 1:
                    plumbing.log_samples(writer, step, [r["prompt"] for r in rows], rollout.texts, rewards)
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
        plumbing.end_of_run("grpo", run_dir, stop, saved[0], scores.get("reward", float("nan")), args.steps,
                            args.steps != Args.steps)
    if stop:
        raise SystemExit(130)
    return run_dir


if __name__ == "__main__":
    main(tyro.cli(Args))
