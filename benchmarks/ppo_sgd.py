"""ppo.py with plain SGD in place of AdamW: does PPO still learn when each step goes along the gradient, as
TRPO's (damped) natural-gradient step mostly does, instead of Adam's per-parameter normalised step?

    python benchmarks/ppo_sgd.py --seed 2 --steps 16 --lr 0.01 --value-lr 0.01      # 4 epochs × 4 minibatches
    python benchmarks/ppo_sgd.py --seed 2 --steps 16 --lr 0.04 --value-lr 0.04 --ppo-epochs 1 --minibatch-size 16

Everything is passed to ppo.py's `Args`; --lr and --value-lr become SGD's learning rates (no momentum, no
weight decay). ppo.py clips each minibatch's gradient to --max-grad-norm (1): where the gradient's norm is
above it (4-9 in PPO's default runs here), every SGD step has length --lr, about what Adam's steps are at
lr 2e-6 over 134.5 M parameters (at most 2e-6 · √(134.5 M) ≈ 0.023), so the two differ in direction, not
length. The second command takes one step a batch, as trpo.py does.
"""

import sys
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import plumbing  # noqa: E402
import ppo  # noqa: E402
from plumbing.run import lr_scheduler  # noqa: E402


def sgd(params, args):
    """plumbing.adamw's signature and schedule, with torch.optim.SGD: the gradient times the learning rate."""
    optimizer = torch.optim.SGD(params, lr=args.lr)
    print(f"SGD at lr {args.lr} (the value head: {args.value_lr})", flush=True)
    return optimizer, lr_scheduler(optimizer, args.lr_schedule, args.warmup_steps, args.steps)


plumbing.adamw = sgd  # ppo.main calls plumbing.adamw
ppo.main(tyro.cli(ppo.Args, args=sys.argv[1:]))
