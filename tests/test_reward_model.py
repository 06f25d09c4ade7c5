import json
import random

import pytest
import torch

import plumbing
import tasks
import reward_model
from test_grpo import run_script, scalars


def test_bradley_terry_loss_and_accuracy_on_hand_numbers():
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 3.0])
    # -log σ(2), -log σ(0) = log 2, -log σ(-2)
    expected = (torch.log1p(torch.exp(torch.tensor(-2.0))) + torch.log(torch.tensor(2.0))
                + torch.log1p(torch.exp(torch.tensor(2.0)))) / 3
    assert reward_model.bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected.item())
    assert reward_model.pairwise_accuracy(chosen, rejected).item() == pytest.approx((1 + 0.5 + 0) / 3)


def write_pairs(path, n=200, seed=0):
    """A synthetic preference: the chosen response says yes, the rejected one says no."""
    rng = random.Random(seed)
    words = ["sun", "moon", "tree", "rock", "blue", "fast", "cold", "warm"]
    with open(path, "w") as f:
        for i in range(n):
            filler = " ".join(rng.choices(words, k=3))
            f.write(json.dumps({"prompt": f"Question {i}: {filler}?", "chosen": f"yes {filler}",
                                "rejected": f"no {filler}"}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, llama_folder):
    tmp = tmp_path_factory.mktemp("rm")
    args = reward_model.Args(model=llama_folder, data=write_pairs(tmp / "pairs.jsonl"), steps=24, batch_size=16,
                             lr=3e-3, max_length=64, eval_interval=1000, output_dir=str(tmp), run_name="rm",
                             gradient_checkpointing=True)  # the same gradients: the accuracy tests cover it too
    return reward_model.main(args)


def test_tiny_reward_model_separates_held_out_pairs(trained_rm):
    """Seeds 1-8 on this machine gave held-out accuracy 1.0 after 24 steps (2026-12-04); the test asks for 0.9."""
    accuracy = scalars(trained_rm, "eval/accuracy")
    assert accuracy[-1] > 0.9, accuracy
    norm = json.loads((trained_rm / "checkpoint" / plumbing.REWARD_NORM_FILE).read_text())
    assert norm["std"] > 0 and norm["max_length"] == 64


def test_scores_do_not_depend_on_padding_side_or_batch(trained_rm):
    scorer = plumbing.RewardScorer(str(trained_rm / "checkpoint"), torch.device("cpu"))
    prompts = ["Question 1: sun?", "Question 2: a much longer question with many words?", "Q3"]
    completions = ["yes sun", "no", "yes and a longer answer than the others"]
    left = scorer(prompts, completions)
    scorer.tokenizer.padding_side = "right"
    right = scorer(prompts, completions)
    alone = torch.cat([scorer(prompts[i:i + 1], completions[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    assert left[0] > left[1]  # yes beats no


def test_reloaded_reward_model_reproduces_the_saved_normalisation(trained_rm):
    """The normalisation was computed by the in-memory model on the training responses; the model
    read back from disk must give those responses mean 0 and std 1 again."""
    pairs = plumbing.read_pairs(str(trained_rm.parent / "pairs.jsonl"))
    random.Random(1).shuffle(pairs)  # main()'s split: seed 1, 10 % held out first
    train = pairs[max(1, int(len(pairs) * 0.1)):]
    scorer = plumbing.RewardScorer(str(trained_rm / "checkpoint"), torch.device("cpu"))
    scores = scorer([p["prompt"] for p in train] * 2, [p["chosen"] for p in train] + [p["rejected"] for p in train])
    assert abs(scores.mean().item()) < 1e-4 and abs(scores.std().item() - 1) < 1e-4


def test_saved_reward_model_reloads_with_the_same_scores(trained_rm):
    path = str(trained_rm / "checkpoint")
    a = plumbing.RewardScorer(path, torch.device("cpu"))(["Question 9: moon?"] * 2, ["yes moon", "no moon"])
    b = plumbing.RewardScorer(path, torch.device("cpu"))(["Question 9: moon?"] * 2, ["yes moon", "no moon"])
    assert torch.equal(a, b)


def test_grpo_runs_with_the_reward_model(trained_rm, llama_folder, tmp_path):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Question {i}: sun?"}) + "\n"
                                                    for i in range(20)))
    result = run_script("grpo.py", "--model", llama_folder, "--data", "prompts.jsonl", "--reward-model",
                        str(trained_rm / "checkpoint"), "--steps", "2", "--run-name", "withrm", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(scalars(tmp_path / "runs" / "withrm", "reward/reward_model")) == 2


def test_a_prompt_the_reward_model_cannot_read_with_its_completion_is_refused(trained_rm, llama_folder, tmp_path):
    """The reward model reads 64 tokens (its --max-length), right-truncated: a longer prompt would leave
    every completion cut off, all scored alike."""
    import grpo

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Short?"] * 10 + ["Long " * 20 + "?"]))
    args = grpo.Args(model=llama_folder, data=str(data), reward_model=str(trained_rm / "checkpoint"), output_dir=str(tmp_path))
    with pytest.raises(SystemExit, match=rf"^{data}:11: the prompt is \d+ tokens; the reward model reads 64 tokens \(its "
                                         r"--max-length\), which leaves no room for the completion. Train it with a larger"):
        grpo.main(args)


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "p", "chosen": "a"}\n', 'p.jsonl:1: needs "prompt", "chosen" and "rejected"'),
    ("", "no usable pairs"),
    ('{"prompt": "p", "chosen": "a", "rejected": "a"}\n' * 3, "chosen == rejected in every row"),
])
def test_bad_pairs_fail_early_and_write_nothing(content, message, tmp_path):
    (tmp_path / "p.jsonl").write_text(content)
    result = run_script("reward_model.py", "--data", "p.jsonl", cwd=tmp_path)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_builtin_pairs_prefer_the_bare_correct_answer():
    pairs = reward_model.arithmetic_pairs(50, seed=0)
    rows = [{"answer": p["chosen"]} for p in pairs]
    assert all(tasks.correct_reward(p["chosen"], r["answer"]) == 1.0 for p, r in zip(pairs, rows))
    assert all(p["chosen"] != p["rejected"] for p in pairs)
