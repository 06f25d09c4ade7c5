"""Your data, your reward functions, your metrics: the sources and formats TRL users bring (built here in
code: no network), several reward functions with TRL's signature, the final-answer forms of the math data
sets, and pass@k."""

import json
import math

import pytest
import torch

import common
import plumbing
import tasks
from test_grpo import run_script, scalars
from tiny import tiny_policy

ROWS = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {i} + {i}?"}],
         "solution": f"{i} + {i} = {2 * i}\n#### {2 * i}", "difficulty": i % 3} for i in range(1, 21)]


def write_sources(tmp_path, rows) -> dict[str, str]:
    """The same rows as JSONL, parquet, a JSON array, a save_to_disk folder and a saved DatasetDict."""
    import datasets

    sources = {"jsonl": tmp_path / "d.jsonl", "parquet": tmp_path / "d.parquet", "json": tmp_path / "d.json",
               "disk": tmp_path / "saved", "dict": tmp_path / "saved_dict"}
    sources["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources["json"].write_text(json.dumps(rows))
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(sources["parquet"]))
    dataset.save_to_disk(str(sources["disk"]))
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(2))}).save_to_disk(str(sources["dict"]))
    return {k: str(v) for k, v in sources.items()}


def test_every_source_gives_the_same_rows_with_every_column(tmp_path):
    sources = write_sources(tmp_path, ROWS)
    for kind, source in sources.items():
        rows = plumbing.data.read_prompts(source)
        assert [{k: v for k, v in r.items() if k != "_where"} for r in rows] == ROWS, kind
        assert rows[1]["_where"] == (f"{source}:2" if kind == "jsonl" else f"{source} row 2")
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,answer\nWhat is 1 + 1?,2\nWhat is 2 + 2?,4\n")
    assert [r["answer"] for r in plumbing.data.read_prompts(str(csv))] == ["2", "4"]


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "ok"}, {"prompt": "   "}], "row 2: the \"prompt\" is empty or only white space"),
    ([{"prompt": "ok"}, {"question": "no prompt"}], "row 2: needs a \"prompt\": a non-empty string, or a list of chat"),
    ([{"prompt": [{"role": "user"}]}], "row 1: needs a \"prompt\""),
    ([{"prompt": "ok", "answer": [1, 2]}], "row 1: \"answer\" must be a string or a number"),
])
def test_a_bad_row_is_one_line_naming_the_row(rows, message, tmp_path):
    import datasets

    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(SystemExit, match=f"^{path}") as error:
        plumbing.data.read_prompts(str(path))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unreadable_sources_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "folder").mkdir()
    monkeypatch.setattr(plumbing.models, "hub_reachable", lambda: False)
    for source, message in [(tmp_path / "notes.txt", "not a data file this project reads"),
                            (tmp_path / "broken.parquet", "cannot be read as a data set"),
                            (tmp_path / "folder", "cannot be read as a data set"),
                            (tmp_path / "missing.parquet", "no such file"),
                            ("someone/some-dataset", "the Hugging Face hub cannot be reached from here")]:
        with pytest.raises(SystemExit, match=message) as error:
            plumbing.data.read_prompts(str(source))
        assert "\n" not in str(error.value)


def test_chat_messages_go_through_the_template_and_need_one():
    model, tokenizer = tiny_policy("llama")  # has a chat template
    text = common.format_prompt(tokenizer, ROWS[0]["prompt"])
    assert text == "<|user|>Be brief.<|end|><|user|>What is 1 + 1?<|end|><|assistant|>"  # the system message kept
    assert common.format_prompt(tokenizer, "hi") == "<|user|>hi<|end|><|assistant|>"  # a string: one user message
    _, gpt2_tokenizer = tiny_policy("gpt2")  # no chat template
    rows = [{"prompt": "fine", "_where": "d.jsonl:1"}, {"prompt": ROWS[0]["prompt"], "_where": "d.jsonl:2"}]
    with pytest.raises(SystemExit, match="^d.jsonl:2: chat messages need a chat template, and this tokenizer has none"):
        plumbing.check_prompt_lengths(gpt2_tokenizer, rows, 100, "", "")


