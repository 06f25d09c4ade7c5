"""Two processes on the CPU (gloo) under torchrun, tiny models."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_grpo import scalars

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*argv, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *argv]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_ddp_averaged_gradient_equals_the_whole_batch_gradient(tmp_path):
    result = torchrun(str(ROOT / "tests" / "ddp_grad_check.py"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("max |averaged − whole|") == 2


@pytest.mark.parametrize("script, extra", [
    ("grpo.py", ["--group-size", "2", "--micro-batch-size", "2"]),
    ("ppo.py", ["--minibatch-size", "1"]),
    ("trpo.py", []),
])
def test_script_runs_under_torchrun_with_replicas_in_sync(script, extra, llama_folder, tmp_path):
    result = torchrun(str(ROOT / script), "--model", llama_folder, "--task", "letter", "--steps", "2",
                      "--prompts-per-step", "4", "--eval-prompts", "4", "--max-new-tokens", "8", "--run-name", "ddp",
                      *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["ddp"]  # one run folder, written by rank 0
    assert len(list((tmp_path / "runs" / "ddp").glob("events.out.tfevents.*"))) == 1
    assert scalars(tmp_path / "runs" / "ddp", "dist/replica_spread") == [0.0, 0.0]  # identical after every step
    assert (tmp_path / "runs" / "ddp" / "checkpoint" / "config.json").is_file()


def test_fsdp_training_equals_one_process_on_the_whole_batch(tmp_path):
    result = torchrun(str(ROOT / "tests" / "fsdp_check.py"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": ok") == 13 and "MISMATCH" not in result.stdout  # 2 models × (2 + 2 × 2), and bf16


@pytest.mark.parametrize("script, extra", [
    ("grpo.py", ["--group-size", "2", "--micro-batch-size", "2"]),
    ("ppo.py", ["--minibatch-size", "1"]),
])
def test_fsdp_run_equals_the_ddp_run_loads_in_one_process_and_resumes(script, extra, llama_folder, tmp_path):
    flags = [str(ROOT / script), "--model", llama_folder, "--task", "letter", "--prompts-per-step", "4", "--eval-prompts",
             "4", "--max-new-tokens", "8", "--lr", "1e-3", *extra]
    fsdp = ["--fsdp", "--gradient-checkpointing"]  # checkpointing changes no number: the runs stay comparable
    for name, more in [("ddp", ["--steps", "2"]), ("fsdp", ["--steps", "2", *fsdp]), ("resumed", ["--steps", "1", *fsdp])]:
        result = torchrun(*flags, *more, "--run-name", name, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    result = torchrun(str(ROOT / script), "--resume", "runs/resumed", "--steps", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = tmp_path / "runs"
    ddp, sharded, resumed = (load_file(runs / name / "checkpoint" / "model.safetensors") for name in ("ddp", "fsdp", "resumed"))
    start = load_file(Path(llama_folder) / "model.safetensors")
    assert sorted(sharded) == sorted(ddp)  # the tied LM head written once, as save_pretrained does
    assert max((sharded[k] - ddp[k]).abs().max().item() for k in ddp) < 1e-5  # fp32 summation order
    assert max((ddp[k] - start[k]).abs().max().item() for k in ddp) > 1e-4  # ... of steps that moved the weights
    assert all(torch.equal(resumed[k], sharded[k]) for k in sharded)  # resumed from step 1: bit for bit
    if script == "ppo.py":  # the value head, sharded on its own
        heads = [torch.load(runs / name / "checkpoint" / "value_head.pt") for name in ("ddp", "fsdp")]
        assert all((heads[0][k] - heads[1][k]).abs().max() < 1e-5 for k in heads[0]) and heads[0]["weight"].abs().max() > 1e-4
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs / "fsdp" / "checkpoint")  # one process, no FSDP
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.architectures == ["LlamaForCausalLM"]
    assert scalars(runs / "fsdp", "eval/reward") == scalars(runs / "ddp", "eval/reward")  # all processes evaluate under FSDP
    # The sharded checkpoint (each process's shards, DCP) read back whole into one process: the weights are the
    # gathered export's, the optimizer state is there; then --resume in one process goes on from it.
    from plumbing.checkpoints import SHARDS, load_sharded
    from plumbing.run import trained_modules

    assert (runs / "fsdp" / "checkpoint" / SHARDS).is_dir()
    fresh = AutoModelForCausalLM.from_pretrained(llama_folder)
    modules = {"value_head": torch.nn.Linear(fresh.config.hidden_size, 1)} if script == "ppo.py" else {}
    optimizer = torch.optim.AdamW([*fresh.parameters(), *(p for m in modules.values() for p in m.parameters())])
    load_sharded(runs / "fsdp" / "checkpoint", trained_modules(fresh, modules), optimizer)
    assert all(torch.equal(fresh.state_dict()[k], sharded[k]) for k in sharded)
    steps = 2 if script == "grpo.py" else 2 * 4 * 2  # PPO: 4 epochs of 2 minibatches (of 1 row on each process)
    assert all(s["step"].item() == steps and s["exp_avg"].abs().max() > 0 for s in optimizer.state.values())
    result = subprocess.run([sys.executable, str(ROOT / script), "--resume", "runs/fsdp", "--steps", "3"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "the run had 2 processes, this one 1: sampling is seeded afresh" in result.stdout


def test_prompts_not_divisible_by_processes_is_a_clear_error(tmp_path):
    result = torchrun(str(ROOT / "grpo.py"), "--prompts-per-step", "3", "--fsdp", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.count("not divisible by the 2 processes") == 1  # rank 0 says it; rank 1 exits quietly
    assert not (tmp_path / "runs").exists()


RANK_REWARD_PY = """
import os


