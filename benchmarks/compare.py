"""GRPO, PPO and TRPO side by side: each on its defaults, the same number of sampled completions, three seeds, one plot.

    pip install -r benchmarks/requirements.txt
    python benchmarks/compare.py                      # 3 methods × 3 seeds × 256 completions: 1 h on a 2-core CPU
    python benchmarks/compare.py --completions 2048   # on a GPU

Each run is `python METHOD.py --seed S --steps N/c` as a user types it, c being the method's completions
per step on its defaults (GRPO: 4 prompts × G = 8; PPO and TRPO: 16 prompts, one completion each), in a
fresh process (its peak memory is its own), on the embedded SmolLM2-135M-Instruct and the built-in
`arithmetic` task; held-out accuracy (64 fixed prompts, greedy) before, halfway and after. A finished
run is kept and not run again (delete its folder under --runs to redo it). Writes to --out:
- evals.csv: method, seed, step, completions sampled, training seconds so far, held-out accuracy;
- steps.csv: per step, the training batch's figures (correct share, EOS share, seconds, the critic's
  explained variance for PPO and TRPO);
- summary.json: per method, each seed's accuracy before and after, seconds per step, peak memory, the
  models it holds; compare.png: held-out accuracy against completions sampled and against seconds.
"""

import csv
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
PER_STEP = {"grpo": 32, "ppo": 16, "trpo": 16}  # completions per step on each script's defaults
HELD = {"grpo": "policy, reference", "ppo": "policy with a value head (a linear layer on it), reference",
        "trpo": "policy with a value head (a linear layer on it), reference"}  # models in memory, on the defaults
TAGS = {"reward/correct": "correct", "completion/eos_fraction": "eos", "time/generation_s": "generation_s",
        "time/update_s": "update_s", "value/explained_variance": "explained_variance", "trpo/kl_after": "trpo_kl",
        "trpo/cg_relative_residual": "cg_relative_residual"}
COLORS = {"grpo": "tab:blue", "ppo": "tab:orange", "trpo": "tab:green"}


@dataclass
class Args:
    completions: int = 256
    """completions sampled per run (a multiple of 32)"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds, the same for every method"""
    methods: tuple[str, ...] = ("grpo", "ppo", "trpo")
    """which methods to run"""
    out: str = str(ROOT / "docs" / "compare")
    """where the CSVs, summary.json and compare.png go"""
    runs: str = str(ROOT / "benchmarks" / "out" / "compare")
    """where the runs' folders go"""


