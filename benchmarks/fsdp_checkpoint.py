"""What an --fsdp checkpoint costs each process: seconds and the rise of its peak resident memory, per save.

    torchrun --nproc-per-node 2 benchmarks/fsdp_checkpoint.py -- --fsdp --steps 3 --save-interval 1 ...

Runs grpo.py's main with the flags after `--`, timing every `Run.checkpoint` call and reading the process's
peak resident memory (ru_maxrss) before and after it; each process prints one JSON line per checkpoint. It
touches only `plumbing.run.Run.checkpoint`, so the same file measures an older commit's checkpoint too
(benchmarks/fsdp_checkpoint.sh runs both). On the CPU with gloo; docs/benchmarks.md has the figures.
"""

import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("CHECKPOINT_CODE", str(ROOT)))  # the code measured (an older worktree, say)

import tyro  # noqa: E402

import grpo  # noqa: E402
import plumbing.run  # noqa: E402


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def timed(checkpoint):
    def wrapper(self, step, *args, **kwargs):
        before, start = peak_gb(), time.perf_counter()
        checkpoint(self, step, *args, **kwargs)
        seconds = time.perf_counter() - start
        if self.saved_step == step:  # a checkpoint was written (not only the stop check)
            print(json.dumps({"rank": self.rank, "step": step, "seconds": round(seconds, 2),
                              "peak_gb_before": round(before, 2), "peak_gb_after": round(peak_gb(), 2)}), flush=True)
    return wrapper


if __name__ == "__main__":
    argv = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else []
    plumbing.run.Run.checkpoint = timed(plumbing.run.Run.checkpoint)
    grpo.main(tyro.cli(grpo.Args, args=argv))
