"""What a policy answers to the 64 held-out arithmetic prompts, greedy: right, wrong, or cut off (no EOS in 32 tokens).

    python benchmarks/greedy_outcomes.py [FOLDER ...]     # checkpoints; none: the embedded model as it ships

A cut-off completion ends in the middle of its text, so its last number is rarely the answer: a policy
that learns only to stop turns cut-off completions into stopped ones; one that learns to add turns
wrong answers into right ones.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import tasks  # noqa: E402
from plumbing.models import EMBEDDED_MODEL, load_model  # noqa: E402

torch.set_num_threads(2)
_, held_out = tasks.task_prompts("arithmetic", seed=1)
print("| policy | right | wrong, stopped | wrong, cut off | mean length (tokens) |\n|---|---|---|---|---|")
for name in sys.argv[1:] or [EMBEDDED_MODEL]:
    model, tokenizer = load_model(name, torch.device("cpu"))
    rollout = common.generate(model, tokenizer, [r["prompt"] for r in held_out], max_new_tokens=32, greedy=True)
    right = [tasks.correct_reward(c, r["answer"]) == 1 for c, r in zip(rollout.texts, held_out)]
    cut = rollout.truncated.tolist()
    print(f"| {name} | {sum(right)} | {sum(not r and not c for r, c in zip(right, cut))} "
          f"| {sum(not r and c for r, c in zip(right, cut))} "
          f"| {rollout.completion_mask.sum(1).float().mean():.1f} |")