def run_one(method: str, seed: int, steps: int, folder: Path) -> dict:
    """Run `method.py` once in a fresh process; its TensorBoard scalars and peak memory, kept in folder/figures.json."""
    done = folder / "figures.json"
    if done.is_file():
        return json.loads(done.read_text())
    argv = ["--seed", str(seed), "--steps", str(steps), "--eval-interval", str(steps // 2), "--save-interval", "100000",
            "--output-dir", str(folder.parent), "--run-name", folder.name]
    code = (f"import sys, resource, tyro; sys.path.insert(0, {str(ROOT)!r}); import {method} as m; "
            f"m.main(tyro.cli(m.Args, args={argv!r})); "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    print(f"{method} seed {seed}: python {method}.py {' '.join(argv)}", flush=True)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{method} failed:\n{result.stderr[-3000:]}")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    figures = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
               if tag in TAGS or tag == "eval/accuracy"}
    figures["peak_gb"] = int(result.stdout.split("PEAK_RSS_KB")[-1].split()[0]) * 1024 / 1e9
    done.write_text(json.dumps(figures))
    return figures


def main(args: Args) -> None:
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    results = {(m, s): run_one(m, s, args.completions // PER_STEP[m], runs / f"{m}_{s}") for s in args.seeds
               for m in args.methods}  # seed by seed: an interrupted comparison keeps whole seeds

    # --- the source data: per evaluation and per step ---
    curves = {}  # (method, seed) -> [(completions, training seconds, accuracy)]
    with open(out / "evals.csv", "w", newline="") as f_evals, open(out / "steps.csv", "w", newline="") as f_steps:
        evals, steps = csv.writer(f_evals), csv.writer(f_steps)
        evals.writerow(["method", "seed", "step", "completions", "train_seconds", "heldout_accuracy"])
        steps.writerow(["method", "seed", "step", "completions", *TAGS.values()])
        for (m, s), r in results.items():
            per_step = {tag: dict(r.get(tag, [])) for tag in TAGS}
            seconds = {0: 0.0}
            for step in sorted(per_step["time/update_s"]):
                seconds[step] = seconds[step - 1] + per_step["time/generation_s"][step] + per_step["time/update_s"][step]
                steps.writerow([m, s, step, step * PER_STEP[m], *(round(per_step[t][step], 4) if step in per_step[t]
                                                                    else "" for t in TAGS)])
            curves[m, s] = [(step * PER_STEP[m], seconds[step], acc) for step, acc in r["eval/accuracy"]]
            for (n, sec, acc), (step, _) in zip(curves[m, s], r["eval/accuracy"]):
                evals.writerow([m, s, step, n, round(sec, 1), round(acc, 4)])

    summary = {}
    for m in args.methods:
        rs = [results[m, s] for s in args.seeds]
        step_s = [g + u for r in rs for (_, g), (_, u) in zip(r["time/generation_s"], r["time/update_s"])]
        before = [curves[m, s][0][2] for s in args.seeds]
        after = [curves[m, s][-1][2] for s in args.seeds]
        summary[m] = {"steps": args.completions // PER_STEP[m], "completions_per_step": PER_STEP[m],
                      "accuracy_before": before, "accuracy_after": after,
                      "gain_mean": round(statistics.mean(a - b for a, b in zip(after, before)), 4),
                      "seconds_per_step_median": round(statistics.median(step_s), 1),
                      "peak_memory_gb_max": round(max(r["peak_gb"] for r in rs), 2), "models_held": HELD[m]}
        if m in ("ppo", "trpo"):  # the critics
            summary[m]["explained_variance_second_half_mean"] = round(statistics.mean(
                v for r in rs for step, v in r["value/explained_variance"] if step > summary[m]["steps"] // 2), 3)
    (out / "summary.json").write_text(json.dumps({"completions": args.completions, "seeds": list(args.seeds),
                                                  "methods": summary}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))

    # --- the plot: held-out accuracy against completions sampled and against training seconds ---
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for m in args.methods:
        for i, x in enumerate((0, 1)):  # x: 0 completions, 1 seconds
            for s in args.seeds:
                axes[i].plot([p[x] for p in curves[m, s]], [p[2] for p in curves[m, s]], color=COLORS[m], alpha=0.3, lw=1)
            mean_x = [statistics.mean(p) for p in zip(*([q[x] for q in curves[m, s]] for s in args.seeds))]
            mean_y = [statistics.mean(p) for p in zip(*([q[2] for q in curves[m, s]] for s in args.seeds))]
            axes[i].plot(mean_x, mean_y, color=COLORS[m], marker="o", lw=2.5,
                         label=f"{m} ({summary[m]['seconds_per_step_median']} s/step)" if i else m)
    axes[0].set(xlabel="completions sampled", ylabel="held-out accuracy (64 prompts, greedy)")
    axes[1].set(xlabel="training seconds, 2-core CPU (evaluation not counted)")
    start = statistics.mean(curves[m, s][0][2] for m in args.methods for s in args.seeds)
    for ax in axes:
        ax.axhline(start + 0.06, color="grey", ls="--", lw=1, label="start + 0.06 (one seed's noise)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    fig.suptitle(f"SmolLM2-135M-Instruct on `arithmetic`, each script on its defaults: mean of seeds "
                 f"{', '.join(map(str, args.seeds))} (thick) and each seed (thin)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=100)
    print(f"wrote {out}/evals.csv, steps.csv, summary.json, compare.png")


if __name__ == "__main__":
    main(tyro.cli(Args))
