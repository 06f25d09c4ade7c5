import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import grpo
from tiny import tiny_policy

ROOT = Path(__file__).resolve().parents[1]


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def run_script(script, *argv, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=cwd, env=env, capture_output=True, text=True)


# --- the math ---


def test_group_advantages_hand_example():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 2.0, 2.0])
    # group 1: mean 0.25, std 0.5; group 2: mean 2, std sqrt(2/3)
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, 1 / (2 / 3) ** 0.5, -1 / (2 / 3) ** 0.5, 0.0, 0.0])
    torch.testing.assert_close(grpo.group_advantages(rewards, 4), expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(grpo.group_advantages(rewards, 4, scale="none"),
                               torch.tensor([0.75, -0.25, -0.25, -0.25, 1.0, -1.0, 0.0, 0.0]))


def test_group_advantages_zero_std_group_gives_zero_not_nan():
    advantages = grpo.group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0]), 3)
    assert advantages[:3].tolist() == [0.0, 0.0, 0.0]
    assert torch.isfinite(advantages).all()


def test_k3_is_nonnegative_and_zero_when_policies_agree():
    logprobs, ref_logprobs = torch.randn(1000) - 2, torch.randn(1000) - 2
    assert (grpo.k3_kl(logprobs, ref_logprobs) >= 0).all()
    assert grpo.k3_kl(logprobs, logprobs).abs().max() == 0


# Two completions, T = 3: row 0 has 2 real tokens, row 1 one. Ratio 1, so l_it = -A_i.
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])
ADV = torch.tensor([2.0, -1.0])


@pytest.mark.parametrize("loss_type, expected", [
    ("grpo", ((-2 - 2) / 2 + 1 / 1) / 2),  # mean over sequences of per-sequence token means
    ("dapo", (-2 - 2 + 1) / 3),  # one mean over all real tokens
    ("dr_grpo", (-2 - 2 + 1) / (2 * 4)),  # sum / (rows × max_new_tokens), max_new_tokens = 4
])
def test_loss_aggregation_matches_hand_computation(loss_type, expected):
    logprobs = torch.randn(2, 3)
    loss, _ = grpo.grpo_loss(logprobs, logprobs, None, ADV, MASK, beta=0.0, epsilon=0.2, epsilon_high=0.2,
                             loss_type=loss_type, max_new_tokens=4)
    assert loss.item() == pytest.approx(expected)


def test_loss_clips_the_ratio_and_adds_beta_times_k3():
    old = torch.zeros(1, 1)
    new = torch.log(torch.tensor([[1.5]]))  # ratio 1.5 > 1 + ε_high
    ref = torch.log(torch.tensor([[0.5]]))
    loss, stats = grpo.grpo_loss(new, old, ref, torch.tensor([1.0]), torch.ones(1, 1), beta=0.1, epsilon=0.2,
                                 epsilon_high=0.3, loss_type="grpo", max_new_tokens=1)
    kl = 0.5 / 1.5 - torch.log(torch.tensor(0.5 / 1.5)) - 1
    assert loss.item() == pytest.approx(-1.3 + 0.1 * kl.item())
    assert stats["clip_high"].item() == 1.0 and stats["clip_low"].item() == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_minibatch_losses_add_up_to_the_batch_loss(loss_type):
    torch.manual_seed(0)
    logprobs, old, ref = torch.randn(3, 6, 5)
    mask = (torch.rand(6, 5) > 0.3).long()
    mask[:, 0] = 1
    adv = torch.randn(6)
    args = dict(beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type, max_new_tokens=5)
    whole, _ = grpo.grpo_loss(logprobs, old, ref, adv, mask, **args)
    parts = sum(grpo.grpo_loss(logprobs[i:i + 2], old[i:i + 2], ref[i:i + 2], adv[i:i + 2], mask[i:i + 2], **args,
                               num_rows=6, num_tokens=mask.sum())[0] for i in range(0, 6, 2))
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


def test_ratio_is_exactly_one_on_the_first_pass():
    """The old log-probs (no-grad pass) and the first training pass go through the same computation."""
    model, tokenizer = tiny_policy("gpt2")
    rollout = common.generate(model, tokenizer, ["one", "two two", "three", "four"] * 2, max_new_tokens=8)
    with torch.no_grad():
        old_logprobs = common.completion_logprobs(model, rollout, temperature=0.9, chunk_size=4)
    for rows in torch.arange(8).split(4):
        mb = common.rollout_slice(rollout, rows)
        logprobs = common.completion_logprobs(model, mb, 0.9)
        assert logprobs.requires_grad
        ratio = torch.exp(logprobs - old_logprobs[rows])
        assert torch.equal(ratio[mb.completion_mask.bool()], torch.ones(int(mb.completion_mask.sum())))