@pytest.mark.parametrize("completion, answer, right", [
    ("so the total is 72", "Natalia sold 48/2 = 24 clips.\n#### 72", 1.0),  # GSM8K's answer, the completion's last number
    ("It is 71. No: #### 72", "#### 72", 1.0),  # the completion's own #### line wins over its other numbers
    ("The answer is $\\boxed{\\frac{1}{2}}$.", "\\boxed{\\frac{1}{2}}", 1.0),  # MATH: nested braces, compared as text
    ("\\boxed{\\frac{1}{3}}", "$\\boxed{\\frac{1}{2}}$", 0.0),
    ("\\boxed{1,234}", "1234", 1.0),  # a bare number
    ("1234 then 5", "1234", 0.0),
    ("The capital is Paris.", "paris", 1.0),
])
def test_the_rule_reward_reads_each_final_answer_form(completion, answer, right):
    assert tasks.correct_reward(completion, answer) == right
    assert tasks.extract_answer("x\n#### 1,234") == "1,234" and tasks.extract_answer(" 7 ") == "7"
    assert tasks.reference_answer({"solution": "#### 3"}) == "#### 3" and tasks.reference_answer({"prompt": "p"}) is None


def test_pass_at_k_is_one_minus_the_chance_that_k_draws_miss():
    """By hand: n = 4 samples, c = 1 correct, k = 2: the 6 pairs, 3 of which hold the correct one: 1/2."""
    assert tasks.pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert tasks.pass_at_k(4, 0, 4) == 0.0 and tasks.pass_at_k(4, 3, 2) == 1.0
    for n, c, k in [(8, 3, 1), (8, 3, 4), (16, 5, 8), (10, 1, 10)]:
        assert tasks.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    assert tasks.pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 is the mean correctness


TRL_REWARDS = '''
def accuracy_reward(completions, solution, **kwargs):  # TRL's signature: conversational completions, a `solution` column
    return [float(c[0]["content"].strip().endswith(s.split("####")[-1].strip())) for c, s in zip(completions, solution)]


def short(completions, difficulty, **kwargs):
    return [None if d == 0 else 1.0 - len(c[0]["content"]) / 20 for c, d in zip(completions, difficulty)]


def record(completions, **kwargs):
    import json, pathlib
    pathlib.Path("seen.json").write_text(json.dumps({"completion": completions[0], "columns": sorted(kwargs)}))
    return [0.0] * len(completions)


def wants_answer(completions, answer, **kwargs):
    return [0.0] * len(completions)
'''


def test_trl_reward_functions_run_unchanged_on_a_conversational_parquet_file(llama_folder, tmp_path):
    """TRL's accuracy_reward(completions, solution) and two more functions, each with a weight, on chat-message
    prompts: each function's mean and std logged, the rule reward off (functions were given), pass@k logged."""
    (tmp_path / "rewards.py").write_text(TRL_REWARDS)
    sources = write_sources(tmp_path, ROWS)
    result = run_script("grpo.py", "--model", llama_folder, "--data", sources["parquet"], "--steps", "2",
                        "--prompts-per-step", "2", "--group-size", "2", "--micro-batch-size", "4", "--max-new-tokens", "6",
                        "--eval-prompts", "2", "--eval-samples", "4", "--reward-fn", "rewards.py:accuracy_reward", "--reward-fn-weight", "1",
                        "--reward-fn", "rewards.py:short", "--reward-fn-weight", "0.5", "--reward-fn", "rewards.py:record",
                        "--reward-fn-weight", "0", "--run-name", "trl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["completion"][0]["role"] == "assistant" and seen["columns"] == ["difficulty", "prompts", "solution"]
    run = tmp_path / "runs" / "trl"
    for name in ("accuracy_reward", "short", "record"):
        assert len(scalars(run, f"reward/{name}")) == 2 and len(scalars(run, f"reward/{name}_std")) == 2
    assert not any(tag.startswith("reward/correct") for tag in scalar_tags(run))  # the rule reward stayed off
    pass1, avg = scalars(run, "eval/pass@1"), scalars(run, "eval/avg@4")
    assert len(pass1) == 2 and pass1 == pytest.approx(avg) and len(scalars(run, "eval/pass@4")) == 2
    assert "held-out accuracy" in result.stdout and "pass@4" in result.stdout


def scalar_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(run_dir)).Reload().Tags()["scalars"]


