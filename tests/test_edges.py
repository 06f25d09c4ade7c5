"""The edges a new user meets: the model's context length, flags that would change nothing, and a
reward function of one's own that fails. Each is refused in one clear line that names the fix."""

import importlib
import json

import pytest
import torch

import plumbing
import tasks
from test_grpo import run_script, scalars
from tiny import save_tiny_model

POSITIONS = 64  # a GPT-2 with learned positions: past them its embedding lookup fails (on CUDA, a device-side assert)


@pytest.fixture(scope="module")
def short_gpt2(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("short") / "gpt2", "gpt2", positions=POSITIONS)


def write_prompts(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p, "answer": "a"}) + "\n" for p in prompts))
    return str(path)


def grpo_args(folder, tmp_path, **kwargs):
    import grpo

    base = dict(model=folder, steps=1, prompts_per_step=2, group_size=2, micro_batch_size=4,
                max_new_tokens=16, eval_prompts=4, output_dir=str(tmp_path / "runs"))
    return grpo, grpo.Args(**{**base, **({} if "data" in kwargs else {"task": "letter"}), **kwargs})


# --- 1. the model's context length ---


@pytest.mark.parametrize("flags, message", [
    ({"max_new_tokens": 64}, "--max-new-tokens 64: the model has 64 positions for prompt and completion together; pass at most 63"),
    ({"max_new_tokens": 32, "max_prompt_length": 40}, "--max-prompt-length 40 + --max-new-tokens 32 = 72 tokens: more than the model's 64"),
])
def test_a_budget_beyond_the_model_positions_is_refused_when_the_config_is_read(flags, message, short_gpt2, tmp_path):
    grpo, args = grpo_args(short_gpt2, tmp_path, **flags)
    with pytest.raises(SystemExit) as error:
        grpo.main(args)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_a_prompt_that_cannot_fit_names_its_line_and_the_fix(short_gpt2, tmp_path):
    data = write_prompts(tmp_path / "data.jsonl", ["Say a."] + ["Tell me a very long story about apples " * 2] + ["Say b."] * 10)
    grpo, args = grpo_args(short_gpt2, tmp_path, data=data)
    with pytest.raises(SystemExit) as error:
        grpo.main(args)
    # "Question: ...\nAnswer:" around 78 characters: 96 byte tokens, and 16 for the completion
    assert str(error.value) == (f"{data}:2: the prompt is 96 tokens; with --max-new-tokens 16 that is more than the model's 64 "
                                "positions. Pass --max-prompt-length 48 (keeps each prompt's last tokens) or a smaller --max-new-tokens")
    assert not (tmp_path / "runs").exists()


def test_with_max_prompt_length_long_prompts_are_cut_in_training_and_evaluation(short_gpt2, tmp_path):
    """Every prompt is longer than the model's positions: without the cut, the first forward pass (the
    held-out evaluation's, then the rollouts') would index past GPT-2's 64 position embeddings."""
    data = write_prompts(tmp_path / "data.jsonl", [f"Tell me a very long story about apples, number {i}. " * 2 for i in range(20)])
    grpo, args = grpo_args(short_gpt2, tmp_path, data=data, max_prompt_length=48, run_name="cut")
    run_dir = grpo.main(args)
    assert scalars(run_dir, "completion/prompts_truncated") == [1.0]
    assert len(scalars(run_dir, "eval/reward")) == 2


