"""Draws docs/grpo_step.png: the data flow of one GRPO step, with the tensors' shapes.

    pip install -r benchmarks/requirements.txt && python docs/grpo_step.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

BOXES = {  # name: (x, y, text); x, y is the box's centre
    "prompts": (1.3, 5.0, "P prompts\n(train_rows)"),
    "generate": (5.0, 5.0, "π_θ samples G completions each\ncommon.generate\ncompletion_ids, mask [B, T], B = P·G"),
    "rewards": (9.5, 5.0, "rewards r [B]\nrules, a reward model,\nor --reward-fn"),
    "advantages": (9.5, 2.6, "group z-scores A [B]\n(r − mean_group) / std_group\ngrpo.group_advantages"),
    "policy": (1.6, 2.6, "π_θ: log-probs [B, T]\ncommon.completion_logprobs\n(with graph)"),
    "reference": (1.6, 0.4, "π_ref (frozen start):\nref log-probs [B, T]\n(no graph)"),
    "loss": (6.0, 0.6, "loss per token [B, T]:\n−min(ρA, clip(ρ, 1−ε, 1+ε)A) + β·KL\nρ = π_θ/π_old (= 1 when μ = 1)\nmean per completion, then over B\ngrpo.grpo_loss → backward, AdamW"),
}
ARROWS = [("prompts", "generate"), ("generate", "rewards"), ("rewards", "advantages"), ("advantages", "loss"),
          ("generate", "policy"), ("generate", "reference"), ("policy", "loss"), ("reference", "loss")]


def edge(x, y, x_to, y_to, w, h, pad=0.12):
    """Where the line from the box centred at (x, y) towards (x_to, y_to) leaves the box."""
    dx, dy = x_to - x, y_to - y
    t = min((w / 2 + pad) / abs(dx) if dx else float("inf"), (h / 2 + pad) / abs(dy) if dy else float("inf"))
    return x + t * dx, y + t * dy


def main() -> None:
    fig, ax = plt.subplots(figsize=(11, 6.2))
    ax.set_xlim(0, 11.2)
    ax.set_ylim(-0.4, 5.8)
    ax.axis("off")
    size = {}
    for name, (x, y, text) in BOXES.items():
        w, h = {"loss": (3.8, 1.5), "generate": (3.4, 1.1), "prompts": (2.0, 1.1)}.get(name, (2.9, 1.1))
        size[name] = (w, h)
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05",
                                    facecolor="#e8f0fe" if name != "loss" else "#fde7e7", edgecolor="#333"))
        ax.text(x, y, text, ha="center", va="center", fontsize=9, family="monospace")
    for a, b in ARROWS:
        (xa, ya, _), (xb, yb, _) = BOXES[a], BOXES[b]
        ax.annotate("", xy=edge(xb, yb, xa, ya, *size[b]), xytext=edge(xa, ya, xb, yb, *size[a]),
                    arrowprops=dict(arrowstyle="->", color="#555", lw=1.4))
    ax.set_title("One GRPO step (grpo.py, phases 1-4)", fontsize=12)
    out = Path(__file__).with_name("grpo_step.png")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
