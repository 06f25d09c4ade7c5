"""A Bradley-Terry reward model from preference pairs, in one file.

Papers: Stiennon et al. 2020, https://arxiv.org/abs/2009.01325 ; Ouyang et al. 2022 (InstructGPT),
https://arxiv.org/abs/2203.02155 (section 3.5).

The model is the base language model with a scalar head read at the last real token of
prompt + response. For a pair sharing a prompt, Bradley-Terry says
P(chosen ≻ rejected) = σ(r_chosen − r_rejected); training minimises −log of it. Held-out pairwise
accuracy is the number to watch. After training, scores are normalised to mean 0 / std 1 on the
training responses, so that a KL coefficient in grpo.py / ppo.py / trpo.py means the same thing
whatever the reward model; the normalisation is saved with the model.

Implemented: JSONL pairs or a built-in offline set from the `arithmetic` task, one-label
sequence-classification head, held-out accuracy and loss in TensorBoard, `save_pretrained` output
that the RL scripts take as `--reward-model PATH`. Left out: ties and margins, ensembles.

Walkthrough: docs/walkthrough.md §7 (Where the reward comes from).
Run: `python reward_model.py` (embedded SmolLM2-135M-Instruct, built-in pairs), `--help`.
"""

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from tqdm import tqdm

import common
import plumbing
import tasks


