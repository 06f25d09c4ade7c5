"""Checking input before anything loads: flag ranges, JSONL files, reward settings, your reward function."""

import importlib.util
import json
import math
import random
from pathlib import Path

import common
from plumbing.models import REWARD_NORM_FILE
from plumbing.processes import world_size


def check_ranges(args, ranges: dict[str, str]) -> None:
    """Refuse, in one line, a flag that is not finite or outside its interval, e.g. {"top_p": "(0, 1]"}."""
    for name, interval in ranges.items():
        value = getattr(args, name)
        if value is None:
            continue
        low, high = (float(x) for x in interval[1:-1].split(","))
        above = low < value if interval[0] == "(" else low <= value
        below = value < high if interval[-1] == ")" else value <= high
        if not (math.isfinite(value) and above and below):
            raise SystemExit(f"--{name.replace('_', '-')} {value}: must be in {interval}")


def check_fsdp(fsdp: bool, lora_rank: int = 0) -> None:
    """--fsdp needs torchrun, and is not written for LoRA (adapters-off reference, adapter checkpoints)."""
    if fsdp and world_size() == 1:
        raise SystemExit("--fsdp shards the model over several processes: run under torchrun --nproc-per-node N (N ≥ 2)")
    if fsdp and lora_rank:
        raise SystemExit("--fsdp with --lora-rank is not supported: pick one (LoRA's frozen base model and adapter "
                         "checkpoints are not written for sharded models)")


def read_jsonl(path: str) -> list[tuple[int, object]]:
    """(line number, parsed JSON) for each non-empty line; errors name the file and the line."""
    if not Path(path).is_file():
        raise SystemExit(f"{path}: no such file" + (" (a folder)" if Path(path).is_dir() else ""))
    rows = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                raise SystemExit(f"{path}:{lineno}: not UTF-8 text; save the file as UTF-8") from None
            if line.strip():
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    return rows


def read_prompts(path: str) -> list[dict]:
    """{"prompt": str, "answer": str | None} per line of a JSONL file; errors name the line."""
    rows = []
    for lineno, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise SystemExit(f'{path}:{lineno}: needs a non-empty string field "prompt"')
        if not isinstance(row.get("answer"), (str, int, float, type(None))) or isinstance(row.get("answer"), bool):
            raise SystemExit(f'{path}:{lineno}: "answer" must be a string or a number (or absent)')
        rows.append({"prompt": row["prompt"], "answer": None if row.get("answer") is None else str(row["answer"])})
    if not rows:
        raise SystemExit(f"{path}: no prompts in the file")
    return rows


def load_prompts(task: str, data: str | None, seed: int, n_eval: int = 64,
                 eval_data: str | None = None) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompts: from the JSONL file `data` (held out: `eval_data`, else up to 10 % of
    `data`, at most n_eval), or the built-in `task` (common.task_prompts)."""
    if data is None:
        return common.task_prompts(task, seed, n_eval)
    rows = read_prompts(data)
    random.Random(seed).shuffle(rows)
    held_out = read_prompts(eval_data)[:n_eval] if eval_data else rows[: min(n_eval, len(rows) // 10)]
    return rows[0 if eval_data else len(held_out) :], held_out


def check_rewards(data: str | None, rows: list[dict], reward_model: str | None, rule_weight: float = 1.0,
                  reward_fn: str | None = None) -> None:
    """Fail early when there is nothing to reward: answers missing, or rules off, and no other reward."""
    if rule_weight == 0 and reward_model is None and reward_fn is None:
        raise SystemExit("--rule-weight 0 leaves no reward: pass --reward-model or --reward-fn, or keep the rule rewards")
    if reward_model is not None and not (Path(reward_model) / REWARD_NORM_FILE).is_file():
        raise SystemExit(f"--reward-model {reward_model}: not a folder written by reward_model.py (no {REWARD_NORM_FILE})")
    if data is not None and reward_model is None and reward_fn is None and any(row["answer"] is None for row in rows):
        raise SystemExit(f"{data}: some lines have no \"answer\" to check; add answers or pass --reward-model")


def load_reward_function(spec: str):
    """`path/to/file.py:function_name` -> (name, function), found before anything loads. The function
    takes TRL's keyword arguments (prompts, completions, answer: lists) and returns one float per
    completion, or None where it does not apply."""
    path, _, name = spec.rpartition(":")
    if not path or not Path(path).is_file():
        raise SystemExit(f"--reward-fn {spec}: no file {path!r}; pass path/to/file.py:function_name")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, name, None)):
        raise SystemExit(f"--reward-fn {spec}: {path} has no function {name!r}")
    return name, getattr(module, name)