def by_rank(prompts, completions, **kwargs):
    rank = os.environ["RANK"]
    with open(f"rounds_{rank}", "a") as f:
        f.write("x")
    # rank 0: rewards that vary within every group (its batch is full after one round); rank 1: all equal (never full)
    return [float(i % 2) if rank == "0" else 0.0 for i in range(len(completions))]
"""


def test_fsdp_dynamic_sampling_runs_the_same_rounds_on_every_process(llama_folder, tmp_path):
    """Each round gathers the sharded weights (a collective): were rank 0 to stop after its first round
    while rank 1 went on, their all-gathers would pair up wrongly and hang. Both run the same rounds."""
    (tmp_path / "rf.py").write_text(RANK_REWARD_PY)
    result = torchrun(str(ROOT / "grpo.py"), "--model", llama_folder, "--task", "letter", "--fsdp", "--steps", "1",
                      "--prompts-per-step", "4", "--group-size", "2", "--micro-batch-size", "2", "--max-new-tokens", "4",
                      "--eval-prompts", "0", "--reward-fn", "rf.py:by_rank", "--rule-weight", "0", "--dynamic-sampling",
                      "--dynamic-sampling-rounds", "3", "--collective-timeout", "2", "--run-name", "ds", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "rounds_0").read_text() == (tmp_path / "rounds_1").read_text() == "xxx"
    assert scalars(tmp_path / "runs" / "ds", "sampling/groups_drawn") == [6.0]  # 3 rounds of 2 groups, on each


@pytest.mark.parametrize("script, flags, world, message", [
    ("grpo", {"fsdp": True}, "1", "--fsdp shards the model over several processes: run under torchrun"),
    ("ppo", {"fsdp": True, "lora_rank": 4}, "2", "--fsdp with --lora-rank is not supported"),
    ("trpo", {"fsdp": True}, "2", "--fsdp: not supported by trpo.py"),
])
def test_fsdp_where_it_cannot_run_is_refused_before_anything_loads(script, flags, world, message, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", world)
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as error:
        module.main(module.Args(model=str(tmp_path / "never-read"), output_dir=str(tmp_path / "runs"), **flags))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_torchrun_nodes_on_localhost_train_as_one_run(fsdp, llama_folder, tmp_path):
    """Several machines, as the README shows them: one torchrun per node, a shared rendezvous endpoint,
    --nnodes 2 and each its --node-rank; here two one-process "nodes" on this machine."""
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    flags = [str(ROOT / "grpo.py"), "--model", llama_folder, "--task", "letter", "--steps", "2", "--prompts-per-step", "2",
             "--group-size", "2", "--micro-batch-size", "2", "--eval-prompts", "2", "--max-new-tokens", "6",
             "--run-name", "nodes", *(["--fsdp"] if fsdp else [])]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                               "--nproc-per-node", "1", "--rdzv-backend", "static", "--rdzv-endpoint", f"127.0.0.1:{port}",
                               *flags], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for rank in (0, 1)]  # one folder: the file system a cluster's nodes share (--fsdp's shards need it)
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    run = tmp_path / "runs" / "nodes"
    assert (run / "checkpoint" / "config.json").is_file() and len(scalars(run, "reward/mean")) == 2
    if fsdp:  # each node's process wrote its own shards
        assert len(list((run / "checkpoint" / "shards").glob("*.distcp"))) == 2
    else:
        assert scalars(run, "dist/replica_spread") == [0.0, 0.0]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_sigterm_to_torchrun_stops_both_processes_at_one_step_with_a_checkpoint(fsdp, llama_folder, tmp_path):
    """A scheduler ends a job with SIGTERM to torchrun, which passes it on to each process (at slightly different
    times): both finish the same step, the checkpoint of that step is written (under --fsdp each process's shards,
    nothing gathered: no model.safetensors), the resume command printed; the resumed run goes on from it."""
    import signal
    import time

    (tmp_path / "rf.py").write_text(
        "import os, pathlib\ncalls = []\n"
        "def mark_step_3(completions, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3 and os.environ['RANK'] == '0':\n"
        "        pathlib.Path('step3').write_text('')\n"
        "    return [float(len(c) % 3) for c in completions]\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "grpo.py"), "--model", llama_folder, "--task", "letter", "--steps", "50", "--prompts-per-step",
               "2", "--group-size", "2", "--micro-batch-size", "2", "--eval-prompts", "0", "--max-new-tokens", "6",
               "--reward-fn", "rf.py:mark_step_3", "--save-interval", "1000", "--run-name", "term",
               *(["--fsdp"] if fsdp else [])]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (tmp_path / "step3").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0, err[-2000:]
    state = torch.load(tmp_path / "runs" / "term" / "checkpoint" / "training_state.pt", weights_only=True)
    assert 3 <= state["step"] < 50 and len(state["rng"]) == 2, err[-2000:]
    assert f"the checkpoint of step {state['step']} is in" in out and "Resume with: python grpo.py --resume" in out
    assert "SIGTERM: finishing this step" in err
    checkpoint = tmp_path / "runs" / "term" / "checkpoint"
    assert (checkpoint / "model.safetensors").is_file() != fsdp and (checkpoint / "shards").is_dir() == fsdp
    result = torchrun(str(ROOT / "grpo.py"), "--resume", "runs/term", "--steps", str(state["step"] + 1), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming runs/term after step {state['step']}: 1 step(s) left" in result.stdout
