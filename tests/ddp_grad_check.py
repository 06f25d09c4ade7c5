"""Run under `torchrun --nproc-per-node 2`: the gradient DDP averages over processes, each holding
half of a fixed batch, equals the gradient of the whole batch in one process (GRPO's loss, each
aggregation; the processes score with shared prompts, the single process without). Exits non-zero
on a mismatch."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import common  # noqa: E402
import plumbing  # noqa: E402
import grpo  # noqa: E402
from tiny import tiny_policy  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model, tokenizer = tiny_policy("llama")
rollout = common.generate(model, tokenizer, ["a", "a", "bb", "bb", "ccc", "ccc", "dddd", "dddd"], max_new_tokens=6)
for t in (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask):
    dist.broadcast(t, 0)  # the same fixed batch everywhere
B, mask = 8, rollout.completion_mask
advantages = torch.randn(B)
with torch.no_grad():
    ref_logprobs = common.completion_logprobs(model, rollout, 1.0) + 0.1 * torch.randn(mask.shape)
ddp_model = torch.nn.parallel.DistributedDataParallel(model)


def gradient(m, rows, num_tokens, loss_type, group_size):
    mb = common.rollout_slice(rollout, rows)
    logprobs = common.completion_logprobs(m, mb, 1.0, group_size=group_size)
    kl = grpo.kl_penalty(logprobs, ref_logprobs[rows], logprobs.detach())
    loss, _ = grpo.grpo_loss(logprobs, logprobs.detach(), advantages[rows], mb.completion_mask, kl=kl, beta=0.04, epsilon=0.2, epsilon_high=0.2, loss_type=loss_type, max_new_tokens=6,
                             num_rows=len(rows), num_tokens=num_tokens)
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


worst = 0.0
for loss_type in ["grpo", "dr_grpo", "dapo"]:
    whole = gradient(model, torch.arange(B), mask.sum(), loss_type, group_size=1)  # one process, no DDP
    rows = torch.arange(B)[rank * B // world : (rank + 1) * B // world]
    num_tokens = plumbing.all_mean(mask[rows].sum().float())  # the loop's normaliser: all tokens / world
    averaged = gradient(ddp_model, rows, num_tokens, loss_type, group_size=2)
    worst = max(worst, (averaged - whole).abs().max().item())
print(f"rank {rank}: max |averaged − whole| = {worst:.2e}")
# DDP holds its last all-reduce work: free it now, not at interpreter shutdown, where gloo's threads
# can abort the process ("terminate called without an active exception", seen once in CI).
del ddp_model
dist.destroy_process_group()
sys.exit(0 if worst < 1e-6 else 1)
