"""Prompts and preference pairs from files and data sets, checked row by row before anything loads.

JSONL keeps this project's own reader, whose errors name the file and the line. Other sources go through
the `datasets` library, as TRL users already have them: a .parquet, .json (an array, or JSON lines) or
.csv file, a folder written by `save_to_disk`, or a hub data set id where the hub can be reached. A row
is a dict; its "prompt" is a string or a list of chat messages ({"role", "content"}: TRL's
"conversational" format). Every other column is kept, for the reward functions (tasks.call_reward_function).
Each row also gets "_where" ("file:line" or "source row N"), which errors name.
"""

import json
import random
from pathlib import Path

import tasks

FORMATS = {".parquet": "parquet", ".json": "json", ".csv": "csv"}  # file ending -> datasets' builder


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


def read_rows(source: str) -> list[dict]:
    """The rows of a data source, each a dict with "_where" added; errors name the source and the fix."""
    path = Path(source).expanduser()
    if path.suffix == ".jsonl":
        rows = [(f"{source}:{lineno}", row) for lineno, row in read_jsonl(source)]
    elif path.is_dir() or path.suffix in FORMATS or looks_like_hub_id(source):
        rows = [(f"{source} row {i}", row) for i, row in enumerate(load_dataset(source), 1)]
    else:
        raise SystemExit(f"{source}: " + ("not a data file this project reads; use .jsonl, .parquet, .json or .csv, or "
                                          "a folder written by save_to_disk" if path.exists() else "no such file"))
    for where, row in rows:
        if not isinstance(row, dict):
            raise SystemExit(f"{where}: not a JSON object; each row must be one {{\"prompt\": ..., ...}} object")
    return [{**row, "_where": where} for where, row in rows]


def looks_like_hub_id(source: str) -> bool:
    """`name` or `owner/name`, nothing on disk by that name."""
    parts = source.split("/")
    return not Path(source).exists() and len(parts) <= 2 and all(p and not p.startswith(".") for p in parts)


def load_dataset(source: str):
    """A `datasets` Dataset from a file, a save_to_disk folder (its "train" split, if it holds several), or the hub."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
        elif path.suffix in FORMATS:
            if not path.is_file():
                raise SystemExit(f"{source}: no such file")
            data = datasets.load_dataset(FORMATS[path.suffix], data_files=str(path), split="train")
        else:
            from plumbing.models import hub_reachable

            if not hub_reachable():
                raise SystemExit(f"{source}: no such file or folder, and the Hugging Face hub cannot be reached from "
                                 "here to load it as a data set id; pass a local file or a save_to_disk folder")
            data = datasets.load_dataset(source)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:  # a damaged file, a folder that is not a data set, an unknown hub id, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"{source}: cannot be read as a data set ({first})") from None
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else data[next(iter(data))]
    return data


def is_messages(value) -> bool:
    """A list of chat messages: dicts with a string "role" and a string "content" (TRL's conversational format)."""
    return (isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                                and isinstance(m.get("content"), str) for m in value))


def check_prompt(row: dict, field: str = "prompt") -> None:
    """A prompt is a string with something in it, or a list of chat messages; else a one-line error naming the row."""
    prompt = row.get(field)
    if isinstance(prompt, str) and not prompt.strip():
        raise SystemExit(f'{row["_where"]}: the "{field}" is empty or only white space')
    if not isinstance(prompt, str) and not is_messages(prompt):
        raise SystemExit(f'{row["_where"]}: needs a "{field}": a non-empty string, or a list of chat messages '
                         '[{"role": ..., "content": ...}, ...]')


def read_prompts(source: str) -> list[dict]:
    """Prompt rows: "prompt" (a string or chat messages), "answer" (a string, a number or absent; read as a
    string) and any other columns, kept as they are; errors name the row."""
    rows = read_rows(source)
    for row in rows:
        check_prompt(row)
        answer = row.get("answer")
        if not isinstance(answer, (str, int, float, type(None))) or isinstance(answer, bool):
            raise SystemExit(f'{row["_where"]}: "answer" must be a string or a number (or absent)')
        if answer is not None:
            row["answer"] = str(answer)
    if not rows:
        raise SystemExit(f"{source}: no prompts in it")
    return rows


def load_prompts(task: str, data: str | None, seed: int, n_eval: int = 64,
                 eval_data: str | None = None) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompts: from `data` (held out: `eval_data`, else up to 10 % of `data`, at most
    n_eval), or the built-in `task` (tasks.task_prompts)."""
    if data is None:
        return tasks.task_prompts(task, seed, n_eval)
    rows = read_prompts(data)
    random.Random(seed).shuffle(rows)
    held_out = read_prompts(eval_data)[:n_eval] if eval_data else rows[: min(n_eval, len(rows) // 10)]
    return rows[0 if eval_data else len(held_out) :], held_out


def read_pairs(source: str) -> list[dict]:
    """Preference pairs {"prompt", "chosen", "rejected"} in TRL's formats: strings, or chat messages. A
    conversational chosen/rejected is the prompt's messages (when there is no "prompt" column: TRL's
    implicit prompt, the messages the two share) followed by one assistant message. Pairs whose chosen
    equals rejected are dropped; errors name the row."""
    pairs = []
    for row in read_rows(source):
        for field in ("chosen", "rejected"):
            if not isinstance(row.get(field), str) and not is_messages(row.get(field)):
                raise SystemExit(f'{row["_where"]}: needs "prompt", "chosen" and "rejected": strings, or chat messages '
                                 f'(the "{field}" is {str(row.get(field))[:60]})')
        chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
        if is_messages(chosen) or is_messages(rejected):
            if not (is_messages(chosen) and is_messages(rejected)) or chosen[-1]["role"] != "assistant" \
                    or rejected[-1]["role"] != "assistant" or chosen[:-1] != rejected[:-1]:
                raise SystemExit(f'{row["_where"]}: conversational "chosen" and "rejected" must be the same messages '
                                 "followed by one assistant message each")
            if prompt is None:
                prompt = chosen[:-1] or None  # the implicit prompt
            chosen, rejected = chosen[-1]["content"], rejected[-1]["content"]
        pair = {**row, "prompt": prompt, "chosen": chosen, "rejected": rejected}
        check_prompt(pair)
        if chosen != rejected:
            pairs.append(pair)
    if not pairs:
        raise SystemExit(f"{source}: no usable pairs (it is empty, or chosen == rejected in every row)")
    return pairs
