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
clipping, shared-backbone value head saved with the checkpoint. Left out: a separate value
network, reward-model-based critic initialisation, gradient accumulation.

Walkthrough: docs/walkthrough.md §4 (GAE, a worked example), §5 (the clip, the value loss).
Run: `python ppo.py` (embedded SmolLM2-135M-Instruct, arithmetic), `python ppo.py --help`.
Several processes: `torchrun --nproc-per-node N ppo.py ...` (DDP; `--fsdp` shards the models; README, "Several processes").
"""

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
    """weight of the reward-model score in the total score"""
    rule_weight: float = 1.0
    """weight of the task's rule rewards in the total score (0: reward model alone)"""
    format_weight: float = 0.0
    """weight of the format reward (1 when the completion is just a number) beside correctness (weight 1)"""
    reward_fn: str | None = None
    """your own reward, `path/to/file.py:function_name`: f(prompts=, completions=, answer=) -> one float (or None) each"""
    reward_fn_weight: float = 1.0
    """weight of --reward-fn in the total score"""
    steps: int = 100
    """number of iterations (one batch of rollouts each)"""
    prompts_per_step: int = 16
    """rollouts per iteration (one completion per prompt)"""
    max_new_tokens: int = 32
    """completion budget; completions without EOS by then get --missing-eos-penalty"""
    temperature: float = 1.0
    """sampling temperature; log-probabilities use the same temperature"""
    top_p: float = 1.0
    """nucleus sampling, 0 < top_p ≤ 1 (1: off). Ratios and KL use the full softmax, as TRL's do"""
    top_k: int = 0
    """sample among the k most likely tokens only (0: off)"""
    min_p: float = 0.0
    """sample among tokens at least min_p times as likely as the most likely one (0: off)"""
    max_prompt_length: int | None = None
    """keep the last this many tokens of longer prompts (None: all); the share is logged"""
    lr: float = 2e-6
    """AdamW learning rate (policy and value head)"""
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
    beta: float = 0.05
    """β: KL-penalty coefficient in the per-token reward (initial value when --adaptive-kl)"""
    adaptive_kl: bool = False
    """adapt β towards --kl-target (Ziegler et al. 2019)"""
    kl_target: float = 6.0
    """target sequence KL (nats) for the adaptive controller"""
    kl_horizon: int = 10000
    """horizon of the adaptive controller, in rollouts"""
    gamma: float = 1.0
    """γ: discount"""
    lam: float = 0.95
    """λ: GAE parameter"""
    ppo_epochs: int = 4
    """passes over each batch of rollouts"""
    num_minibatches: int = 4
    """optimizer steps per epoch; the batch is shuffled and split into this many minibatches"""
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
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    eval_interval: int = 20
    """greedy held-out evaluation every this many iterations (and before the first, and after the last)"""
    eval_prompts: int = 64
    """size of the held-out prompt set (0: no evaluation)"""
    save_interval: int = 50
    """checkpoint every this many iterations, and at the end"""
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
    """default: ppo_<task>_<seed>_<time>"""
    resume: str | None = None
    """continue the run in this folder from its last checkpoint (only --steps and the intervals may change)"""


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


def policy_loss(logprobs, old_logprobs, advantages, mask, *, cliprange: float):
    """L = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε, 1+ε)), ρ_t = π_θ/π_old -> (loss, stats)."""
    real = mask.bool()
    n = real.sum().clamp(min=1)
    ratio = torch.exp(logprobs - old_logprobs)
    losses = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = torch.where(real, torch.max(losses, clipped), 0.0).sum() / n
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


def forward(model, value_head, rollout, temperature: float):
    """Policy log-probs, entropy and values for a rollout (slice) -> three [B, T] tensors."""
    logits, hidden = common.forward_completion(model, rollout, hidden=True)  # [N, V], [N, H]: real tokens only
    mask = rollout.completion_mask
    logprobs, entropy = common.token_logprobs(logits, rollout.completion_ids[mask.bool()], temperature, entropy=True)
    with torch.autocast(hidden.device.type, enabled=False):  # values in fp32, also under bf16 autocast
        values = value_head(hidden.float()).squeeze(-1)
    return common.unpack(logprobs, mask), common.unpack(entropy, mask), common.unpack(values, mask)


