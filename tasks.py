"""Tasks, rewards and held-out evaluation: what the RL scripts are trained on and scored by.

The loops never call this file: plumbing's `Run` builds their reward function from it (the rule
rewards of a built-in task or of a data set's answers, a reward model's score, your own functions)
and evaluates on held-out prompts with it. reward_model.py reads its built-in pairs and scores here.
A prompt row is a dict {"prompt": str, "answer": str | None, ...}.
"""

import math
import random
import re

import torch

import common


TASKS = ("arithmetic", "letter")
LETTER = "a"  # the `letter` task rewards the share of this character: learnable in seconds


def task_prompts(task: str, seed: int, n_eval: int = 64) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompts of a built-in task: "What is A + B?" (A, B in 1..50; a fixed held-out
    split), or `letter`. Prompts from a JSONL file (--data) are read by plumbing's load_prompts."""
    if task == "arithmetic":
        pairs = [(a, b) for a in range(1, 51) for b in range(1, 51)]
        random.Random(1234).shuffle(pairs)  # not the seed: held-out stays held out across seeds
        rows = [{"prompt": f"What is {a} + {b}? Answer with just the number.", "answer": str(a + b)} for a, b in pairs]
        return rows[n_eval:], rows[:n_eval]
    if task == "letter":
        words = ["apple", "banana", "cat", "dog", "sea", "tree", "river", "stone", "light", "cloud"]
        rng = random.Random(seed)
        rows = [{"prompt": f"Say something about {rng.choice(words)} {i}.", "answer": None} for i in range(1000 + n_eval)]
        return rows[n_eval:], rows[:n_eval]
    raise SystemExit(f"--task {task}: unknown; choose one of {TASKS} or pass --data FILE.jsonl")


def correct_reward(completion: str, answer: str) -> float:
    """1 when the last number in the completion equals a numeric answer (else: the answer appears)."""
    try:
        answer_number = float(answer)
    except ValueError:
        return float(answer.strip().lower() in completion.lower())
    numbers = re.findall(r"-?\d+(?:\.\d+)?", completion.replace(",", ""))
    return float(bool(numbers) and float(numbers[-1]) == answer_number)


def format_reward(completion: str) -> float:
    """1 when the completion is just a number, as the arithmetic prompts ask."""
    return float(re.fullmatch(r"\s*-?\d+(?:\.\d+)?\.?\s*", completion) is not None)


def letter_reward(completion: str) -> float:
    return completion.count(LETTER) / max(len(completion), 1)


def rule_rewards(task: str, data: str | None, rows: list[dict], format_weight: float = 0.0) -> dict:
    """The rule rewards for these prompts, {name: (fn(completion, answer) -> float, weight)}; empty
    when the prompts have no answers to check (a JSONL file scored by a reward model)."""
    if task == "letter" and data is None:
        return {"letter": (lambda c, a: letter_reward(c), 1.0)}
    if any(r["answer"] is None for r in rows):
        return {}
    return {"correct": (correct_reward, 1.0), **({"format": (lambda c, a: format_reward(c), format_weight)}
                                                  if format_weight else {})}


def reward_model_inputs(tokenizer, prompts: list[str], completions: list[str], max_length: int) -> dict:
    """(prompt, completion) pairs as the reward model reads them: formatted prompt, completion, EOS;
    right-truncated to max_length."""
    texts = [common.format_prompt(tokenizer, p) + c + tokenizer.eos_token for p, c in zip(prompts, completions)]
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                     add_special_tokens=False)


def reward_model_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar score at the last real token of each row, whatever the padding side -> [B] fp32.
    (HF's own pooling finds that token by comparing with the pad id, which fails when pad == eos.)"""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)  # index of the last 1 in each row
    return model.score(hidden[torch.arange(len(last)), last]).squeeze(-1).float()


def call_reward_function(name: str, fn, rows: list[dict], completions: list[str]) -> torch.Tensor:
    """fn's rewards [N], NaN where it returned None ("does not apply"); anything but one number (or None)
    per completion, or a value that is not finite, stops the run."""
    values = fn(prompts=[r["prompt"] for r in rows], completions=completions, answer=[r["answer"] for r in rows])
    try:
        values = [None if v is None else float(v) for v in values]
    except (TypeError, ValueError):
        raise SystemExit(f"reward function {name} returned {str(values)[:200]}: return a list of one float "
                         "(or None) per completion") from None
    if len(values) != len(completions):
        raise SystemExit(f"reward function {name} returned {len(values)} values for {len(completions)} completions")
    if not all(v is None or math.isfinite(v) for v in values):
        raise SystemExit(f"reward function {name} returned a value that is not finite: {values}")
    return torch.tensor([math.nan if v is None else v for v in values])


def compute_rewards(rows: list[dict], completions: list[str], rules: dict, rule_weight: float = 1.0,
                    scorer=None, scorer_weight: float = 1.0,
                    functions: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the rule rewards, the reward-model score (scorer(prompts, completions) -> [N], such
    as plumbing's RewardScorer) and the user's reward functions ({name: (fn, weight)}; None counts 0)
    -> ([N], {name: [N]})."""
    parts = {name: (torch.tensor([fn(c, r["answer"]) for r, c in zip(rows, completions)]), rule_weight * weight)
             for name, (fn, weight) in rules.items()} if rule_weight != 0 else {}
    if scorer is not None:
        parts["reward_model"] = (scorer([r["prompt"] for r in rows], completions), scorer_weight)
    for name, (fn, weight) in (functions or {}).items():  # NaN where the function said None: counts 0
        parts[name] = (call_reward_function(name, fn, rows, completions), weight)
    total = sum(weight * (values.nan_to_num(0.0) if name in (functions or {}) else values)
                for name, (values, weight) in parts.items())
    return total.float(), {name: values for name, (values, _) in parts.items()}


@torch.no_grad()
def evaluate_held_out(model, tokenizer, rows: list[dict], reward_fn, sampling: dict, dtype: str,
                      batch_size: int = 32) -> dict:
    """Greedy completions on held-out prompts, cut and decoded as the training prompts are (sampling:
    common.generate's keyword arguments) -> {"reward": mean total, name: mean of each part};
    reward_fn(rows, completions) -> (total [N], {name: [N]}), as compute_rewards."""
    texts = []
    for i in range(0, len(rows), batch_size):
        with common.autocast(model.device, dtype):
            texts += common.generate(model, tokenizer, [r["prompt"] for r in rows[i : i + batch_size]], **sampling,
                                     greedy=True).texts
    total, parts = reward_fn(rows, texts)
    return {"reward": total.mean().item(), **{k: v.nanmean().item() for k, v in parts.items()}}
