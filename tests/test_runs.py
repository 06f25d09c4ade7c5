"""A run from start to finish, in all four scripts: Ctrl-C, a NaN, --resume, and bad input refused
before anything loads or is written."""

import importlib
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

import plumbing
import tasks
from test_grpo import run_script, scalars

RL = ["grpo", "ppo", "trpo"]
# 8 completions per step. PPO and TRPO would replace the reward of an unfinished completion by a penalty.
SMALL = {"grpo": dict(group_size=4, prompts_per_step=2, micro_batch_size=4, lr=1e-3),
         "ppo": dict(prompts_per_step=8, missing_eos_penalty=None, lr=1e-3),
         "trpo": dict(prompts_per_step=8, missing_eos_penalty=None, max_kl=0.05)}


def rl_args(script, folder, tmp_path, **kwargs):
    module = importlib.import_module(script)
    base = dict(model=folder, task="letter", eval_prompts=4, eval_interval=1000, max_new_tokens=8,
                output_dir=str(tmp_path), **SMALL[script])
    return module, module.Args(**{**base, **kwargs})


def interrupt_during(monkeypatch, call: int, action):
    """Run action() at the call-th completion scored by the letter reward (a step scores 8, the evaluation 4)."""
    calls = []
    letter_reward = tasks.letter_reward

    def reward(completion):
        calls.append(1)
        if len(calls) == call:
            action()
        return letter_reward(completion) + 0.1 * (len(calls) % 3)  # rewards that vary: non-zero advantages

    monkeypatch.setattr(tasks, "letter_reward", reward)


@pytest.mark.parametrize("script", RL)
def test_resume_continues_the_run_bit_for_bit(script, llama_folder, tmp_path):
    """4 steps in one go = 2 steps, then --resume to 4: the same parameters to the bit, the same rewards."""
    module, whole = rl_args(script, llama_folder, tmp_path, steps=4, save_interval=2, run_name="whole")
    whole_dir = module.main(whole)
    _, first = rl_args(script, llama_folder, tmp_path, steps=2, run_name="halves")
    halves_dir = module.main(first)
    module.main(module.Args(resume=str(halves_dir), steps=4))
    a, b = load_file(whole_dir / "checkpoint" / "model.safetensors"), load_file(halves_dir / "checkpoint" / "model.safetensors")
    initial = load_file(os.path.join(llama_folder, "model.safetensors"))
    differ = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not differ and any(not torch.equal(a[k], initial[k]) for k in a), differ
    tag = "reward/mean" if script == "grpo" else "objective/scores"
    assert scalars(whole_dir, tag) == scalars(halves_dir, tag) and len(scalars(halves_dir, tag)) == 4
    if script != "grpo":
        assert torch.equal(torch.load(whole_dir / "checkpoint" / "value_head.pt")["weight"],
                           torch.load(halves_dir / "checkpoint" / "value_head.pt")["weight"])


def test_resume_refuses_a_flag_that_changes_the_run_and_takes_steps(llama_folder, tmp_path):
    module, args = rl_args("grpo", llama_folder, tmp_path, steps=1, run_name="r")
    run_dir = module.main(args)
    with pytest.raises(SystemExit, match=r"--group-size 6 \(the run's: 4\) would change the run"):
        module.main(module.Args(resume=str(run_dir), group_size=6, steps=2))
    with pytest.raises(SystemExit, match="a run of grpo.py, not of ppo.py"):
        importlib.import_module("ppo").main(importlib.import_module("ppo").Args(resume=str(run_dir)))
    module.main(module.Args(resume=str(run_dir), steps=2))
    assert len(scalars(run_dir, "reward/mean")) == 2


@pytest.mark.parametrize("script, signum", [("grpo", signal.SIGINT), ("ppo", signal.SIGINT), ("trpo", signal.SIGINT),
                                            ("grpo", signal.SIGTERM), ("ppo", signal.SIGUSR1)])
