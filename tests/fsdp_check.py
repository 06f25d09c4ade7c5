"""Run under `torchrun --nproc-per-node 2`: two optimizer steps with FSDP2 (plumbing.shard), each
process holding half of a fixed batch, give the parameters of two steps on the whole batch in one
process, for a tiny Llama (tied embeddings) and a tiny GPT-2, a policy and a value head, as the
scripts train them (GRPO's loss, a value loss, gradients accumulated over minibatches, clipping,
fused AdamW). Also: generation under plumbing.gathered equals generation without FSDP, and the
gathered checkpoint loads with transformers in one process. Exits non-zero on a mismatch."""

import copy
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import common  # noqa: E402
import grpo  # noqa: E402
import plumbing  # noqa: E402
from tiny import tiny_policy  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
B, STEPS, ROWS_PER_PASS = 8, 2, 2
failures = []


def check(what: str, ok: bool, detail: str = "") -> None:
    print(f"rank {rank}: {what}: {'ok' if ok else 'MISMATCH'} {detail}", flush=True)
    if not ok:
        failures.append(what)


def train(model, value_head, rows, bf16: bool = False):
    """STEPS optimizer steps on these rows of the batch, ROWS_PER_PASS rows per backward (bf16: under autocast)."""
    params = list(model.parameters()) + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)
    num_tokens = plumbing.all_mean(mask[rows].sum().float()) if plumbing.is_sharded(model) else mask.sum().float()
    for _ in range(STEPS):
        optimizer.zero_grad()
        for rows_mb in rows.split(ROWS_PER_PASS):
            mb = common.rollout_slice(rollout, rows_mb)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits, hidden = common.forward_completion(model, mb, hidden=True)
            hidden = hidden.float()
            logprobs = common.unpack(common.token_logprobs(logits, mb.completion_ids[mb.completion_mask.bool()]),
                                     mb.completion_mask)
            kl = grpo.kl_penalty(logprobs, ref_logprobs[rows_mb], logprobs.detach())
            loss, _ = grpo.grpo_loss(logprobs, logprobs.detach(), advantages[rows_mb], mb.completion_mask, kl=kl,
                                     beta=0.04, epsilon=0.2, epsilon_high=0.2, loss_type="dapo", max_new_tokens=6,
                                     num_rows=B, num_tokens=num_tokens)
            values = value_head(hidden).squeeze(-1)  # [N]
            loss = loss + ((values - returns[rows_mb][mb.completion_mask.bool()]) ** 2).sum() / num_tokens
            loss.backward()
        plumbing.clip_grad_norm(params, 0.5)  # active: the gradients are larger
        optimizer.step()


for arch in ["llama", "gpt2"]:
    torch.manual_seed(0)
    model, tokenizer = tiny_policy(arch)
    value_head = torch.nn.Linear(model.config.get_text_config().hidden_size, 1)
    rollout = common.generate(model, tokenizer, ["a", "a", "bb", "bb", "ccc", "ccc", "dddd", "dddd"], max_new_tokens=6)
    for t in (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask):
        dist.broadcast(t, 0)  # the same fixed batch everywhere
    mask = rollout.completion_mask
    advantages, returns = torch.randn(B), torch.randn(mask.shape)  # the same on every process: one seed
    with torch.no_grad():
        ref_logprobs = common.completion_logprobs(model, rollout, 1.0) + 0.1 * torch.randn(mask.shape)
    start, start_head = copy.deepcopy(model), copy.deepcopy(value_head)

    # One process, the whole batch.
    whole, whole_head = copy.deepcopy(model), copy.deepcopy(value_head)
    train(whole, whole_head, torch.arange(B))
    # FSDP: each process its half of the rows.
    plumbing.shard(model)
    plumbing.shard(value_head)
    train(model, value_head, torch.arange(B)[rank * B // world : (rank + 1) * B // world])

    state, head_state = plumbing.full_state_dict(model), plumbing.full_state_dict(value_head)  # collective
    if rank == 0:
        expected = whole.state_dict()
        diff = max((state[k] - expected[k]).abs().max().item() for k in state)
        moved = max((expected[k] - v).abs().max().item() for k, v in start.state_dict().items())
        head_diff = max((head_state[k] - v).abs().max().item() for k, v in whole_head.state_dict().items())
        check(f"{arch}: parameters after {STEPS} steps, FSDP vs one process", diff < 1e-5 and head_diff < 1e-5 and moved > 1e-3,
              f"(max |difference| {diff:.1e}, value head {head_diff:.1e}; the steps moved them by up to {moved:.1e})")

    with torch.no_grad(), plumbing.gathered(model):
        sharded_ids = common.generate(model, tokenizer, ["a", "bb", "ccc"], max_new_tokens=8, greedy=True).completion_ids
    plain_ids = common.generate(whole, tokenizer, ["a", "bb", "ccc"], max_new_tokens=8, greedy=True).completion_ids
    check(f"{arch}: greedy generation under plumbing.gathered", torch.equal(sharded_ids, plain_ids))
    check(f"{arch}: sharded again after gathered", all(type(p).__name__ == "DTensor" for p in model.parameters()))

    if rank == 0:
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as folder:
            plumbing.save_checkpoint(model, tokenizer, Path(folder) / "checkpoint", state_dict=state)
            loaded = AutoModelForCausalLM.from_pretrained(Path(folder) / "checkpoint", dtype=torch.float32)
        with torch.no_grad():
            same = torch.allclose(common.padded_logprobs(loaded, rollout, 1.0),
                                  common.padded_logprobs(whole, rollout, 1.0), atol=1e-5)
        check(f"{arch}: the gathered checkpoint loads in one process", same)
    dist.barrier()

    if arch == "llama":  # bf16 mixed precision (FSDP's policy): near the fp32 result, master weights fp32
        plumbing.shard(start, bf16=True)
        plumbing.shard(start_head)
        initial = plumbing.full_state_dict(start)
        train(start, start_head, torch.arange(B)[rank * B // world : (rank + 1) * B // world], bf16=True)
        state = plumbing.full_state_dict(start)
        if rank == 0:
            expected = whole.state_dict()
            error = sum(((state[k] - expected[k]) ** 2).sum() for k in state).sqrt().item()
            moved = sum(((expected[k] - initial[k]) ** 2).sum() for k in state).sqrt().item()
            check("llama: bf16 parameters and fp32 reduction, FSDP vs fp32 one process", error < 0.1 * moved
                  and all(p.dtype == torch.float32 for p in start.parameters()),
                  f"(|difference| {error:.1e}, {error / moved:.1%} of the steps' {moved:.1e})")

dist.destroy_process_group()
sys.exit(1 if failures else 0)