# --- end to end ---


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_grpo_runs_end_to_end_and_saves_a_loadable_checkpoint(arch, gpt2_folder, llama_folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gpt2_folder if arch == "gpt2" else llama_folder
    result = run_script("grpo.py", "--model", folder, "--task", "letter", "--lr", "1e-3", "--steps", "2",
                        "--eval-prompts", "8", "--num-iterations", "2",
                        "--group-size", "4", "--minibatch-size", "8", "--run-name", "e2e", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "e2e"
    assert list(run_dir.glob("events.out.tfevents.*"))
    for tag in ["reward/mean", "train/kl", "train/loss", "train/clip_low", "completion/length_mean", "time/tokens_per_s"]:
        assert len(scalars(run_dir, tag)) == 2, tag
    assert len(scalars(run_dir, "eval/letter")) == 2  # before the first step and after the last
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint")
    AutoTokenizer.from_pretrained(run_dir / "checkpoint")
    initial = AutoModelForCausalLM.from_pretrained(folder)
    changed = [not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters())]
    assert any(changed)  # the checkpoint holds the trained weights


def test_grpo_learns_the_letter_reward(llama_folder, tmp_path):
    args = grpo.Args(model=llama_folder, task="letter", steps=50, lr=3e-3, max_new_tokens=16, eval_interval=1000,
                     eval_prompts=4, save_interval=1000, output_dir=str(tmp_path), run_name="learn", seed=1)
    run_dir = grpo.main(args)
    rewards = scalars(run_dir, "reward/mean")
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.1, (first, last)


# --- bad input: a clear error before any model is loaded, nothing written ---


@pytest.mark.parametrize("argv, message", [
    (["--group-size", "1"], "at least 2 completions"),
    (["--prompts-per-step", "3", "--group-size", "4", "--minibatch-size", "8"], "not divisible by --minibatch-size"),
    (["--model", "no-such-org/no-such-model"], "not a local folder and not loadable"),
    (["--model", "./missing-folder"], "no config.json"),
    (["--data", "bad.jsonl"], "bad.jsonl:2: not valid JSON"),
    (["--data", "nowhere.jsonl"], "nowhere.jsonl: no such file"),
    (["--task", "poetry"], "unknown"),
])
def test_bad_input_fails_early_and_writes_nothing(argv, message, tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n{oops\n")
    result = run_script("grpo.py", *argv, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_a_second_run_under_the_same_name_fails_early_and_keeps_the_first(tmp_path):
    first = tmp_path / "runs" / "mine"
    (first / "checkpoint").mkdir(parents=True)
    (first / "checkpoint" / "config.json").write_text("{}")
    result = run_script("grpo.py", "--run-name", "mine", cwd=tmp_path)
    assert result.returncode != 0
    assert "holds an earlier run; pass another --run-name" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in first.rglob("*")) == ["checkpoint", "config.json"]


def test_grpo_with_lora_learns_the_letter_reward_and_saves_adapters_and_a_merged_model(llama_folder, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    args = grpo.Args(model=llama_folder, task="letter", steps=30, lr=2e-2, lora_rank=8, lora_alpha=16,
                     lora_merge=True, gradient_checkpointing=True, max_new_tokens=16, eval_interval=1000,
                     eval_prompts=4, save_interval=1000, output_dir=str(tmp_path), run_name="lora", seed=1)
    run_dir = grpo.main(args)
    # Greedy held-out share of the letter a, before and after. (The sampled reward barely moves: adapters
    # inside the blocks cannot sharpen a random tiny model's near-uniform output much.)
    before, after = scalars(run_dir, "eval/letter")
    assert before < 0.2 and after > 0.8, (before, after)
    assert (run_dir / "checkpoint" / "adapter_config.json").is_file()  # adapters only, a peft folder
    base = AutoModelForCausalLM.from_pretrained(llama_folder)
    adapted = PeftModel.from_pretrained(base, run_dir / "checkpoint").merge_and_unload()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint-merged")  # a plain transformers folder
    base_again = AutoModelForCausalLM.from_pretrained(llama_folder)
    for (name, a), b, c in zip(merged.named_parameters(), adapted.parameters(), base_again.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert any(not torch.equal(a, c) for a, c in zip(merged.parameters(), base_again.parameters()))
