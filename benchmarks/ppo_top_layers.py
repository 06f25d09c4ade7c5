"""ppo.py with only the top N transformer blocks trained, the parameters trpo.py's `--trust-region-layers N` puts
under its trust region: does the subset of parameters, or TRPO's step, limit what TRPO learns?

    python benchmarks/ppo_top_layers.py 2 --seed 2 --steps 16 --lr 2e-5

The first argument is N; everything after it is passed to ppo.py's `Args`. The embeddings, the (tied) LM head
and the lower blocks are frozen right after loading; the value head trains as usual. One process only: under
torchrun the DDP wrapper is built before the freeze and would wait for gradients that never come.
"""

import sys
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import plumbing  # noqa: E402
import ppo  # noqa: E402
import trpo  # noqa: E402

top = int(sys.argv[1])
load_policy = plumbing.load_policy


def load_top_layers(args, run, **kwargs):
    model, ref_model, train_model, tokenizer = load_policy(args, run, **kwargs)
    model.requires_grad_(False)
    trpo.transformer_layers(model)[-top:].requires_grad_(True)
    print(f"training the top {top} blocks: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f} M "
          "parameters", flush=True)
    return model, ref_model, train_model, tokenizer


plumbing.load_policy = load_top_layers  # ppo.main calls plumbing.load_policy
ppo.main(tyro.cli(ppo.Args, args=sys.argv[2:]))
