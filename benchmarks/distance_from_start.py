"""How far training moved a policy's parameters from the model it started from, and how much of that is the
embeddings (tied to the LM head in SmolLM2): ‖θ − θ₀‖ over all parameters and over the embedding matrix.

    python benchmarks/distance_from_start.py FOLDER [FOLDER ...]     # checkpoints of runs from the embedded model
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from plumbing.models import EMBEDDED_MODEL, load_model  # noqa: E402

torch.set_num_threads(2)
start = dict(load_model(EMBEDDED_MODEL, torch.device("cpu"))[0].named_parameters())
print("| policy | ‖θ − θ₀‖ | of it, the embeddings | share of the squared distance in the embeddings |\n|---|---|---|---|")
for folder in sys.argv[1:]:
    moved = {name: (p.detach() - start[name].detach()).pow(2).sum().item()
             for name, p in load_model(folder, torch.device("cpu"))[0].named_parameters()}
    total, embeddings = sum(moved.values()), sum(v for name, v in moved.items() if "embed" in name)
    print(f"| {folder} | {total ** 0.5:.3f} | {embeddings ** 0.5:.3f} | {embeddings / total:.2f} |")