# Valid values of the numeric flags ("(": that end excluded). Checked before anything loads.
RANGES = {"reward_model_weight": "[-inf, inf]", "rule_weight": "[-inf, inf]", "format_weight": "[-inf, inf]",
          "steps": "[1, inf)", "prompts_per_step": "[1, inf)", "max_new_tokens": "[1, inf)", "temperature": "(0, inf)",
          "top_p": "(0, 1]", "lr": "(0, inf)", "beta": "[0, inf)", "kl_target": "(0, inf)", "kl_horizon": "[1, inf)",
          "gamma": "[0, 1]", "lam": "[0, 1]", "ppo_epochs": "[1, inf)", "num_minibatches": "[1, inf)",
          "cliprange": "(0, 1)", "cliprange_value": "(0, inf)", "vf_coef": "[0, inf)", "missing_eos_penalty": "[-inf, inf]",
          "max_grad_norm": "(0, inf)", "eval_interval": "[1, inf)", "eval_prompts": "[0, inf)", "save_interval": "[1, inf)",
          "lora_rank": "[0, inf)", "lora_alpha": "(0, inf)",
          "reward_fn_weight": "[-inf, inf]", "top_k": "[0, inf)", "min_p": "[0, 1)", "max_prompt_length": "[1, inf)",
          "warmup_steps": "[0, inf)", "weight_decay": "[0, inf)", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)"}
MAY_CHANGE = ("steps", "eval_interval", "save_interval")  # what --resume takes from its command line


def check_args(args: Args) -> None:
    """Every error that can be found before a model is loaded or a file written."""
    plumbing.check_ranges(args, RANGES)
    world = plumbing.world_size()
    if args.prompts_per_step % world:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} is not divisible by the {world} processes; "
                         "each process samples the same number of prompts")
    if (args.prompts_per_step // world) % args.num_minibatches:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} (per process: {args.prompts_per_step // world}) "
                         f"is not divisible by --num-minibatches {args.num_minibatches}; pick numbers where it is")
    if args.lora_merge and not args.lora_rank:
        raise SystemExit("--lora-merge needs --lora-rank > 0")
    plumbing.check_fsdp(args.fsdp, args.lora_rank)