def test_first_signal_finishes_the_step_saves_it_and_exits_with_its_status(script, signum, llama_folder, tmp_path,
                                                                           monkeypatch, capsys):
    """Ctrl-C, or a scheduler's SIGTERM or SIGUSR1, during step 3: the step ends, is saved, the resume command is
    printed, the exit status is 128 + the signal; --resume then says what it restored and goes on."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # SIG_IGN in a background job
    interrupt_during(monkeypatch, 4 + 8 * 2 + 3, lambda: os.kill(os.getpid(), signum))  # during step 3
    module, args = rl_args(script, llama_folder, tmp_path, steps=6, save_interval=100, run_name="stop")
    with pytest.raises(SystemExit) as exit_:
        module.main(args)
    assert exit_.value.code == 128 + signum
    run_dir = tmp_path / "stop"
    state = torch.load(run_dir / "checkpoint" / plumbing.TRAINING_STATE, weights_only=True)
    assert state["step"] == 3 and len(scalars(run_dir, "completion/length_mean")) == 3
    out = capsys.readouterr()
    assert f"Resume with: python {script}.py --resume {run_dir}" in out.out
    assert (f"{signal.Signals(signum).name if signum != signal.SIGINT else 'Ctrl-C'}: finishing this step" in out.err)
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the handlers are put back
    monkeypatch.undo()
    module.main(module.Args(resume=str(run_dir), steps=4))  # and the run goes on
    assert len(scalars(run_dir, "completion/length_mean")) == 4
    said = capsys.readouterr().out
    assert f"resuming {run_dir} after step 3: 1 step(s) left, to step 4; restored the weights" in said
    assert ("the value head's optimizer" if script == "trpo" else "the optimizer's state") in said
    assert "the random states of 1 process(es)" in said


@pytest.mark.parametrize("script", RL)
@pytest.mark.parametrize("failure", ["nan", "second ctrl-c"])
def test_a_nan_or_a_second_ctrl_c_keeps_the_last_checkpoint_and_the_logs(script, failure, llama_folder, tmp_path,
                                                                       monkeypatch):
    def fail():
        if failure == "nan":
            monkeypatch.setattr(tasks, "letter_reward", lambda c: float("nan"))
        else:
            raise KeyboardInterrupt  # what the second Ctrl-C raises in the middle of a step

    interrupt_during(monkeypatch, 4 + 8 * 2 + 1, fail)  # step 3
    module, args = rl_args(script, llama_folder, tmp_path, steps=5, save_interval=2, run_name="fail")
    with pytest.raises(FloatingPointError if failure == "nan" else SystemExit):
        module.main(args)
    run_dir = tmp_path / "fail"
    assert torch.load(run_dir / "checkpoint" / plumbing.TRAINING_STATE, weights_only=True)["step"] == 2
    assert not (run_dir / "checkpoint.tmp").exists()
    assert len(scalars(run_dir, "completion/length_mean")) == 2  # steps 1 and 2 were logged and flushed


def test_reward_model_ctrl_c_saves_the_model_as_it_is_and_exits_130(llama_folder, tmp_path, monkeypatch):
    import reward_model
    from test_reward_model import write_pairs

    bt_loss = reward_model.bradley_terry_loss
    calls = []

    def loss_then_ctrl_c(chosen, rejected):
        calls.append(1)
        if len(calls) == 3:  # the evaluation before training, step 1, step 2
            os.kill(os.getpid(), signal.SIGINT)
        return bt_loss(chosen, rejected)

    monkeypatch.setattr(reward_model, "bradley_terry_loss", loss_then_ctrl_c)
    args = reward_model.Args(model=llama_folder, data=write_pairs(tmp_path / "p.jsonl", n=100), batch_size=8,
                             output_dir=str(tmp_path), run_name="rm", eval_interval=1000)
    with pytest.raises(SystemExit) as exit_:
        reward_model.main(args)
    assert exit_.value.code == 130
    assert (tmp_path / "rm" / "checkpoint" / plumbing.REWARD_NORM_FILE).is_file()
    assert len(scalars(tmp_path / "rm", "train/loss")) == 2


def test_ctrl_c_as_a_user_sends_it_exits_130_without_a_traceback(llama_folder, tmp_path):
    """The real signal, to a real process, between its steps: a one-line message and status 130."""
    import subprocess
    import sys
    import time

    from test_grpo import ROOT

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, str(ROOT / "grpo.py"), "--model", llama_folder, "--task", "letter",
                                "--steps", "100000", "--eval-prompts", "0", "--max-new-tokens", "4", "--run-name", "u"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "u"
    for _ in range(600):  # until the run has started (its event file exists), then a moment more
        time.sleep(0.1)
        if run_dir.is_dir() and any(run_dir.glob("events.*")):
            time.sleep(1.0)
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "Resume with: python grpo.py --resume" in out


# --- bad input: refused in one line naming the flag, before anything loads or is written ---

BAD = {  # kind: (flags, message)
    "not finite": ({"temperature": float("nan")}, "--temperature nan: must be in (0, inf)"),
    "out of range": ({"top_p": 1.5}, "--top-p 1.5: must be in (0, 1]"),
    "negative size": ({"max_new_tokens": 0}, "--max-new-tokens 0: must be in [1, inf)"),
    "not utf-8": ({"data": "latin1.jsonl"}, "latin1.jsonl:1: not UTF-8"),
    "field type": ({"data": "typed.jsonl"}, 'typed.jsonl:1: "answer" must be a string or a number'),
    "not a model": ({"model": "./empty"}, "no config.json"),
    "broken model": ({"model": "./broken"}, "cannot be loaded as a model"),
    "damaged weights": ({"model": "./damaged"}, "damaged/model.safetensors: damaged or incomplete ("),
    "blank prompt": ({"data": "blank.jsonl"}, 'blank.jsonl:2: the "prompt" is empty or only white space'),
    "not a reward model": ({"reward_model": "./empty"}, "not a folder written by reward_model.py"),
    "output is a file": ({"output_dir": "afile"}, "--output-dir afile: a file, not a folder"),
    "no such device": ({"device": "tpu"}, "--device tpu: not a device"),
    "missing gpu": ({"device": "cuda:3"}, "--device cuda:3: no CUDA GPU is visible here"),
}
RM_BAD = {"not finite": ({"lr": float("inf")}, "--lr inf: must be in (0, inf)"),
          "out of range": ({"eval_fraction": 1.0}, "--eval-fraction 1.0: must be in (0, 1)"),
          "not utf-8": ({"data": "latin1.jsonl"}, "latin1.jsonl:1: not UTF-8"),
          "field type": ({"data": "typed.jsonl"}, 'typed.jsonl:1: needs "prompt", "chosen" and "rejected": strings, or chat messages'),
          "not a model": ({"model": "./empty"}, "no config.json"),
          "broken model": ({"model": "./broken"}, "cannot be loaded as a model"),
          "damaged weights": ({"model": "./damaged"}, "damaged/model.safetensors: damaged or incomplete ("),
          "output is a file": ({"output_dir": "afile"}, "--output-dir afile: a file, not a folder"),
          "no such device": ({"device": "tpu"}, "--device tpu: not a device")}


def bad_inputs(folder, llama_folder):
    (folder / "latin1.jsonl").write_bytes('{"prompt": "caf\u00e9?", "answer": "1"}\n'.encode("latin-1"))
    (folder / "typed.jsonl").write_text(json.dumps({"prompt": "1+1?", "chosen": 2, "rejected": "3",
                                                    "answer": {"a": 2}}) + "\n")
    (folder / "empty").mkdir()
    (folder / "broken").mkdir()
    (folder / "broken" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    (folder / "afile").write_text("")
    (folder / "blank.jsonl").write_text(json.dumps({"prompt": "ok", "answer": "1"}) + "\n"
                                        + json.dumps({"prompt": " \t ", "answer": "2"}) + "\n")
    shutil.copytree(llama_folder, folder / "damaged")  # a copy that did not finish: the weights file cut short
    weights = folder / "damaged" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("script", ["grpo", "ppo", "trpo", "reward_model"])
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(script, kind, tmp_path, monkeypatch, llama_folder):
    table = RM_BAD if script == "reward_model" else BAD
    if kind not in table:
        pytest.skip(f"{script} has no such input")
    flags, message = table[kind]
    before = bad_inputs(tmp_path, llama_folder)
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(script)
    flags = {"model": llama_folder, **flags} if "model" not in flags else flags
    with pytest.raises(SystemExit) as error:
        module.main(module.Args(output_dir=str(tmp_path / "runs") if "output_dir" not in flags else flags["output_dir"],
                                **{k: v for k, v in flags.items() if k != "output_dir"}))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("script", ["grpo.py", "reward_model.py"])
def test_bad_input_from_the_command_line_has_no_traceback(script, tmp_path):
    result = run_script(script, "--lr", "-1", cwd=tmp_path)
    assert result.returncode != 0 and "--lr -1.0: must be in (0, inf)" in result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


def test_data_too_small_to_hold_out_says_so_and_eval_data_is_used(llama_folder, tmp_path, capsys):
    import grpo

    (tmp_path / "one.jsonl").write_text(json.dumps({"prompt": "Say a.", "answer": "a"}) + "\n")
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"prompt": f"Say {c}.", "answer": c}) + "\n" for c in "abc"))
    _, args = rl_args("grpo", llama_folder, tmp_path, steps=1, run_name="one", data=str(tmp_path / "one.jsonl"),
                      task="arithmetic")
    grpo.main(args)
    assert "1 training prompts, 0 held out (too few to hold any out: pass --eval-data)" in capsys.readouterr().out
    _, args = rl_args("grpo", llama_folder, tmp_path, steps=1, run_name="two", data=str(tmp_path / "one.jsonl"),
                      eval_data=str(tmp_path / "held.jsonl"), task="arithmetic")
    grpo.main(args)
    assert "1 training prompts, 3 held out" in capsys.readouterr().out
    assert len(scalars(tmp_path / "two", "eval/correct")) == 2
