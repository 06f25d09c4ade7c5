"""Checking input before anything loads: flag ranges, idle flags, context lengths, reward settings, your reward functions."""

import functools
import importlib.util
import math
import traceback
from pathlib import Path

import common
import tasks
from plumbing.checkpoints import REWARD_NORM_FILE
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


def refuse_idle_flags(args, rules: list[tuple[str, bool, str]]) -> None:
    """Refuse a flag that is given (set away from its default) and would change nothing, in one line that
    says why: rules = [(field, idle, why)], e.g. ("kl_target", not args.adaptive_kl, "it is the target of --adaptive-kl")."""
    defaults = type(args)()
    for name, idle, why in rules:
        if idle and getattr(args, name) != getattr(defaults, name):
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)} changes nothing: {why}")


def check_fsdp(fsdp: bool, lora_rank: int = 0) -> None:
    """--fsdp needs torchrun, and is not written for LoRA (adapters-off reference, adapter checkpoints)."""
    if fsdp and world_size() == 1:
        raise SystemExit("--fsdp shards the model over several processes: run under torchrun --nproc-per-node N (N ≥ 2)")
    if fsdp and lora_rank:
        raise SystemExit("--fsdp with --lora-rank is not supported: pick one (LoRA's frozen base model and adapter "
                         "checkpoints are not written for sharded models)")


def check_rewards(data: str | None, rows: list[dict], reward_model: str | None, rule_weight: float,
                  reward_fns: tuple[str, ...] = (), rule_weight_given: bool = False) -> None:
    """Fail early when there is nothing to reward: answers missing, or rules off, and no other reward."""
    if rule_weight == 0 and reward_model is None and not reward_fns:
        raise SystemExit("--rule-weight 0 leaves no reward: pass --reward-model or --reward-fn, or keep the rule rewards")
    if reward_model is not None and not (Path(reward_model) / REWARD_NORM_FILE).is_file():
        raise SystemExit(f"--reward-model {reward_model}: not a folder written by reward_model.py (no {REWARD_NORM_FILE})")
    unchecked = next((row for row in rows if tasks.reference_answer(row) is None), None)
    if data is not None and unchecked and (rule_weight_given or (reward_model is None and not reward_fns)):
        raise SystemExit(f'{unchecked["_where"]}: no "answer" (or "solution", "ground_truth") for the rule reward to check; '
                         "add one to every row, or pass --reward-model or --reward-fn")


def load_reward_functions(specs: tuple[str, ...], weights: tuple[float, ...], rows: list[dict]) -> dict:
    """Each --reward-fn with its weight (--reward-fn-weight, one each; default 1) -> {name: (function, weight)},
    each checked against the columns every row has (check_reward_function)."""
    if weights and len(weights) != len(specs):
        raise SystemExit(f"--reward-fn-weight has {len(weights)} value(s) for {len(specs)} --reward-fn: give one weight each")
    columns = sorted(set.intersection(*(set(r) for r in rows)) - {"prompt", "_where"}) if rows else []
    functions = {}
    for spec, weight in zip(specs, weights or [1.0] * len(specs)):
        name, fn = load_reward_function(spec)
        name = name if name not in functions else f"{name}_{len(functions)}"  # two functions of one name
        tasks.check_reward_function(name, fn, columns)
        functions[name] = (fn, weight)
    return functions


def check_context(positions: int | None, max_new_tokens: int, max_prompt_length: int | None) -> None:
    """Refuse a completion budget the model's positions cannot hold (None: not known yet). Past them a model
    with learned positions (GPT-2: 1024) fails in its embedding lookup, on CUDA as a device-side assert."""
    if positions is not None and max_new_tokens >= positions:
        raise SystemExit(f"--max-new-tokens {max_new_tokens}: the model has {positions} positions for prompt and "
                         f"completion together; pass at most {positions - 1}")
    if positions is not None and max_prompt_length and max_prompt_length + max_new_tokens > positions:
        raise SystemExit(f"--max-prompt-length {max_prompt_length} + --max-new-tokens {max_new_tokens} = "
                         f"{max_prompt_length + max_new_tokens} tokens: more than the model's {positions} positions")


def check_prompt_lengths(tokenizer, rows: list[dict], limit: int, why: str, fix: str) -> None:
    """Refuse the first prompt that is more than `limit` tokens once formatted (common.format_prompt), or
    chat messages for a model without a chat template, naming its row ("_where", as plumbing/data.py gives
    it) and the fix, before the first step."""
    texts = []
    for row in rows:
        try:
            texts.append(common.format_prompt(tokenizer, row["prompt"]))
        except ValueError as e:  # chat messages, no chat template
            raise SystemExit(f"{row.get('_where', 'a built-in prompt')}: {e}") from None
    for row, ids in zip(rows, tokenizer(texts, add_special_tokens=False)["input_ids"]):
        if len(ids) > limit:
            raise SystemExit(f"{row.get('_where', 'a built-in prompt')}: the prompt is {len(ids)} tokens; {why}. {fix}")


def check_fits(args, rows: list[dict], positions: int | None, tokenizer) -> None:
    """Every prompt with its completion budget within the model's positions, else an error naming the line
    and the fix; with --max-prompt-length the cut prompts fit (check_context). Called once the model has
    loaded: check_context again, because the embedded model's config is known only after its conversion."""
    check_context(positions, args.max_new_tokens, args.max_prompt_length)
    if positions is not None and args.max_prompt_length is None:
        check_prompt_lengths(tokenizer, rows, positions - args.max_new_tokens,
                             f"with --max-new-tokens {args.max_new_tokens} that is more than the model's {positions} "
                             "positions", f"Pass --max-prompt-length {positions - args.max_new_tokens} (keeps each "
                             "prompt's last tokens) or a smaller --max-new-tokens")


def load_reward_function(spec: str):
    """`path/to/file.py:function_name` -> (name, function), found before anything loads. The function
    takes TRL's keyword arguments (prompts, completions and the data's columns: lists) and returns one
    float per completion, or None where it does not apply. An error in the file or in the function stops the
    run with a line that names it and the file's own frames, not this project's."""
    path, _, name = spec.rpartition(":")
    if not path or not Path(path).is_file():
        raise SystemExit(f"--reward-fn {spec}: no file {path!r}; pass path/to/file.py:function_name")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a syntax error, a failed import, ...
        raise SystemExit(f"--reward-fn {spec}: importing {path} failed:\n{user_frames(e, path)}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SystemExit(f"--reward-fn {spec}: {path} has no function {name!r}")

    @functools.wraps(fn)  # its signature, which check_reward_function reads
    def reward_function(**kwargs):
        try:
            return fn(**kwargs)
        except Exception as e:
            raise SystemExit(f"--reward-fn {spec} raised {type(e).__name__}: {e}\n{user_frames(e, path)}") from None

    return name, reward_function


def user_frames(error: Exception, path: str) -> str:
    """The traceback of `error` from the first frame in the user's file on (the project's own frames left
    out), and the error itself; a syntax error shows its line and caret."""
    frames = traceback.extract_tb(error.__traceback__)
    first = next((i for i, f in enumerate(frames) if Path(f.filename).resolve() == Path(path).resolve()), len(frames))
    return "".join(traceback.format_list(frames[first:]) + traceback.format_exception_only(error)).rstrip()