def test_a_reward_function_asking_for_a_missing_column_stops_before_loading(tmp_path):
    (tmp_path / "rewards.py").write_text(TRL_REWARDS)
    sources = write_sources(tmp_path, ROWS)
    result = run_script("grpo.py", "--model", str(tmp_path / "never-read"), "--data", sources["jsonl"],
                        "--reward-fn", "rewards.py:wants_answer", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("reward function wants_answer asks for 'answer', which the data has no column for "
                                     "(its columns: difficulty, solution); rename the parameter or add the column")
    assert not (tmp_path / "runs").exists()


def test_rule_weight_defaults_to_the_rule_reward_alone_or_off_beside_your_functions(llama_folder, tmp_path):
    """No --reward-fn: the rule reward at weight 1; with one: the user's function alone, unless --rule-weight says
    otherwise. The held-out line says accuracy and reward apart."""
    (tmp_path / "rewards.py").write_text(TRL_REWARDS)
    sources = write_sources(tmp_path, ROWS)
    base = ["--model", llama_folder, "--data", sources["jsonl"], "--steps", "1", "--prompts-per-step", "2",
            "--group-size", "2", "--micro-batch-size", "4", "--max-new-tokens", "4", "--eval-prompts", "2"]
    for name, extra, terms in [("rule", [], {"correct"}), ("fn", ["--reward-fn", "rewards.py:short"], {"short"}),
                               ("both", ["--reward-fn", "rewards.py:short", "--rule-weight", "1"], {"correct", "short"})]:
        result = run_script("grpo.py", *base, *extra, "--run-name", name, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        logged = {t.split("/")[1] for t in scalar_tags(tmp_path / "runs" / name) if t.startswith("reward/")}
        assert {t for t in logged if not t.endswith("_std")} - {"mean", "std", "zero_std_groups"} == terms
        assert "held-out accuracy" in result.stdout and ", reward" in result.stdout


def test_preference_pairs_in_trls_conversational_format(tmp_path, llama_folder):
    """chosen/rejected as message lists with an implicit prompt (no "prompt" column), in a parquet file."""
    import datasets

    pairs = [{"chosen": [{"role": "user", "content": f"{i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}],
              "rejected": [{"role": "user", "content": f"{i} + {i}?"}, {"role": "assistant", "content": "no idea"}]}
             for i in range(12)]
    datasets.Dataset.from_list(pairs).to_parquet(str(tmp_path / "pairs.parquet"))
    read = plumbing.read_pairs(str(tmp_path / "pairs.parquet"))
    assert read[3]["prompt"] == [{"role": "user", "content": "3 + 3?"}] and read[3]["chosen"] == "6"
    result = run_script("reward_model.py", "--model", llama_folder, "--data", "pairs.parquet", "--steps", "2",
                        "--batch-size", "4", "--max-length", "48", "--run-name", "rm", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    bad = [{"chosen": pairs[0]["chosen"], "rejected": [{"role": "user", "content": "other"}, pairs[0]["rejected"][1]]}]
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(SystemExit, match="bad.parquet row 1: conversational \"chosen\" and \"rejected\" must be"):
        plumbing.read_pairs(str(tmp_path / "bad.parquet"))


def test_rollouts_of_chat_message_prompts_and_their_rewards_as_trl_passes_them():
    model, tokenizer = tiny_policy("llama")
    rows = [dict(ROWS[0]), dict(ROWS[1])]
    rollout = common.generate(model, tokenizer, [r["prompt"] for r in rows], 4, group_size=1)
    arguments = tasks.reward_function_arguments(rows, rollout.texts)
    assert arguments["completions"][1] == [{"role": "assistant", "content": rollout.texts[1]}]
    assert arguments["solution"] == [ROWS[0]["solution"], ROWS[1]["solution"]] and arguments["difficulty"] == [1, 2]
    assert "_where" not in arguments and arguments["prompts"] == [ROWS[0]["prompt"], ROWS[1]["prompt"]]
    # no "answer" column: the rule reward reads "solution", GSM8K-style (#### 2, #### 4)
    rules = tasks.rule_rewards("arithmetic", "d.jsonl", rows)
    torch.testing.assert_close(tasks.compute_rewards(rows, ["2", "five"], rules)[0], torch.tensor([1.0, 0.0]))