@dataclass
class Args:
    """A Bradley-Terry reward model: the base model with a scalar head, trained on preference pairs."""

    model: str = plumbing.EMBEDDED_MODEL
    """base model: `smollm2` (embedded SmolLM2-135M-Instruct), a hub id such as `gpt2`, or a local folder"""
    data: str | None = None
    """preference pairs {"prompt", "chosen", "rejected"} (strings, or chat messages as TRL writes them): a .jsonl, .parquet, .json or .csv file, a save_to_disk folder or a hub data set id (None: built-in pairs from the arithmetic task)"""
    num_pairs: int = 1024
    """size of the built-in preference set (not with --data)"""
    steps: int | None = None
    """optimizer steps, one batch of pairs each (None: one pass over the training pairs)"""
    batch_size: int = 16
    """pairs per optimizer step"""
    lr: float = 2e-5
    """AdamW learning rate"""
    max_length: int = 128
    """prompt + response tokens kept (truncated on the right)"""
    eval_fraction: float = 0.1
    """share of the pairs held out for accuracy (0 < f < 1)"""
    eval_interval: int = 20
    """held-out evaluation every this many steps (and at the end)"""
    seed: int = 1
    """seeds the split, the shuffling and the head's initialisation"""
    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda`, ..."""
    gradient_checkpointing: bool = False
    """recompute each layer's activations in the backward pass: much less activation memory, ~30 % more compute"""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast (weights stay fp32): `auto` uses it on CUDA only"""
    output_dir: str = "runs"
    """TensorBoard events and the model go to output_dir/run_name (the model in checkpoint/)"""
    run_name: str | None = None
    """the run folder's name (None: rm_<data>_<seed>_<time>)"""


# ----------------------------------------------------------------------------------------------
# The math.


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """L = −mean log σ(r_chosen − r_rejected); scores [N] -> scalar."""
    return -torch.nn.functional.logsigmoid(chosen_scores - rejected_scores).mean()


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Share of pairs ranked right, 1[r_chosen > r_rejected], a tie counting one half."""
    return ((chosen_scores > rejected_scores).float() + 0.5 * (chosen_scores == rejected_scores).float()).mean()


# ----------------------------------------------------------------------------------------------
# Data: a pair is a dict {"prompt", "chosen", "rejected"}.


def arithmetic_pairs(n: int, seed: int) -> list[dict]:
    """Offline pairs from the arithmetic task: chosen is the bare correct number; rejected is a wrong
    number, a wrong number in a sentence, or the right number buried in a sentence."""
    rng = random.Random(seed)
    train, _ = tasks.task_prompts("arithmetic", seed)  # never the RL scripts' held-out prompts
    pairs = []
    for row in train[:n]:
        answer = int(row["answer"])
        wrong = answer + rng.choice([-10, -2, -1, 1, 2, 10])
        rejected = rng.choice([f"{wrong}", f"Let me think. It is probably {wrong}.", f"Well, {answer} I guess, maybe."])
        pairs.append({"prompt": row["prompt"], "chosen": str(answer), "rejected": rejected})
    return pairs


def score_pairs(model, tokenizer, pairs: list[dict], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [N], r_rejected [N]) for a batch of pairs, in one forward pass."""
    prompts = [p["prompt"] for p in pairs]
    enc = tasks.reward_model_inputs(tokenizer, prompts * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                                     max_length, common.PACK_MULTIPLE.get(model.device.type, 1)).to(model.device)
    scores = tasks.reward_model_scores(model, enc["input_ids"], enc["attention_mask"])
    return scores[: len(pairs)], scores[len(pairs) :]


@torch.no_grad()
def evaluate(model, tokenizer, pairs, args) -> dict:
    chosen, rejected = [], []
    for i in range(0, len(pairs), args.batch_size):
        with common.autocast(model.device, args.dtype):
            c, r = score_pairs(model, tokenizer, pairs[i : i + args.batch_size], args.max_length)
        chosen.append(c)
        rejected.append(r)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    return {"accuracy": pairwise_accuracy(chosen, rejected).item(), "loss": bradley_terry_loss(chosen, rejected).item(),
            "scores": torch.cat([chosen, rejected]).cpu()}


# Valid values of the numeric flags ("(": that end excluded). Checked before anything loads.
RANGES = {"num_pairs": "[2, inf)", "steps": "[1, inf)", "batch_size": "[1, inf)", "lr": "(0, inf)",
          "max_length": "[2, inf)", "eval_fraction": "(0, 1)", "eval_interval": "[1, inf)"}


def main(args: Args) -> Path:
    # --- checks, before anything is loaded or written ---
    plumbing.check_ranges(args, RANGES)
    plumbing.refuse_idle_flags(args, [("num_pairs", args.data is not None, "it sizes the built-in pairs; --data replaces them")])
    pairs = plumbing.read_pairs(args.data) if args.data else arithmetic_pairs(args.num_pairs, args.seed)
    if len(pairs) < 2:
        raise SystemExit(f"{len(pairs)} pair(s): need at least 2 to hold some out")
    positions = plumbing.model_positions(plumbing.check_model_name(args.model))
    if positions is not None and args.max_length > positions:
        raise SystemExit(f"--max-length {args.max_length}: more than the model's {positions} positions")
    pairs_name = Path(args.data).stem if args.data else "arithmetic"
    run_dir = plumbing.run_folder(args.output_dir, args.run_name, f"rm_{pairs_name}_{args.seed}")
    device = plumbing.pick_device(args.device)

    # --- set-up ---
    plumbing.set_seed(args.seed)
    random.Random(args.seed).shuffle(pairs)
    n_eval = max(1, int(len(pairs) * args.eval_fraction))
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
    steps = args.steps or -(-len(train_pairs) // args.batch_size)  # default: one pass over the training pairs
    model, tokenizer = plumbing.load_model(args.model, device, kind="reward")
    plumbing.check_prompt_lengths(tokenizer, pairs, args.max_length - 1, f"--max-length {args.max_length} leaves no room "
                                  "for the response", "Pass a larger --max-length"
                                  + (f" (the model has {positions} positions)" if positions else ""))
    if args.gradient_checkpointing:
        plumbing.enable_gradient_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)  # fused: one pass, no temporaries
    writer = plumbing.make_writer(run_dir, args)
    interrupt = plumbing.Interrupt()
    print(f"run folder: {run_dir}; {len(train_pairs)} training pairs, {len(eval_pairs)} held out; {steps} steps")

    def run_eval(step):
        result = evaluate(model, tokenizer, eval_pairs, args)
        writer.add_scalar("eval/accuracy", result["accuracy"], step)
        writer.add_scalar("eval/loss", result["loss"], step)
        return result

    try:
        result = run_eval(0)
        print(f"held-out accuracy before training: {result['accuracy']:.3f}")
        bar = tqdm(range(1, steps + 1), desc="reward model", mininterval=1)
        order = []
        for step in bar:
            # --- one optimizer step on a batch of pairs ---
            t0 = time.time()
            if not order:
                order = list(range(len(train_pairs)))
                random.Random(args.seed + step).shuffle(order)
            batch = [train_pairs[order.pop()] for _ in range(min(args.batch_size, len(order)))]
            with common.autocast(device, args.dtype):
                chosen, rejected = score_pairs(model, tokenizer, batch, args.max_length)
            loss = bradley_terry_loss(chosen, rejected)
            optimizer.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            plumbing.check_finite(grad_norm, "the gradient norm")  # a NaN loss gives NaN gradients: stop here
            optimizer.step()

            # --- logging ---
            writer.add_scalar("train/loss", loss.item(), step)
            writer.add_scalar("train/accuracy", pairwise_accuracy(chosen, rejected).item(), step)
            writer.add_scalar("train/margin", (chosen - rejected).mean().item(), step)
            writer.add_scalar("train/grad_norm", grad_norm.item(), step)
            writer.add_scalar("time/step_s", time.time() - t0, step)
            if step % args.eval_interval == 0 or step == steps or interrupt.requested:
                result = run_eval(step)
            bar.set_postfix(loss=f"{loss.item():.3f}", eval_acc=f"{result['accuracy']:.3f}")
            if interrupt.requested:  # the first Ctrl-C: the model as it is now is saved below
                break

        # --- normalise on the training responses, then save ---
        scores = evaluate(model, tokenizer, train_pairs, args)["scores"]
        norm = {"mean": scores.mean().item(), "std": scores.std().item() + 1e-6, "max_length": args.max_length}
        plumbing.save_checkpoint(model, tokenizer, run_dir / "checkpoint", {plumbing.REWARD_NORM_FILE: norm})
        writer.add_text("result", f"held-out accuracy {result['accuracy']:.3f}, loss {result['loss']:.3f}")
        print(("stopped after step " + str(step) + "; " if interrupt.requested else "done: ")
              + f"held-out accuracy {result['accuracy']:.3f}; reward model saved: --reward-model {run_dir / 'checkpoint'}"
              + f"; tensorboard --logdir {run_dir}")
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, nothing saved
        print("stopped at once; no reward model was saved")
        raise SystemExit(interrupt.status or 130) from None
    finally:
        interrupt.close()
        writer.close()
    if interrupt.requested:
        raise SystemExit(interrupt.status)
    return run_dir


if __name__ == "__main__":
    main(tyro.cli(Args))
