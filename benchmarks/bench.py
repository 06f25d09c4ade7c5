"""Run one of the scripts for a fixed budget and print what a step costs and what it changed.

    python benchmarks/bench.py grpo --steps 20 --prompts-per-step 4 --group-size 8
    python benchmarks/bench.py reward_model --num-pairs 1024
    torchrun --standalone --nproc-per-node 2 benchmarks/bench.py grpo --steps 4

The first word names the script (grpo, ppo, trpo, reward_model); everything after it is passed to
that script's own `Args`. Figures come from the run's TensorBoard events and from the process:
medians of the per-step timings, peak resident memory (CPU) or peak allocated memory (CUDA); under
torchrun rank 0 prints the figures and each other process its own peak memory.
"""

import importlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TIMINGS = ["time/generation_s", "time/cg_s", "time/line_search_s", "time/update_s", "time/step_s", "time/tokens_per_s",
           "time/update_tokens_per_s"]
BEFORE_AFTER = ["eval/reward", "eval/correct", "eval/accuracy", "reward/mean", "objective/scores"]


def main() -> None:
    name, argv = sys.argv[1], sys.argv[2:]
    script = importlib.import_module(name)
    args = tyro.cli(script.Args, args=argv)
    start = time.time()
    run_dir = script.main(args)
    wall = time.time() - start
    peak_gb = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 reports; the others their peak memory
        print(f"rank {os.environ['RANK']}: peak_memory_gb {peak_gb:.2f}", flush=True)
        return
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    figures = {"script": name, "args": " ".join(argv), "wall_s": round(wall, 1), "threads": torch.get_num_threads(),
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "peak_memory_gb": round(peak_gb, 2)}
    for tag in TIMINGS:
        if tag in tags:
            figures[tag + " (median)"] = round(statistics.median(e.value for e in events.Scalars(tag)), 3)
    for tag in BEFORE_AFTER:
        if tag in tags:
            values = [e.value for e in events.Scalars(tag)]
            window = 1 if tag.startswith("eval/") else min(5, len(values))  # training rewards: 5-step means
            figures[tag + " (before, after)"] = (round(sum(values[:window]) / window, 3),
                                                 round(sum(values[-window:]) / window, 3))
    for key, value in figures.items():
        print(f"{key:40s} {value}")
    (run_dir / "bench.json").write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
