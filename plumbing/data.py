"""Prompts and preference pairs from files: JSONL with this project's own reader (errors name the file and line)."""

import json
import random
from pathlib import Path

import tasks


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
    """{"prompt": str, "answer": str | None, "line": "file:N"} per line of a JSONL file; errors name the line."""
    rows = []
    for lineno, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise SystemExit(f'{path}:{lineno}: needs a non-empty string field "prompt"')
        if not isinstance(row.get("answer"), (str, int, float, type(None))) or isinstance(row.get("answer"), bool):
            raise SystemExit(f'{path}:{lineno}: "answer" must be a string or a number (or absent)')
        rows.append({"prompt": row["prompt"], "answer": None if row.get("answer") is None else str(row["answer"]),
                     "line": f"{path}:{lineno}"})
    if not rows:
        raise SystemExit(f"{path}: no prompts in the file")
    return rows


def load_prompts(task: str, data: str | None, seed: int, n_eval: int = 64,
                 eval_data: str | None = None) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompts: from the JSONL file `data` (held out: `eval_data`, else up to 10 % of
    `data`, at most n_eval), or the built-in `task` (tasks.task_prompts)."""
    if data is None:
        return tasks.task_prompts(task, seed, n_eval)
    rows = read_prompts(data)
    random.Random(seed).shuffle(rows)
    held_out = read_prompts(eval_data)[:n_eval] if eval_data else rows[: min(n_eval, len(rows) // 10)]
    return rows[0 if eval_data else len(held_out) :], held_out
