"""Tasks, rewards and held-out evaluation: what the RL scripts are trained on and scored by.

The loops never call this file: plumbing's `Run` builds their reward function from it (the rule reward
of a built-in task or of a data set's answers, a reward model's score, your own functions) and
evaluates on held-out prompts with it. reward_model.py reads its built-in pairs and scores here.
A prompt row is a dict {"prompt": str or chat messages, "answer": str | None, other columns...}.
"""

import inspect
import math
import random
import re

import torch

import common

TASKS = ("arithmetic", "letter")
LETTER = "a"  # the `letter` task rewards the share of this character: learnable in seconds


def task_prompts(task: str, seed: int, n_eval: int = 64) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompts of a built-in task: "What is A + B?" (A, B in 1..50; a fixed held-out
    split), or `letter`. Prompts from files (--data) are read by plumbing/data.py."""
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
    raise SystemExit(f"--task {task}: unknown; choose one of {TASKS} or pass --data FILE")


# ----------------------------------------------------------------------------------------------
# Rule rewards


ANSWER_COLUMNS = ("answer", "solution", "ground_truth")  # where a row's reference answer is, in this order


def reference_answer(row: dict) -> str | None:
    """The row's reference answer: its "answer", else "solution" or "ground_truth" (the names TRL's and
    verl's math data sets use), as written there; None when it has none."""
    value = next((row[c] for c in ANSWER_COLUMNS if row.get(c) is not None), None)
    return None if value is None else str(value)


def boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} in text, nested braces included (MATH's answers); None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None


def extract_answer(text: str) -> str:
    """The final answer as the common math data sets write it: after GSM8K's "####", MATH's \\boxed{...},
    or the text itself (a bare number or word), stripped."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    return boxed(text) if boxed(text) is not None else text.strip()


def as_number(text: str) -> float | None:
    """A number written plainly ("1,234", "$72", "72.", "-3.5"); None for anything else."""
    try:
        return float(text.replace(",", "").replace("$", "").strip().rstrip("."))
    except ValueError:
        return None


def correct_reward(completion: str, answer: str) -> float:
    """1 when the completion's final answer equals the reference's (extract_answer on both sides; a
    completion without "####" or \\boxed{} answers with its last number). Numbers compare as numbers
    ("1,234" = "1234.0"), anything else as text with case and spaces ignored (a bare completion may
    contain it)."""
    reference = extract_answer(answer)
    final = completion.rsplit("####", 1)[1] if "####" in completion else boxed(completion)
    if as_number(reference) is not None:
        numbers = re.findall(r"-?\d+(?:\.\d+)?", (final if final is not None else completion).replace(",", ""))
        return float(bool(numbers) and float(numbers[-1]) == as_number(reference))
    plain = lambda s: re.sub(r"\s+", "", s).lower()  # noqa: E731
    return float(plain(final) == plain(reference) if final is not None else plain(reference) in plain(completion))


def format_reward(completion: str) -> float:
    """1 when the completion is just a number, as the arithmetic prompts ask."""
    return float(re.fullmatch(r"\s*-?\d+(?:\.\d+)?\.?\s*", completion) is not None)


def letter_reward(completion: str) -> float:
    return completion.count(LETTER) / max(len(completion), 1)


def rule_rewards(task: str, data: str | None, rows: list[dict], format_weight: float = 0.0) -> dict:
    """The rule rewards for these prompts, {name: (fn(completion, row) -> float, weight)}; empty when the
    rows have no reference answers to check (prompts scored by a reward model or your functions)."""
    if task == "letter" and data is None:
        return {"letter": (lambda c, row: letter_reward(c), 1.0)}
    if any(reference_answer(r) is None for r in rows):
        return {}
    return {"correct": (lambda c, row: correct_reward(c, reference_answer(row)), 1.0),
            **({"format": (lambda c, row: format_reward(c), format_weight)} if format_weight else {})}


# ----------------------------------------------------------------------------------------------
# Your reward functions, TRL's convention


FIXED_ARGUMENTS = ("prompts", "completions")  # what every reward function is given; the data's columns too


def reward_function_arguments(rows: list[dict], completions: list[str]) -> dict:
    """A reward function's keyword arguments, as TRL passes them: prompts (strings or chat messages), completions
    (strings; for chat-message prompts each one [{"role": "assistant", "content": text}]), and every other
    column of the data by its name, one value per completion."""
    conversational = not isinstance(rows[0]["prompt"], str)
    columns = [c for c in rows[0] if c not in ("prompt", "_where")]
    return {"prompts": [r["prompt"] for r in rows],
            "completions": [[{"role": "assistant", "content": c}] for c in completions] if conversational else completions,
            **{c: [r.get(c) for r in rows] for c in columns}}


def check_reward_function(name: str, fn, columns: list[str]) -> None:
    """Refuse, before anything loads, a function with a required parameter that no argument will fill:
    a column the data lacks (it asks for `solution`, the rows have `answer`)."""
    for p in inspect.signature(fn).parameters.values():
        given = p.name in (*FIXED_ARGUMENTS, *columns)
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty and not given:
            raise SystemExit(f"reward function {name} asks for {p.name!r}, which the data has no column for (its "
                             f"columns: {', '.join(columns) or 'none'}); rename the parameter or add the column")


def call_reward_function(name: str, fn, rows: list[dict], completions: list[str]) -> torch.Tensor:
    """fn's rewards [N], NaN where it returned None ("does not apply"); anything but one number (or None)
    per completion, or a value that is not finite, stops the run."""
    values = fn(**reward_function_arguments(rows, completions))
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
    as plumbing's RewardScorer) and your reward functions ({name: (fn, weight)}; None counts 0)
    -> ([N], {name: [N]}), each term before its weight."""
    terms = {name: (torch.tensor([fn(c, r) for r, c in zip(rows, completions)]), rule_weight * weight)
             for name, (fn, weight) in rules.items()} if rule_weight != 0 else {}
    if scorer is not None:
        terms["reward_model"] = (scorer([r["prompt"] for r in rows], completions), scorer_weight)
    for name, (fn, weight) in (functions or {}).items():  # NaN where the function said None: counts 0
        terms[name] = (call_reward_function(name, fn, rows, completions), weight)
    total = sum(weight * (values.nan_to_num(0.0) if name in (functions or {}) else values)  # a NaN elsewhere: a bug, kept
                for name, (values, weight) in terms.items())
    return total.float(), {name: values for name, (values, _) in terms.items()}


# ----------------------------------------------------------------------------------------------
# Held-out evaluation


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k from n samples of which c are correct (Chen et al. 2021, "Evaluating Large Language
    Models Trained on Code", eq. 1): 1 − C(n−c, k)/C(n, k), as the product Π_{i=n−c+1}^{n} (1 − k/i)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@torch.no_grad()
def evaluate_held_out(model, tokenizer, rows: list[dict], reward_fn, sampling: dict, dtype: str, n_samples: int = 0,
                      batch_size: int = 32) -> dict:
    """Greedy completions on held-out prompts, cut and decoded as the training prompts are (sampling:
    common.generate's keyword arguments) -> {"reward": mean total, "accuracy": share correct (rows with a
    reference answer), name: mean of each reward term}. n_samples > 0: also n sampled completions per prompt
    at the training temperature -> "avg@n" (mean correctness) and "pass@k" for k = 1, 2, 4, ... ≤ n."""
    texts, correct = [], []
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        with common.autocast(model.device, dtype):
            texts += common.generate(model, tokenizer, [r["prompt"] for r in batch], **sampling, greedy=True).texts
            if n_samples:
                sampled = common.generate(model, tokenizer, [r["prompt"] for r in batch], **sampling, group_size=n_samples)
                correct += [sum(correct_reward(t, reference_answer(r)) == 1 for t in sampled.texts[j * n_samples:
                                                                                                  (j + 1) * n_samples])
                            for j, r in enumerate(batch)]
    total, terms = reward_fn(rows, texts)
    scores = {"reward": total.mean().item(), **{k: v.nanmean().item() for k, v in terms.items()}}
    checked = [correct_reward(t, reference_answer(r)) for r, t in zip(rows, texts) if reference_answer(r) is not None]
    if checked:
        scores["accuracy"] = sum(checked) / len(checked)
    if n_samples:
        scores[f"avg@{n_samples}"] = sum(correct) / (len(correct) * n_samples)
        for k in (2**j for j in range(n_samples.bit_length()) if 2**j <= n_samples):
            scores[f"pass@{k}"] = sum(pass_at_k(n_samples, c, k) for c in correct) / len(correct)
    return scores


# ----------------------------------------------------------------------------------------------
# A reward model's inputs and score


def reward_model_inputs(tokenizer, prompts: list, completions: list[str], max_length: int, multiple: int = 1) -> dict:
    """(prompt, completion) pairs as the reward model reads them: formatted prompt, completion, EOS;
    right-truncated to max_length; padded to a multiple of `multiple` tokens (128 on CUDA: pytorch#196678,
    see common.PACK_MULTIPLE)."""
    texts = [common.format_prompt(tokenizer, p) + c + tokenizer.eos_token for p, c in zip(prompts, completions)]
    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=False)  # cut, then padded:
    return tokenizer.pad(enc, return_tensors="pt", pad_to_multiple_of=multiple)  # a multiple over max_length is fine


def reward_model_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar score at the last real token of each row, whatever the padding side -> [B] fp32.
    (HF's own pooling finds that token by comparing with the pad id, which fails when pad == eos.)"""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)  # index of the last 1 in each row
    return model.score(hidden[torch.arange(len(last)), last]).squeeze(-1).float()