def test_reward_model_pairs_must_leave_room_for_the_response(short_gpt2, tmp_path):
    import reward_model

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": "yes", "rejected": "no"}) + "\n"
                             for p in ["Short?", "Short too?", "A question that goes on and on and on and on?"]))
    args = reward_model.Args(model=short_gpt2, data=str(pairs), max_length=40, output_dir=str(tmp_path / "runs"))
    with pytest.raises(SystemExit, match=rf"{pairs}:3: the prompt is \d+ tokens; --max-length 40 leaves no room for "
                                         r"the response. Pass a larger --max-length \(the model has 64 positions\)"):
        reward_model.main(args)
    with pytest.raises(SystemExit, match="--max-length 128: more than the model's 64 positions"):
        reward_model.main(reward_model.Args(model=short_gpt2, data=str(pairs), output_dir=str(tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()


# --- 2. a flag that is given and would change nothing ---


IDLE = [  # (script, flags, message): a flag whose effect needs another flag, or a mode that ignores it
    ("grpo", {"eval_data": "held.jsonl"}, "--eval-data held.jsonl changes nothing: it holds out prompts for --data"),
    ("grpo", {"data": "train.jsonl", "eval_data": "held.jsonl", "eval_prompts": 0},
     "--eval-data held.jsonl changes nothing: --eval-prompts 0 turns the held-out evaluation off"),
    ("ppo", {"eval_prompts": 0, "eval_interval": 5}, "--eval-interval 5 changes nothing: --eval-prompts 0"),
    ("grpo", {"data": "train.jsonl", "task": "letter"}, "--task letter changes nothing: --data replaces the built-in task"),
    ("trpo", {"reward_model_weight": 2.0}, "--reward-model-weight 2.0 changes nothing: it weights --reward-model"),
    ("grpo", {"reward_fn_weight": 0.5}, "--reward-fn-weight 0.5 changes nothing: it weights --reward-fn"),
    ("ppo", {"task": "letter", "format_weight": 0.5}, "--format-weight 0.5 changes nothing: the letter task has no format"),
    ("grpo", {"lora_alpha": 8.0}, "--lora-alpha 8.0 changes nothing: it is a setting of LoRA adapters: pass --lora-rank"),
    ("ppo", {"lora_merge": True}, "--lora-merge True changes nothing: it is a setting of LoRA adapters"),
    ("grpo", {"collective_timeout": 5.0}, "--collective-timeout 5.0 changes nothing: it bounds waits between processes"),
    ("grpo", {"epsilon": 0.1}, "--epsilon 0.1 changes nothing: at --num-iterations 1 the ratio π_θ/π_old is 1"),
    ("grpo", {"epsilon_high": 0.28}, "--epsilon-high 0.28 changes nothing: at --num-iterations 1"),
    ("grpo", {"importance_sampling_level": "sequence"}, "--importance-sampling-level sequence changes nothing: at --num"),
    ("grpo", {"dynamic_sampling_rounds": 8}, "--dynamic-sampling-rounds 8 changes nothing: it bounds --dynamic-sampling"),
    ("grpo", {"beta": 0.0, "kl_estimator": "k1"}, "--kl-estimator k1 changes nothing: --beta 0 has no KL term"),
    ("grpo", {"beta": 0.1, "kl_estimator": "none"}, "--beta 0.1 changes nothing: --kl-estimator none has no KL term"),
    ("ppo", {"kl_target": 3.0}, "--kl-target 3.0 changes nothing: it is a setting of --adaptive-kl, which is off"),
    ("ppo", {"kl_horizon": 500}, "--kl-horizon 500 changes nothing: it is a setting of --adaptive-kl"),
    ("ppo", {"beta": 0.0, "adaptive_kl": True}, "--adaptive-kl True changes nothing: the controller multiplies β"),
    ("ppo", {"vf_coef": 0.0, "cliprange_value": 0.5}, "--cliprange-value 0.5 changes nothing: --vf-coef 0 leaves"),
    ("trpo", {"advantage": "group", "group_size": 2, "gamma": 0.9}, "--gamma 0.9 changes nothing: --advantage group has"),
    ("trpo", {"advantage": "group", "group_size": 2, "value_iters": 5}, "--value-iters 5 changes nothing: --advantage group"),
    ("reward_model", {"data": "pairs.jsonl", "num_pairs": 10}, "--num-pairs 10 changes nothing: it sizes the built-in pairs"),
]


@pytest.mark.parametrize("script, flags, message", IDLE, ids=[f"{s}-{'-'.join(f)}" for s, f, _ in IDLE])
def test_a_flag_that_would_change_nothing_is_refused_before_anything_loads(script, flags, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("train.jsonl", "held.jsonl"):
        write_prompts(tmp_path / name, ["Say a."] * 20)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as error:
        module.main(module.Args(model=str(tmp_path / "never-read"), output_dir=str(tmp_path / "runs"), **flags))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "runs").exists()


# --- 3. a reward function of one's own that fails ---

RF_PY = '''
calls = 0


def raises(prompts, completions, **kwargs):
    global calls
    calls += 1  # the held-out evaluation, step 1, then step 2 fails
    if calls == 3:
        return helper()
    return [float(len(c)) for c in completions]


def helper():
    raise RuntimeError("my reward is broken")


def words(prompts, completions, **kwargs):
    return ["good" for _ in completions]


def one_number(prompts, completions, **kwargs):
    return 1.0
'''


def test_a_reward_function_that_raises_names_itself_shows_its_frames_and_keeps_the_checkpoint(llama_folder, tmp_path):
    (tmp_path / "rf.py").write_text(RF_PY)
    result = run_script("grpo.py", "--model", llama_folder, "--task", "letter", "--reward-fn", "rf.py:raises", "--steps", "3",
                        "--save-interval", "1", "--prompts-per-step", "2", "--group-size", "2", "--micro-batch-size", "4",
                        "--max-new-tokens", "4", "--eval-prompts", "4", "--run-name", "rf", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    error = result.stderr[result.stderr.index("--reward-fn"):]
    assert error.startswith("--reward-fn rf.py:raises raised RuntimeError: my reward is broken\n"), error
    assert 'rf.py", line 9, in raises' in error and 'rf.py", line 14, in helper' in error  # the user's frames, in order
    assert "Traceback" not in result.stderr and "common.py" not in error and "grpo.py" not in error
    state = torch.load(tmp_path / "runs" / "rf" / "checkpoint" / plumbing.TRAINING_STATE, weights_only=True)
    assert state["step"] == 1  # the last good checkpoint, intact
    assert len(scalars(tmp_path / "runs" / "rf", "reward/raises")) == 1


@pytest.mark.parametrize("source, message", [
    ("def f(prompts, completions, **kwargs):\n    return [1.0 for c in completions\n",
     r"^--reward-fn .*bad.py:f: importing .*bad.py failed:\n  File .*bad.py\", line 2\n    return \[1.0 for c in "
     r"completions\n +\^\nSyntaxError: '\[' was never closed$"),
    ("import no_such_module\n", r"importing .*bad.py failed:\n.*bad.py\", line 1, in <module>\n.*\nModuleNotFoundError: "
                                r"No module named 'no_such_module'$"),
])
def test_a_reward_file_that_cannot_be_imported_says_why_in_its_own_lines(source, message, tmp_path):
    (tmp_path / "bad.py").write_text(source)
    with pytest.raises(SystemExit, match=message) as error:
        plumbing.load_reward_function(f"{tmp_path / 'bad.py'}:f")
    assert "plumbing" not in str(error.value)


@pytest.mark.parametrize("function, message", [
    ("words", r"^reward function words returned \['good', 'good'\]: return a list of one float \(or None\) per completion$"),
    ("one_number", r"^reward function one_number returned 1.0: return a list of one float"),
])
def test_a_reward_function_that_returns_no_numbers_says_what_it_returned(function, message, tmp_path):
    (tmp_path / "rf.py").write_text(RF_PY)
    name, fn = plumbing.load_reward_function(f"{tmp_path / 'rf.py'}:{function}")
    rows = [{"prompt": "p", "answer": None}] * 2
    with pytest.raises(SystemExit, match=message):
        tasks.compute_rewards(rows, ["a", "b"], {}, functions={name: (fn, 1.0)})