def main(args: Args) -> Path:
    # --- checks, before anything is loaded or written ---
    state = None
    if args.resume:
        args, state = plumbing.resume(args, "ppo", MAY_CHANGE)
    check_args(args)
    train_rows, eval_rows = common.load_prompts(args.task, args.data, args.seed, args.eval_prompts, args.eval_data)
    plumbing.check_rewards(args.data, train_rows + eval_rows, args.reward_model, args.rule_weight, args.reward_fn)
    functions = dict([plumbing.load_reward_function(args.reward_fn)]) if args.reward_fn else {}
    plumbing.check_model_name(args.model)
    prompts_name = args.task if args.data is None else Path(args.data).stem
    run_dir = Path(args.resume) if args.resume else plumbing.run_folder(args.output_dir, args.run_name,
                                                                       f"ppo_{prompts_name}_{args.seed}")
    device = plumbing.pick_device(args.device)

    # --- set-up: processes, seed, policy + value head, reference, optimizer, logging (rank 0) ---
    rank, world = plumbing.init_distributed(device), plumbing.world_size()
    plumbing.set_seed(args.seed)
    model, tokenizer = plumbing.load_model(args.model, device)
    if args.gradient_checkpointing:
        plumbing.enable_gradient_checkpointing(model)
    if args.lora_rank:
        model = plumbing.add_lora(model, args.lora_rank, args.lora_alpha)
    value_head = torch.nn.Linear(model.config.get_text_config().hidden_size, 1).to(device)
    torch.nn.init.zeros_(value_head.weight)  # V = 0 at the start: no noise in the first advantages
    torch.nn.init.zeros_(value_head.bias)
    # The frozen start: a copy, or with LoRA the same network with its adapters off (plumbing.adapters_off).
    ref_model = model if args.lora_rank else copy.deepcopy(model).requires_grad_(False)
    if state is not None:  # --resume: the weights and value head of the last checkpoint (the reference stays the start)
        plumbing.load_weights(model, run_dir / "checkpoint")
        value_head.load_state_dict(torch.load(run_dir / "checkpoint" / "value_head.pt", map_location=device))
    # Under torchrun, DDP keeps a copy on each process and averages the gradients of both (rollouts and
    # evaluation use the bare modules); FSDP shards each over the processes (plumbing.shard), the value
    # head in fp32.
    if args.fsdp:
        for m in (model, ref_model):
            plumbing.shard(m, bf16=common.uses_bf16(device, args.dtype))
        plumbing.shard(value_head)
    ddp = torch.nn.parallel.DistributedDataParallel
    train_model, train_value_head = (ddp(model), ddp(value_head)) if world > 1 and not args.fsdp else (model, value_head)
    scorer = common.RewardScorer(args.reward_model, device, args.dtype) if args.reward_model else None
    rules = common.rule_rewards(args.task, args.data, train_rows, args.format_weight)
    reward_fn = functools.partial(common.compute_rewards, rules=rules, rule_weight=args.rule_weight, scorer=scorer,
                                  scorer_weight=args.reward_model_weight,  # (rows, completions) -> (total, parts)
                                  functions={k: (f, args.reward_fn_weight) for k, f in functions.items()})
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                    max_prompt_length=args.max_prompt_length)
    params = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())  # LoRA: adapters only
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay, fused=True)  # fused: one pass, no temporaries
    scheduler = plumbing.lr_scheduler(optimizer, args.lr_schedule, args.warmup_steps, args.steps)  # stepped once a step
    # Each process samples its own prompts_per_step / world prompts (seed + rank) and whitens its
    # own advantages; β stays the same everywhere because the KL that adapts it is averaged.
    B, beta = args.prompts_per_step // world, args.beta
    rng = torch.Generator().manual_seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    first_step = 1
    trained = torch.nn.ModuleList([model, value_head])  # what the optimizer steps, to name its state by
    if state is not None:  # --resume: the optimizer, β and every random state of the last checkpoint
        plumbing.load_optimizer_state(trained, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        plumbing.set_rng_states(state["rng"], rng)
        first_step, beta = state["step"] + 1, state["beta"]
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
        weights, value_state = plumbing.full_state_dict(model), plumbing.full_state_dict(value_head)  # FSDP; else None
        training = {"script": "ppo", "step": step, "args": asdict(args), "scheduler": scheduler.state_dict(),
                    "optimizer": plumbing.optimizer_state(trained, optimizer), "beta": beta,
                    "rng": plumbing.rng_states(rng)}
        if rank == 0:
            if value_state is None:
                value_state = {k: v.cpu() for k, v in value_head.state_dict().items()}
            plumbing.save_checkpoint(model, tokenizer, run_dir / "checkpoint",
                                     {"value_head.pt": value_state, plumbing.TRAINING_STATE: training}, state_dict=weights)
            if args.lora_merge and step == args.steps:  # the adapters merged into a plain transformers model
                plumbing.save_checkpoint(copy.deepcopy(model).merge_and_unload(), tokenizer, run_dir / "checkpoint-merged",
                                       {"value_head.pt": value_state})

    eval_scores, stop = {}, False
    try:
        if evaluates and state is None:  # under FSDP all processes evaluate; rank 0 speaks
            if rank == 0:
                print(f"evaluating on {len(eval_rows)} held-out prompts (greedy) ...", flush=True)
            eval_scores = run_eval(0)
            if rank == 0:
                print(f"held-out score before training: {eval_scores['reward']:.3f}", flush=True)
        bar = tqdm(range(first_step, args.steps + 1), desc="ppo", mininterval=1, disable=rank != 0,
                   initial=first_step - 1, total=args.steps)
        for step in bar:
            # --- 1. rollouts: one completion per prompt ---
            t0 = time.time()
            rows = [train_rows[i] for i in torch.randint(len(train_rows), (B,), generator=rng).tolist()]
            with common.autocast(device, args.dtype), plumbing.gathered(model):  # FSDP: gathered once
                rollout = common.generate(model, tokenizer, [r["prompt"] for r in rows], args.max_new_tokens, **sampling)
            mask = rollout.completion_mask  # [B, T]
            gen_seconds = time.time() - t0

            # --- 2. scores; the missing-EOS penalty replaces the score of truncated completions ---
            scores, parts = reward_fn(rows, rollout.texts)
            if args.missing_eos_penalty is not None:
                scores = torch.where(rollout.truncated.cpu(), args.missing_eos_penalty, scores)
            scores = scores.to(device)

            # --- 3. old log-probs and values, reference log-probs: no graph, in the first epoch's minibatches ---
            t1 = time.time()
            minibatches = [torch.randperm(B, generator=rng).split(B // args.num_minibatches) for _ in range(args.ppo_epochs)]
            old_logprobs, old_values, ref_logprobs = (torch.zeros(mask.shape, device=device) for _ in range(3))
            with torch.no_grad(), common.autocast(device, args.dtype):
                for rows_mb in minibatches[0]:
                    mb = common.rollout_slice(rollout, rows_mb)
                    old_logprobs[rows_mb], _, old_values[rows_mb] = forward(model, value_head, mb, args.temperature)
                    with plumbing.adapters_off(ref_model):
                        ref_logprobs[rows_mb] = common.completion_logprobs(ref_model, mb, args.temperature)

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
                    pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[rows_mb], advantages[rows_mb],
                                                    mb.completion_mask, cliprange=args.cliprange)
                    vf_loss, vf_stats = value_loss(values, old_values[rows_mb], returns[rows_mb], mb.completion_mask,
                                                   cliprange_value=args.cliprange_value)
                    loss = pg_loss + args.vf_coef * vf_loss
                    optimizer.zero_grad()
                    loss.backward()
                    grad_norm = plumbing.clip_grad_norm(params, args.max_grad_norm)
                    plumbing.check_finite(grad_norm, "the gradient norm")  # a NaN loss gives NaN gradients: stop here
                    optimizer.step()
                    stats.append({"policy/loss": pg_loss.detach(), "value/loss": vf_loss.detach(),
                                  "value/clipfrac": vf_stats["clipfrac"], "policy/entropy": common.masked_mean(
                                      entropy.detach(), mb.completion_mask), "train/grad_norm": grad_norm,
                                  **{f"policy/{k}": v for k, v in pg_stats.items()}})
            lr = scheduler.get_last_lr()[0]  # this step's
            scheduler.step()
            update_seconds = time.time() - t1

            # --- 6. statistics (each figure is this process's, then averaged over processes) ---
            sequence_kl = plumbing.all_mean(kl.sum(1).mean()).item()
            non_score = -beta * kl.sum(1)  # [B]
            lengths = mask.sum(1).float()
            log_ratio = torch.where(mask.bool(), ref_logprobs - old_logprobs, 0.0)  # k3 per token, as grpo.py's train/kl
            metrics = {
                "objective/scores": scores.mean(), "objective/kl": sequence_kl,
                "objective/kl_k3_per_token": ((log_ratio.exp() - log_ratio - 1) * mask).sum() / mask.sum(),
                "objective/non_score_reward": non_score.mean(), "objective/rlhf_reward": (scores + non_score).mean(),
                "objective/kl_coef": beta, **{f"reward/{k}": v.mean() for k, v in parts.items()},
                **{k: torch.stack([s[k] for s in stats]).mean() for k in stats[0]},
                "value/explained_variance": explained_variance(old_values, returns, mask),
                "completion/length_mean": lengths.mean(), "completion/eos_fraction": 1 - rollout.truncated.float().mean(),
                "completion/prompts_truncated": rollout.prompt_truncated.float().mean(),
                "train/lr": lr, "time/generation_s": gen_seconds,
                "time/update_s": update_seconds, "time/tokens_per_s": lengths.sum() / gen_seconds,
                "time/update_tokens_per_s": lengths.sum() * args.ppo_epochs / update_seconds,
            }
            metrics = plumbing.reduce_metrics(metrics, device)  # one host sync (and one all-reduce) per step
            if train_model is not model:  # DDP
                metrics["dist/replica_spread"] = plumbing.replica_spread(model) + plumbing.replica_spread(value_head)

            # --- 7. adaptive KL coefficient, from this batch's mean sequence KL ---
            if args.adaptive_kl:
                beta = adaptive_kl_coef(beta, sequence_kl, target=args.kl_target, horizon=args.kl_horizon,
                                        n_steps=args.prompts_per_step)

            # --- 8. evaluation and logging (rank 0); checkpoint every --save-interval, at the end, after a Ctrl-C ---
            if evaluates and (step % args.eval_interval == 0 or step == args.steps):
                eval_scores = run_eval(step)
            if rank == 0:
                for k, v in metrics.items():
                    writer.add_scalar(k, v, step)
                if step % 10 == 1:
                    plumbing.log_samples(writer, step, [r["prompt"] for r in rows], rollout.texts, scores)
                bar.set_postfix(score=f"{metrics['objective/scores']:.3f}",
                                kl=f"{metrics['objective/kl_k3_per_token']:.4f}",
                                eval=f"{eval_scores.get('reward', float('nan')):.3f}")
            stop = interrupt.stop_now(device)
            if step % args.save_interval == 0 or step == args.steps or stop:
                save(step)  # policy (or adapters) + value head + training state
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
        plumbing.end_of_run("ppo", run_dir, stop, saved[0], eval_scores.get("reward", float("nan")), args.steps,
                            args.steps != Args.steps)
    if stop:
        raise SystemExit(130)
    return run_dir


if __name__ == "__main__":
    main(tyro.cli(Args))
