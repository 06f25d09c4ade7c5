"""Two processes on the CPU (gloo) under torchrun, tiny models."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    ("grpo.py", ["--group-size", "2", "--minibatch-size", "2"]),
    ("ppo.py", ["--num-minibatches", "2"]),
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


def test_prompts_not_divisible_by_processes_is_a_clear_error(tmp_path):
    result = torchrun(str(ROOT / "grpo.py"), "--prompts-per-step", "3", cwd=tmp_path)
    assert result.returncode != 0
    assert "not divisible by the 2 processes" in result.stderr
    assert not (tmp_path / "runs").exists()
