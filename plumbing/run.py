"""A training run's life around its loop, for grpo.py, ppo.py and trpo.py: the flags they share, and `Run`.

`Run` never calls algorithm code: the loop and its phases stay in each script, which hands it what
it must save (the policy, the optimizer, PPO's β, a value head) explicitly.
"""

import copy
import functools
import math
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import static_decode
import tasks
from plumbing.checkpoints import (SHARDS, TRAINING_STATE, load_sharded, rng_states, save_checkpoint, save_sharded,
                                  set_rng_states)
from plumbing.checkpoints import resume as read_resume
from plumbing.data import load_prompts
from plumbing.inputs import (check_context, check_fsdp, check_prompt_lengths, check_ranges, check_rewards,
                             load_reward_functions, refuse_idle_flags)
from plumbing.models import EMBEDDED_MODEL, RewardScorer, check_model_name, model_positions
from plumbing.processes import (all_mean, full_state_dict, gathered, init_distributed, leave_at_exit, load_optimizer_state,
                                one_voice, optimizer_state, pick_device, rank, reduce_metrics, replica_spread, set_seed,
                                world_size)


@dataclass
class RLArgs:
    """The flags of grpo.py, ppo.py and trpo.py that mean the same in each (each script's Args adds its own)."""

    model: str = EMBEDDED_MODEL
    """policy to train: `smollm2` (embedded SmolLM2-135M-Instruct), a hub id such as `gpt2`, or a local folder"""
    task: Literal["arithmetic", "letter"] = "arithmetic"
    """built-in task: `arithmetic` ("What is A + B?", rule rewards) or `letter` (share of the letter a)"""
    data: str | None = None
    """prompts: a .jsonl, .parquet, .json or .csv file, a save_to_disk folder, or a hub data set id. A row's "prompt" is chat messages, or a string sent through the chat template as one user message (TRL leaves a string as it is); "answer" (or "solution", "ground_truth") is checked by the rule reward; every column reaches --reward-fn by name. Replaces --task; up to 10 % held out (see --eval-data)"""
    eval_data: str | None = None
    """held-out prompts for --data, from the same kinds of source (then all of --data trains)"""
    reward_model: str | None = None
    """folder written by reward_model.py; its normalised score counts in the total reward (the rule reward beside it only with --rule-weight)"""
    reward_model_weight: float = 1.0
    """weight of the reward-model score in the total reward"""
    rule_weight: float | None = None
    """weight of the rule reward (the task's, or 1 when the answer is right) in the total (None: 1 when neither --reward-fn nor --reward-model is given, else off)"""
    format_weight: float = 0.0
    """weight of the format reward (1 when the completion is just a number) beside correctness (weight 1)"""
    reward_fn: tyro.conf.UseAppendAction[tuple[str, ...]] = ()
    """your reward function, `path/to/file.py:function_name`, repeatable; TRL's convention: f(prompts, completions, **columns) -> one float (or None: does not apply) per completion"""
    reward_fn_weight: tyro.conf.UseAppendAction[tuple[float, ...]] = ()
    """the weight of each --reward-fn, in their order, repeatable (none given: 1 each)"""
    steps: int = 100
    """training steps, one batch of rollouts each"""
    max_new_tokens: int = 32
    """completion budget in tokens; a completion without EOS by then is truncated"""
    temperature: float = 1.0
    """sampling temperature; log-probabilities use the same temperature"""
    top_p: float = 1.0
    """nucleus sampling, 0 < top_p ≤ 1 (1: off). Ratios and KL use the full softmax, as TRL's do"""
    top_k: int = 0
    """sample among the k most likely tokens only (0: off)"""
    min_p: float = 0.0
    """sample among tokens at least min_p times as likely as the most likely one (0: off)"""
    max_prompt_length: int | None = None
    """keep the last this many tokens of longer prompts (None: all); the share cut is logged"""
    eval_interval: int = 20
    """greedy held-out evaluation every this many steps (and before the first, and after the last)"""
    eval_prompts: int = 64
    """size of the held-out prompt set (0: no evaluation)"""
    eval_samples: int = 0
    """besides the greedy completion, sample n per held-out prompt at the training temperature: avg@n and the unbiased pass@k, k = 1, 2, 4, ... ≤ n (0: greedy only)"""
    save_interval: int = 50
    """checkpoint every this many steps, and at the end"""
    seed: int = 1
    """seeds prompts, sampling and initialisation (process r of torchrun samples with seed + r)"""
    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:1`, ..."""
    fsdp: bool = False
    """under torchrun: shard the policy, its gradients and AdamW state, and the reference over the processes (FSDP2) instead of a copy on each (DDP). On CUDA its bf16 policy computes embeddings and norms in bf16 too, where DDP's autocast keeps them in fp32"""
    collective_timeout: float = 30.0
    """under torchrun: minutes a process waits for the others in a collective before the run stops (rank 0 evaluating or saving alone must fit in it)"""
    gradient_checkpointing: bool = False
    """recompute each layer's activations in the backward pass: much less activation memory, ~30 % more compute"""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast (weights stay fp32): `auto` uses it on CUDA only"""
    generation: Literal["auto", "loop", "static"] = "auto"
    """decoding: `loop` (the plain loop), `static` (fixed shapes, one CUDA graph per step on CUDA; the same tokens), `auto`: static on CUDA"""
    output_dir: str = "runs"
    """TensorBoard events and checkpoints go to output_dir/run_name"""
    run_name: str | None = None
    """the run folder's name (None: <script>_<task or data>_<seed>_<time>)"""
    resume: str | None = None
    """continue the run in this folder from its last checkpoint (only --steps, the intervals and --collective-timeout may change)"""


@dataclass
class TrainArgs(RLArgs):
    """RLArgs and the optimizer and adapter flags of grpo.py and ppo.py (their --lr is each script's own)."""

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
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    lora_rank: int = 0
    """LoRA rank r: train peft adapters on the attention and MLP projections (0: full fine-tuning)"""
    lora_alpha: float = 32.0
    """LoRA scale α: the adapted weight is W + (α/r)·B A"""
    lora_merge: bool = False
    """with --lora-rank: also save checkpoint-merged/, the adapters merged into a plain transformers model"""


# Valid values of the shared numeric flags ("(": that end excluded). Checked before anything loads.
RANGES = {"reward_model_weight": "[-inf, inf]", "rule_weight": "[-inf, inf]", "format_weight": "[-inf, inf]",
          "eval_samples": "[0, inf)", "steps": "[1, inf)", "max_new_tokens": "[1, inf)",
          "temperature": "(0, inf)", "top_p": "(0, 1]", "top_k": "[0, inf)", "min_p": "[0, 1)",
          "max_prompt_length": "[1, inf)", "eval_interval": "[1, inf)", "eval_prompts": "[0, inf)",
          "save_interval": "[1, inf)", "collective_timeout": "(0, inf)", "warmup_steps": "[0, inf)",
          "weight_decay": "[0, inf)", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)", "max_grad_norm": "(0, inf)",
          "lora_rank": "[0, inf)", "lora_alpha": "(0, inf)"}
MAY_CHANGE = ("steps", "eval_interval", "save_interval", "collective_timeout")  # what --resume takes from its command line


def idle_flags(args: RLArgs) -> list[tuple[str, bool, str]]:
    """The shared flags whose effect needs another flag or a mode (refuse_idle_flags): (field, idle, why)."""
    lora = [(name, not args.lora_rank, "it is a setting of LoRA adapters: pass --lora-rank")
            for name in ("lora_alpha", "lora_merge")] if hasattr(args, "lora_rank") else []
    return [("eval_data", args.data is None, "it holds out prompts for --data; the built-in task has its own held-out set"),
            ("eval_data", args.eval_prompts == 0, "--eval-prompts 0 turns the held-out evaluation off"),
            ("eval_interval", args.eval_prompts == 0, "--eval-prompts 0 turns the held-out evaluation off"),
            ("task", args.data is not None, "--data replaces the built-in task"),
            ("reward_model_weight", args.reward_model is None, "it weights --reward-model, which is not given"),
            ("reward_fn_weight", not args.reward_fn, "it weights --reward-fn, which is not given"),
            ("eval_samples", args.eval_prompts == 0, "--eval-prompts 0 turns the held-out evaluation off"),
            ("format_weight", args.task == "letter" and args.data is None, "the letter task has no format reward"),
            ("collective_timeout", world_size() == 1, "it bounds waits between processes: run under torchrun"), *lora]


class Run:
    """One run of grpo.py, ppo.py or trpo.py, around the loop that stays in the script:

        run = Run("grpo", args, check_args)  # flags and files checked, run folder, device, processes, rewards
        ...                                  # the policy (load_policy) and its optimizer (adamw)
        run.restore(model, optimizer, scheduler)  # seeds, or --resume: the last checkpoint's states
        with run:                            # Ctrl-C, the logs, the last line, leaving the process group
            run.evaluate(0, model, tokenizer)
            for step in run.steps():
                ...                          # the algorithm's phases
                run.evaluate(step, model, tokenizer)          # when due
                run.log(step, metrics, prompts, completions, rewards)
                run.checkpoint(step, model, tokenizer, optimizer, scheduler)  # when due, at the end, after Ctrl-C

    Under torchrun every process makes the same calls: several are collective."""

    def __init__(self, script: str, args: RLArgs, check_args):
        # --- before anything is loaded or written: --resume, every flag, the prompts and rewards, the model's name ---
        self.script, self.saved = script, None
        with one_voice():  # under torchrun every process finds the same error: rank 0 says it
            if args.resume:
                args, self.saved = read_resume(args, script, MAY_CHANGE)
            check_ranges(args, {k: v for k, v in RANGES.items() if hasattr(args, k)})
            refuse_idle_flags(args, idle_flags(args))
            check_args(args)
            check_fsdp(args.fsdp, getattr(args, "lora_rank", 0))
            self.args = args
            self.train_rows, self.eval_rows = load_prompts(args.task, args.data, args.seed, args.eval_prompts, args.eval_data)
            rule_weight = args.rule_weight if args.rule_weight is not None else float(not (args.reward_fn or args.reward_model))
            check_rewards(args.data, self.train_rows + self.eval_rows, args.reward_model, rule_weight, args.reward_fn,
                          rule_weight_given=args.rule_weight is not None)
            if args.eval_samples and any(tasks.reference_answer(r) is None for r in self.eval_rows):
                raise SystemExit(f"--eval-samples {args.eval_samples}: pass@k counts correct answers, and the held-out "
                                 "prompts have none to check")
            functions = load_reward_functions(args.reward_fn, args.reward_fn_weight, self.train_rows + self.eval_rows)
            check_context(model_positions(check_model_name(args.model)), args.max_new_tokens, args.max_prompt_length)
            name = args.task if args.data is None else Path(args.data).stem
            self.folder = Path(args.resume) if args.resume else run_folder(args.output_dir, args.run_name,
                                                                           f"{script}_{name}_{args.seed}")
            self.device = pick_device(args.device)
        # --- processes, the reward, the seed ---
        self.rank, self.world = init_distributed(self.device, args.collective_timeout), world_size()
        scorer = RewardScorer(args.reward_model, self.device, args.dtype) if args.reward_model else None
        if scorer is not None:
            with one_voice():
                check_prompt_lengths(scorer.tokenizer, self.train_rows + self.eval_rows, scorer.norm["max_length"] - 1,
                                     f"the reward model reads {scorer.norm['max_length']} tokens (its --max-length), "
                                     "which leaves no room for the completion", "Train it with a larger --max-length")
        rules = tasks.rule_rewards(args.task, args.data, self.train_rows, args.format_weight)
        self.reward_fn = functools.partial(  # (rows, completions) -> (total [N], {name: [N]})
            tasks.compute_rewards, rules=rules, rule_weight=rule_weight, scorer=scorer,
            scorer_weight=args.reward_model_weight, functions=functions)
        self.sampling = sampling(args, self.device)  # common.generate's keyword arguments, the same in every script
        set_seed(args.seed)
        self.first_step, self.saved_step, self.stop, self.scores, self.writer = 1, None, False, {}, None

    @property
    def resuming(self) -> bool:
        return self.saved is not None

    @property
    def sharded_checkpoint(self) -> bool:
        """The checkpoint to resume from holds shards (an --fsdp run's): `restore` reads the weights with them."""
        return self.resuming and (self.folder / "checkpoint" / SHARDS).is_dir()

    def resumed(self, module: torch.nn.Module, name: str) -> torch.nn.Module:
        """module, with the weights the last checkpoint saved for it (name.pt) when resuming: before sharding.
        (A sharded checkpoint's are read by `restore`.)"""
        if self.resuming and not self.sharded_checkpoint:
            module.load_state_dict(torch.load(self.folder / "checkpoint" / f"{name}.pt", map_location=self.device))
        return module

    def restore(self, model, optimizer=None, scheduler=None, modules: dict | None = None) -> dict:
        """Seed each process (seed + rank) and make `self.rng`, the prompts' generator; when resuming, the last
        checkpoint's optimizer, schedule and random states -> the saved training state ({} for a new run).
        modules: what the optimizer steps besides the model ({"value_head": ...}), as `checkpoint` takes it."""
        self.rng = torch.Generator().manual_seed(self.args.seed + self.rank)
        torch.manual_seed(self.args.seed + self.rank)
        if not self.resuming:
            return {}
        restored = ["the weights", *(f"the {name}" for name in modules or {})]
        if self.sharded_checkpoint:  # weights, modules and optimizer state, resharded to this run's processes
            load_sharded(self.folder / "checkpoint", trained_modules(model, modules), optimizer)
            restored.append("the optimizer's state")
        elif optimizer is not None:
            load_optimizer_state(trained_modules(model, modules), optimizer, self.saved["optimizer"])
            restored.append("the optimizer's state")
        if scheduler is not None:
            scheduler.load_state_dict(self.saved["scheduler"])
            restored.append("the learning-rate schedule")
        if len(self.saved["rng"]) == self.world:
            set_rng_states(self.saved["rng"], self.rng)
            restored.append(f"the random states of {self.world} process(es)")
        else:  # another number of processes: each draws afresh, from the seed, its rank and the step
            fresh = self.args.seed + self.rank + 1000 * self.saved["step"]
            self.rng.manual_seed(fresh)
            torch.manual_seed(fresh)
            restored.append(f"not the random states (the run had {len(self.saved['rng'])} processes, this one "
                            f"{self.world}: sampling is seeded afresh, so the run goes on differently from an uninterrupted one)")
        names = {"beta": "β (the KL coefficient)", "value_optimizer": "the value head's optimizer"}  # scripts' own state
        restored += [names.get(k, k) for k in self.saved if k not in ("script", "step", "args", "optimizer", "scheduler", "rng")]
        self.first_step = self.saved["step"] + 1
        self.saved_step = self.saved["step"]
        if self.rank == 0:
            left = self.args.steps - self.saved_step
            print(f"resuming {self.folder} after step {self.saved_step}: {left} step(s) left, to step {self.args.steps}; "
                  f"restored {', '.join(restored)}", flush=True)
        return self.saved

    def __enter__(self):
        self.writer = make_writer(self.folder, self.args, self.first_step) if self.rank == 0 else None
        self.interrupt = Interrupt()
        if self.rank == 0:
            a = self.args
            print(f"run folder: {self.folder}; {len(self.train_rows)} training prompts, {len(self.eval_rows)} held out"
                  + (" (too few to hold any out: pass --eval-data)" if a.data and a.eval_prompts and not self.eval_rows
                     else ""))
        return self

    def steps(self):
        """first_step, ..., --steps, with a progress bar; stops after the step that saw a Ctrl-C."""
        self.bar = tqdm(range(self.first_step, self.args.steps + 1), desc=self.script, mininterval=1,
                        disable=self.rank != 0, initial=self.first_step - 1, total=self.args.steps)
        for step in self.bar:
            self.seconds, self.lap_start = {}, time.perf_counter()
            yield step
            if self.stop:
                break

    def evaluate(self, step: int, model, tokenizer) -> None:
        """Greedy held-out evaluation, when due: before the first step of a new run, every --eval-interval
        steps and after the last. Rank 0 evaluates while the others wait; under FSDP every process takes
        part in the forward passes (collective), rank 0 speaks."""
        a = self.args
        due = (step == 0 and not self.resuming) or (step > 0 and (step % a.eval_interval == 0 or step == a.steps))
        if not (due and self.eval_rows and (self.rank == 0 or a.fsdp)):
            return
        if step == 0 and self.rank == 0:
            samples = f" and {a.eval_samples} samples each" if a.eval_samples else ""
            print(f"evaluating on {len(self.eval_rows)} held-out prompts (greedy{samples}) ...", flush=True)
        with gathered(model):  # FSDP: every layer gathered once
            self.scores = tasks.evaluate_held_out(model, tokenizer, self.eval_rows, self.reward_fn, self.sampling, a.dtype,
                                                  n_samples=a.eval_samples)
        if self.writer is not None:
            for k, v in self.scores.items():
                self.writer.add_scalar(f"eval/{k}", v, step)
        if step == 0 and self.rank == 0:
            print(f"held-out before training: {held_out(self.scores)}", flush=True)

    def lap(self, phase: str) -> None:
        """Seconds since the step began or since the last lap, logged as time/<phase>_s."""
        now = time.perf_counter()
        self.seconds[phase], self.lap_start = now - self.lap_start, now

    def log(self, step: int, metrics: dict, rows: list[dict], rollout, rewards, reward_terms: dict, show: dict,
            replicas: tuple = (), sampled_tokens: int | None = None) -> dict[str, float]:
        """The step's figures, and those every script logs alike: each reward term's mean and std over the
        completions it applies to (reward_terms: {name: [B]}, NaN where a function returned None), the
        completions' lengths and ends, each lap's seconds, tokens sampled per second of generation
        (sampled_tokens: default the rollout's). Each figure averaged over processes (one host sync, one
        all-reduce); rank 0 writes them, a few samples every 10 steps, and `show` ({label: metric}) on the
        progress bar. replicas: under DDP, the modules whose copies must agree (dist/replica_spread, 0 when they do)."""
        lengths = rollout.completion_mask.sum(1).float()
        applies = {k: v[~v.isnan()] for k, v in reward_terms.items()}
        metrics = {**metrics, **{f"reward/{k}": v.mean() if len(v) else 0.0 for k, v in applies.items()},
                   **{f"reward/{k}_std": v.std() if len(v) > 1 else 0.0 for k, v in applies.items()},
                   "completion/length_mean": lengths.mean(), "completion/length_min": lengths.min(),
                   "completion/length_max": lengths.max(), "completion/eos_fraction": 1 - rollout.truncated.float().mean(),
                   "completion/prompts_truncated": rollout.prompt_truncated.float().mean(),
                   **{f"time/{phase}_s": seconds for phase, seconds in self.seconds.items()}}
        if "generation" in self.seconds:
            metrics["time/tokens_per_s"] = (sampled_tokens or lengths.sum()) / self.seconds["generation"]
        metrics = reduce_metrics(metrics, self.device)
        if self.world > 1 and not self.args.fsdp:
            metrics["dist/replica_spread"] = sum(replica_spread(m) for m in replicas)
        if self.rank == 0:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
            if step % 10 == 1:
                log_samples(self.writer, step, [r["prompt"] for r in rows], rollout.texts, rewards)
            held_out = {"eval": f"{self.scores.get('accuracy', self.scores['reward']):.3f}"} if self.scores else {}
            self.bar.set_postfix({**{label: f"{metrics[key]:.4g}" for label, key in show.items() if key in metrics},
                                  **held_out})
        return metrics

    def checkpoint(self, step: int, model, tokenizer, optimizer=None, scheduler=None, modules: dict | None = None,
                   state: dict | None = None) -> None:
        """Save every --save-interval steps, at the end, and after a stop (Ctrl-C, SIGTERM: the run stops after
        this step): the model (LoRA: its adapters) with save_pretrained, each of `modules` as name.pt beside it,
        and the training state --resume needs (optimizer, schedule, every random state, `state`). Under --fsdp
        each process writes its shards of the weights, modules and optimizer state (DCP, `save_sharded`) and
        nothing is gathered, except at the last step: the weights alone, gathered on rank 0 for a plain
        save_pretrained folder. Collective under torchrun; rank 0 writes the rest and swaps it in atomically."""
        self.stop = self.interrupt.stop_now(self.device)
        if not (step % self.args.save_interval == 0 or step == self.args.steps or self.stop):
            return
        self.saved_step, modules = step, modules or {}
        sharded, last = self.args.fsdp, step == self.args.steps  # --fsdp: always several processes (check_fsdp, resume)
        training = {"script": self.script, "step": step, "args": asdict(self.args), **(state or {})}
        if scheduler is not None:
            training["scheduler"] = scheduler.state_dict()
        tmp = self.folder / "checkpoint.tmp"
        if sharded:  # each process its shards, into a folder emptied first
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            torch.distributed.barrier()
            save_sharded(tmp, trained_modules(model, modules), optimizer)
        weights = full_state_dict(model) if not sharded or last else None  # FSDP, last step: gathered on rank 0
        module_weights = [full_state_dict(m) for m in modules.values()] if not sharded or last else []
        if optimizer is not None and not sharded:
            training["optimizer"] = optimizer_state(trained_modules(model, modules), optimizer)
        training["rng"] = rng_states(self.rng)
        if self.rank != 0:
            return
        files = {f"{name}.pt": w if w is not None else {k: v.cpu() for k, v in m.state_dict().items()}
                 for (name, m), w in zip(modules.items(), module_weights)}
        save_checkpoint(model, tokenizer, self.folder / "checkpoint", {**files, TRAINING_STATE: training},
                        state_dict=weights, weights=not sharded or last, keep_tmp=sharded)
        if getattr(self.args, "lora_merge", False) and last:  # adapters merged: a plain model
            save_checkpoint(copy.deepcopy(model).merge_and_unload(), tokenizer, self.folder / "checkpoint-merged", files)

    def __exit__(self, kind, error, traceback):
        """Close the logs whatever happened; a second signal (KeyboardInterrupt) keeps the last checkpoint as it
        was. After a normal end or a stop: wait for every process (the group itself is left at exit), print the
        last line, and exit with 128 + the signal's number after a stop (130: Ctrl-C; 143: SIGTERM; a process that
        was not signalled itself but stopped with the others: 130). Any other error goes on up, the last
        checkpoint and the logs in place."""
        self.interrupt.close()
        if self.writer is not None:
            self.writer.close()
        if kind is not None and kind is not KeyboardInterrupt:
            return False
        stopped = self.stop or kind is KeyboardInterrupt
        if self.world > 1:
            torch.distributed.barrier()  # rank 0 may still be evaluating or saving: leave together
            leave_at_exit()  # the process group, once main() has returned and freed its DDP wrappers
        if self.rank == 0:
            end_of_run(self.script, self.folder, stopped, self.saved_step, self.scores, self.args.steps,
                       self.args.steps != type(self.args).steps)
        if stopped:
            raise SystemExit(self.interrupt.status or 130)
        return False


def sampling(args: RLArgs, device: torch.device) -> dict:
    """The sampling flags as common.generate's keyword arguments. --generation: the plain decode loop, or
    static_decode's fixed shapes (and CUDA graph), which sample the same tokens; `auto` is static on CUDA."""
    static = args.generation == "static" or (args.generation == "auto" and device.type == "cuda")
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "min_p": args.min_p, "max_prompt_length": args.max_prompt_length,
            "decode": static_decode.decode_static if static else None}


def trained_modules(model, modules: dict | None):
    """What an optimizer steps, as one module that names its parameters (FSDP's optimizer state is keyed by name)."""
    return torch.nn.ModuleList([model, *modules.values()]) if modules else model


def adamw(params, args: TrainArgs):
    """AdamW (fused: one pass, no temporaries) and its schedule (`lr_scheduler`), stepped once a step. params:
    parameters, or groups of them ({"params": [...], "lr": ...}) where one group has its own learning rate."""
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay, fused=True)
    return optimizer, lr_scheduler(optimizer, args.lr_schedule, args.warmup_steps, args.steps)


def run_folder(output_dir: str, run_name: str | None, default_name: str) -> Path:
    """output_dir/run_name (default: default_name plus the time); fails early when an earlier run
    left files there, whose checkpoint this run would overwrite. Only rank 0, the writer, checks."""
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise SystemExit(f"--output-dir {output_dir}: a file, not a folder; pass a folder (it is created if missing)")
    run_dir = Path(output_dir) / (run_name or f"{default_name}_{int(time.time())}")
    if rank() == 0 and run_dir.is_dir() and any(run_dir.iterdir()):
        raise SystemExit(f"{run_dir} holds an earlier run; pass another --run-name, or delete that folder")
    return run_dir


def make_writer(run_dir: Path, args, first_step: int = 1) -> SummaryWriter:
    """TensorBoard writer in run_dir, with the hyperparameters as a markdown table. A resumed run
    (first_step > 1) drops what an earlier writer logged from first_step on, so nothing is plotted twice."""
    writer = SummaryWriter(str(run_dir), purge_step=first_step if first_step > 1 else None)
    if first_step == 1:  # the resumed run's hyperparameters are the run's
        table = "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return writer


def log_samples(writer: SummaryWriter, step: int, prompts: list[str], completions: list[str], rewards, n: int = 4):
    rows = [f"| {p!r} | {c!r} | {float(r):.3f} |" for p, c, r in list(zip(prompts, completions, rewards))[:n]]
    writer.add_text("samples", "| prompt | completion | reward |\n|-|-|-|\n" + "\n".join(rows), step)


class Interrupt:
    """Ctrl-C, and the signals a scheduler sends before it kills a job (SIGTERM: Slurm, Kubernetes, torchrun's
    agent; SIGUSR1: Slurm's --signal, ahead of the end): the first lets the current step finish, after which
    the loop saves and stops (`stop_now`); a second stops at once (KeyboardInterrupt), the last checkpoint as it
    was. `status`: the exit status that says which signal stopped the run (130 for Ctrl-C, 143 for SIGTERM)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested, self.status = False, 0
        self.previous = {s: signal.signal(s, self.handler) for s in self.SIGNALS}

    def handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.status = True, 128 + signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: finishing this step, then saving (a second one stops at once)", file=sys.stderr, flush=True)

    def stop_now(self, device: torch.device) -> bool:
        """True when any process was signalled (each receives the signal at a slightly different time): all
        processes stop after the same step, between collectives."""
        return all_mean(torch.tensor(float(self.requested), device=device)).item() > 0

    def close(self) -> None:
        for s, previous in self.previous.items():
            signal.signal(s, previous)


def held_out(scores: dict) -> str:
    """The held-out figures in words: accuracy where answers were checked, then the mean total reward, then pass@k."""
    figures = ([f"accuracy {scores['accuracy']:.3f}"] if "accuracy" in scores else []) + [f"reward {scores['reward']:.3f}"]
    return ", ".join(figures + [f"{k} {v:.3f}" for k, v in scores.items() if k.startswith(("avg@", "pass@"))])


def end_of_run(script: str, run_dir: Path, stopped: bool, saved_step: int | None, scores: dict, steps: int,
               steps_changed: bool) -> None:
    """The run's last line: its held-out score and checkpoint, or after a Ctrl-C the command that resumes it."""
    checkpoint = run_dir / "checkpoint"
    if stopped and saved_step is None:
        print("stopped before the first checkpoint: nothing to resume")
    elif stopped:
        print(f"stopped; the checkpoint of step {saved_step} is in {checkpoint}. Resume with: "
              f"python {script}.py --resume {run_dir}" + (f" --steps {steps}" if steps_changed else ""))
    else:
        figures = f"held-out {held_out(scores)}" if scores else "no held-out evaluation"
        print(f"done: {figures} after {steps} steps; checkpoint: {checkpoint}; tensorboard --logdir {run_dir}")


def lr_scheduler(optimizer, schedule: str, warmup_steps: int, steps: int):
    """Linear warmup from 0 over warmup_steps, then constant, or linear or cosine decay to 0 at `steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
        return {"constant": 1.0, "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[schedule]

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
