"""GRPO, PPO and TRPO side by side on the same problem, then one plot.

    pip install -r benchmarks/requirements.txt
    python benchmarks/compare.py --budget quick      # ~30 min on a 2-core CPU
    python benchmarks/compare.py --budget full       # a GPU

Every method trains the embedded SmolLM2-135M-Instruct on the built-in `arithmetic` task with the
same seed, the same training and held-out prompts, and the same number of sampled completions per
step (GRPO: prompts × G; PPO and TRPO: one completion per prompt). Writes
benchmarks/out/<budget>/steps.csv (one row per method and step), summary.json (held-out accuracy
before/after, seconds per step, peak memory) and compare.png (reward and held-out accuracy
against completions sampled).
"""

import csv
import json
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# completions per step, steps, and per-method settings for each budget
BUDGETS = {
    "quick": {"completions": 16, "steps": 15, "eval_prompts": 32, "eval_interval": 5},
    "full": {"completions": 64, "steps": 200, "eval_prompts": 64, "eval_interval": 20},
}
REWARD_TAG = "reward/correct"  # the share of correct completions in the step's batch, for every method


@dataclass
class Args:
    budget: Literal["quick", "full"] = "quick"
    """quick: fits a 2-core CPU in about 30 minutes; full: for a GPU"""
    methods: tuple[str, ...] = ("grpo", "ppo", "trpo")
    """which methods to run"""
    seed: int = 1
    """the same seed for every method"""
    out: str = str(ROOT / "benchmarks" / "out")
    """output folder (a subfolder per budget)"""


def method_args(method: str, budget: dict, seed: int, out: Path) -> list[str]:
    n, common = budget["completions"], ["--steps", str(budget["steps"]), "--seed", str(seed),
                                        "--eval-prompts", str(budget["eval_prompts"]),
                                        "--eval-interval", str(budget["eval_interval"]), "--save-interval", "100000",
                                        "--output-dir", str(out / "runs"), "--run-name", method]
    if method == "grpo":
        return common + ["--prompts-per-step", str(n // 4), "--group-size", "4", "--micro-batch-size", "8"]
    if method == "ppo":
        return common + ["--prompts-per-step", str(n), "--minibatch-size", str(n // 4)]
    return common + ["--prompts-per-step", str(n), "--trust-region-layers", "2", "--fisher-fraction", "0.5"]


def run_one(method: str, argv: list[str], out: Path) -> dict:
    """Run one method in a fresh process (peak memory is per process) and read its figures back."""
    code = (f"import sys, json, resource, tyro; sys.path.insert(0, {str(ROOT)!r}); import {method} as m; "
            f"m.main(tyro.cli(m.Args, args={argv!r})); "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{method} failed:\n{result.stderr[-3000:]}")
    peak_kb = int(result.stdout.split("PEAK_RSS_KB")[-1].split()[0])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "runs" / method))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]} | {
        "peak_gb": peak_kb * 1024 / 1e9}


def main(args: Args) -> None:
    budget = BUDGETS[args.budget]
    out = Path(args.out) / args.budget
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for method in args.methods:
        print(f"running {method} ...", flush=True)
        shutil.rmtree(out / "runs" / method, ignore_errors=True)  # a re-run replaces the last one
        results[method] = run_one(method, method_args(method, budget, args.seed, out), out)

    # --- per-step CSV and a summary ---
    n = budget["completions"]
    with open(out / "steps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "step", "completions_sampled", "reward_correct", "kl", "generation_s", "update_s"])
        for method, r in results.items():
            kl_tag = {"grpo": "train/kl", "ppo": "objective/kl", "trpo": "trpo/kl_after"}[method]
            for (step, reward), (_, kl), (_, gen), (_, upd) in zip(r[REWARD_TAG], r[kl_tag],
                                                                     r["time/generation_s"], r["time/update_s"]):
                w.writerow([method, step, step * n, round(reward, 4), round(kl, 5), round(gen, 3), round(upd, 3)])
    summary = {}
    for method, r in results.items():
        accuracy = r["eval/correct"]
        summary[method] = {
            "heldout_accuracy_before": accuracy[0][1], "heldout_accuracy_after": accuracy[-1][1],
            "seconds_per_step": round(statistics.median(g + u for (_, g), (_, u) in
                                                        zip(r["time/generation_s"], r["time/update_s"])), 2),
            "generation_s": round(statistics.median(v for _, v in r["time/generation_s"]), 2),
            "update_s": round(statistics.median(v for _, v in r["time/update_s"]), 2),
            "peak_memory_gb": round(r["peak_gb"], 2),
        }
    (out / "summary.json").write_text(json.dumps({"budget": args.budget, **budget, "methods": summary}, indent=1))
    print(json.dumps(summary, indent=1))

    # --- the plot ---
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method, r in results.items():
        steps, rewards = zip(*r[REWARD_TAG])
        window = 3  # a 3-step running mean: single steps are noisy
        smooth = [statistics.mean(rewards[max(0, i - window + 1): i + 1]) for i in range(len(rewards))]
        left.plot([s * n for s in steps], smooth, label=method)
        eval_steps, accuracy = zip(*r["eval/correct"])
        right.plot([s * n for s in eval_steps], accuracy, marker="o", label=method)
    left.set(xlabel="completions sampled", ylabel="training reward: correct (3-step mean)", title="training reward")
    right.set(xlabel="completions sampled", ylabel="held-out accuracy (greedy)", title="held-out accuracy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"SmolLM2-135M-Instruct, arithmetic, {n} completions per step, seed {args.seed}")
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)
    print(f"wrote {out / 'steps.csv'}, {out / 'summary.json'}, {out / 'compare.png'}")


if __name__ == "__main__":
    main(tyro.cli(Args))
