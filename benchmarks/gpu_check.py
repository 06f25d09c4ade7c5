"""The GPU check: each script for a few steps on one CUDA GPU in bf16, with what can be checked, and
the figures a user asks for. Nothing is downloaded: random-weight models of real sizes are built here.

    python benchmarks/gpu_check.py [--out DIR]      (benchmarks/gpu.sh runs it)

Models: `llama135m`, SmolLM2-135M's shape (30 layers, 576 wide, 49152-token vocabulary, tied
embeddings, a chat template), and `gpt2`, GPT2Config() (124 M). Checks (a failed one stops the run):
finite losses (the scripts stop on a NaN gradient), GRPO's ratio 1 and KL 0 at the first step, each
checkpoint loads and generates, and which SDPA kernels the packed and the padded passes ran. Figures:
generated and update tokens per second and peak GPU memory per script, and the packed scoring pass
against the padded one at GPU sizes (time and peak memory of forward + backward). Paths: LoRA with
gradient checkpointing, --resume against an uninterrupted run, the --fsdp sharding path against DDP's
autocast (one NCCL rank), and the cuDNN attention case the packed pass's padding avoids.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import common  # noqa: E402
import plumbing  # noqa: E402
from tiny import CHAT_TEMPLATE, byte_tokenizer  # noqa: E402


def build_models(folder: Path) -> dict[str, str]:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folders = {}
    tok = byte_tokenizer(chat=True, vocab_size=49152)
    tok.chat_template = CHAT_TEMPLATE
    eos = tok.eos_token_id
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, eos_token_id=eos, pad_token_id=eos, bos_token_id=eos)
    folders["llama135m"] = save(LlamaForCausalLM(config), tok, folder / "llama135m")
    tok = byte_tokenizer(chat=False, vocab_size=50257)
    config = GPT2Config(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    folders["gpt2"] = save(GPT2LMHeadModel(config), tok, folder / "gpt2")
    return folders


def save(model, tokenizer, folder: Path) -> str:
    with torch.no_grad():  # sharper logits than a fresh init: completions of varied lengths, as a trained model's
        model.get_output_embeddings().weight.mul_(20)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


DEVICE = torch.device("cuda")
SMOKE = False  # --smoke: tiny sizes on any device, to try this script itself


def cuda(f, default=0.0):
    return f() if DEVICE.type == "cuda" else default


def run(script: str, out: Path, name: str, **kwargs) -> dict:
    """script.main(Args(**kwargs)) in this process -> figures; the checkpoint is loaded and generates."""
    import importlib

    from transformers import AutoModelForSequenceClassification

    module = importlib.import_module(script)
    args = module.Args(output_dir=str(out / "runs"), run_name=name, device=str(DEVICE), dtype="auto", **kwargs)
    cuda(torch.cuda.reset_peak_memory_stats)
    start = time.time()
    run_dir = module.main(args)
    wall = time.time() - start
    peak = cuda(torch.cuda.max_memory_allocated) / 1e9
    s = scalars(run_dir)
    median = lambda tag: round(statistics.median(s[tag]), 3) if tag in s else None  # noqa: E731
    figures = {"run": name, "wall_s": round(wall, 1), "peak_gb": round(peak, 2),
               "generation_s": median("time/generation_s"), "update_s": median("time/update_s") or median("time/step_s"),
               "gen_tokens_per_s": median("time/tokens_per_s")}
    for tag in ("sampler/abs_diff_mean", "sampler/abs_diff_max", "sampler/kl_k3", "sampler/ratio_outside_0.5_2"):
        figures[tag] = median(tag)  # the decoder's log-probs against the trainer's (bf16 on a GPU)
    for tag in ("train/loss", "policy/loss", "value/loss", "train/kl", "train/ratio", "trpo/kl_after", "trpo/accepted"):
        if tag in s:
            assert all(v == v and abs(v) < float("inf") for v in s[tag]), f"{name}: {tag} not finite: {s[tag]}"
            figures[tag] = [round(v, 6) for v in s[tag]]
    ckpt = run_dir / ("checkpoint-merged" if kwargs.get("lora_merge") else "checkpoint")
    if script == "reward_model":
        AutoModelForSequenceClassification.from_pretrained(ckpt)
    else:
        model, tokenizer = plumbing.load_model(str(ckpt), DEVICE)
        with common.autocast(model.device, "auto"):
            texts = common.generate(model, tokenizer, ["What is 2 + 2?"], 8).texts
        figures["checkpoint_generates"] = texts[0][:40]
        del model
    cuda(torch.cuda.empty_cache)
    print(json.dumps(figures), flush=True)
    return figures


def attention_kernels(fn) -> list[str]:
    """The SDPA kernels that ran inside fn(), by the profiler's op names."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + cuda(lambda: [ProfilerActivity.CUDA], [])) as prof:
        fn()
        cuda(torch.cuda.synchronize)
    return sorted({e.key for e in prof.key_averages() if "attention" in e.key.lower() and e.key.startswith("aten::_")})


def padded_forward_completion(model, rollout):
    """The padded layout with the LM head on the real completion tokens only: [B, P + T] through
    the model, transformers' own mask from the 2-D attention mask."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    T = rollout.completion_ids.shape[1]
    states = out.last_hidden_state[:, -T - 1 : -1][rollout.completion_mask.bool()]  # [N, H]
    return (model.lm_head.weight @ states.T).T


def random_rollout(n_rows: int, group: int, prompt_len: int, completion_len: int) -> common.Rollout:
    """Random token ids, groups sharing a prompt, completions of random lengths: a scoring pass's input."""
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(300, 40000, (n_rows // group, prompt_len), generator=g).repeat_interleave(group, 0)
    completion_ids = torch.randint(300, 40000, (n_rows, completion_len), generator=g)
    lengths = torch.randint(completion_len // 4, completion_len + 1, (n_rows,), generator=g)
    mask = (torch.arange(completion_len)[None] < lengths[:, None]).long()
    no = torch.zeros(n_rows, dtype=torch.bool, device=DEVICE)
    return common.Rollout(prompt_ids.to(DEVICE), torch.ones_like(prompt_ids).to(DEVICE), completion_ids.to(DEVICE),
                          mask.to(DEVICE), no, [""] * n_rows, no, torch.zeros(mask.shape, device=DEVICE))


def scoring_passes(folder: str) -> list[dict]:
    """Packed (what the scripts run) against padded, forward + backward of the token log-probs, bf16 autocast."""
    model, tokenizer = plumbing.load_model(folder, DEVICE)
    rows = []
    sizes = [(8, 8, 64, 256), (8, 8, 64, 1280), (16, 4, 64, 1280), (32, 8, 64, 512)]
    for n_rows, group, prompt_len, completion_len in [(4, 2, 8, 256)] if SMOKE else sizes:
        rollout = random_rollout(n_rows, group, prompt_len, completion_len)
        mask = rollout.completion_mask
        ids = rollout.completion_ids[rollout.completion_mask.bool()]
        for layout, forward in [("packed", lambda: common.forward_completion(model, rollout, group)),
                                ("padded", lambda: padded_forward_completion(model, rollout))]:
            def step():
                with common.autocast(model.device, "auto"):
                    logprobs = common.token_logprobs(forward(), ids)
                logprobs.sum().backward()
                return logprobs.detach()

            step()  # warm-up
            model.zero_grad(set_to_none=True)
            cuda(torch.cuda.synchronize)
            cuda(torch.cuda.reset_peak_memory_stats)
            base = cuda(torch.cuda.memory_allocated)
            t = time.time()
            for _ in range(3):
                logprobs = step()
                model.zero_grad(set_to_none=True)
            cuda(torch.cuda.synchronize)
            row = {"rows": n_rows, "group": group, "prompt": prompt_len, "completion": completion_len,
                   "real_tokens": int(mask.sum()), "layout": layout, "fwd_bwd_ms": round((time.time() - t) / 3 * 1000, 1),
                   "peak_extra_gb": round((cuda(torch.cuda.max_memory_allocated) - base) / 1e9, 2),
                   "sum_logprobs": round(logprobs.sum().item(), 1)}
            if completion_len == 256:
                row["kernels"] = attention_kernels(step)
            rows.append(row)
            print(json.dumps(row), flush=True)
    del model
    cuda(torch.cuda.empty_cache)
    return rows


def resume_check(out: Path, llama: str, rl: dict, steps: int) -> dict:
    """2 steps, then --resume to 4, against 4 in one go: equal within the noise on a GPU (not to the bit: the
    attention backward kernels are not deterministic). The noise is measured: a second uninterrupted run. Passes
    when the resumed run is as close to the first as the second is (weights: within 2× that distance or 1 % of
    how far training moved them; rewards likewise, or within 1e-3)."""
    from safetensors.torch import load_file

    import grpo

    flags = {**rl, "model": llama, "prompts_per_step": 8, "group_size": 4, "micro_batch_size": 16, "lr": 1e-5}
    whole = run("grpo", out, "resume_whole", steps=2 * steps, **{**flags, "save_interval": steps})
    run("grpo", out, "resume_again", steps=2 * steps, **{**flags, "save_interval": steps})  # the same run, for the noise
    run("grpo", out, "resume_halves", steps=steps, **flags)
    grpo.main(grpo.Args(resume=str(out / "runs" / "resume_halves"), steps=2 * steps))
    names = ("resume_whole", "resume_again", "resume_halves")
    a, again, b = (load_file(out / "runs" / name / "checkpoint" / "model.safetensors") for name in names)
    start = load_file(Path(llama) / "model.safetensors")
    differ = max((a[k] - b[k]).abs().max().item() for k in a)
    noise = max((a[k] - again[k]).abs().max().item() for k in a)
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    rewards = [scalars(out / "runs" / name)["reward/mean"] for name in names]
    gap, reward_noise = (max(abs(x - y) for x, y in zip(rewards[0], other)) for other in (rewards[2], rewards[1]))
    result = {"part": "resume", "max_weight_difference": differ, "max_weight_noise": noise, "max_weight_change": moved,
              "max_reward_gap": gap, "max_reward_noise": reward_noise, "steps": [len(r) for r in rewards],
              "whole_wall_s": whole["wall_s"],
              "pass": differ <= max(2 * noise, 0.01 * moved) and gap <= max(2 * reward_noise, 1e-3)
              and len(rewards[2]) == 2 * steps}
    print(json.dumps(result), flush=True)
    return result


def fsdp_check(llama: str) -> dict:
    """The --fsdp path in one process over a one-rank NCCL group (one GPU cannot hold two NCCL ranks):
    plumbing.shard with the bf16 policy against the DDP path's bf16 autocast on the same batch. They are not
    equal: under FSDP's policy the embeddings, norms and residual stream compute in bf16 too. Passes when
    the mean |Δ log p| is under 1 % of the mean |log p| and the gradients differ by under 10 % (relative
    norm); the CPU's bf16 (--smoke) gave 0.2 % and 1.6 % on random tokens."""
    import copy
    import os

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    backend = "nccl" if DEVICE.type == "cuda" else "gloo"
    device_id = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None  # needs an index
    torch.distributed.init_process_group(backend, rank=0, world_size=1, device_id=device_id)
    model, _ = plumbing.load_model(llama, DEVICE)
    sharded = plumbing.shard(copy.deepcopy(model), bf16=True)
    rollout = random_rollout(8, 2, 16, 16 if SMOKE else 128)  # not sampled: the sharpened model's samples have p ≈ 1
    results = []
    for m, bf16_autocast in ((model, True), (sharded, False)):
        with common.autocast(model.device, "bf16" if bf16_autocast else "fp32"):
            logprobs = common.completion_logprobs(m, rollout, 1.0, group_size=2)
        logprobs.sum().backward()
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in m.parameters()]
        results.append((logprobs.detach().float(), torch.cat([g.float().reshape(-1) for g in grads])))
    (lp_a, g_a), (lp_b, g_b) = results
    mask = rollout.completion_mask.bool()
    state = plumbing.full_state_dict(sharded)  # the checkpoint's gather
    result = {"part": "fsdp", "backend": backend, "mean_abs_logprob": lp_a[mask].abs().mean().item(),
              "mean_abs_logprob_difference": (lp_a - lp_b)[mask].abs().mean().item(),
              "relative_gradient_difference": ((g_a - g_b).norm() / g_a.norm()).item(), "gathered_tensors": len(state)}
    relative = result["mean_abs_logprob_difference"] / result["mean_abs_logprob"]
    result["pass"] = relative < 0.01 and result["relative_gradient_difference"] < 0.1
    # --scale-rewards batch reduces on the device: NCCL refuses a CPU tensor, which gloo (the CPU tests) takes.
    rewards = torch.arange(8.0)
    torch.distributed.all_reduce(rewards.to(DEVICE))
    try:
        torch.distributed.all_reduce(rewards)
        result["cpu_tensor_in_collective"] = "accepted"
    except Exception as e:  # what grpo.py would meet if it reduced the CPU rewards
        result["cpu_tensor_in_collective"] = f"refused: {type(e).__name__}"
    torch.distributed.destroy_process_group()
    print(json.dumps(result), flush=True)
    return result


def cudnn_check() -> dict:
    """pytorch#196678: cuDNN attention with an explicit mask returns a NaN query gradient for a sequence
    length ≡ 64 (mod 128) where a row's log-sum-exp is below about −88.7, as in real models' massive-activation
    heads. Made here directly: keys near one direction u, queries −c·u, so every score is about −128.
    The packed pass pads its length to a multiple of 128 (common.PACK_MULTIPLE): checked at 192 and 256."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for n in (192, 256):
        g = torch.Generator().manual_seed(0)
        u = torch.randn(64, generator=g)
        k = (u + 0.01 * torch.randn(1, 8, n, 64, generator=g)).to(DEVICE, torch.bfloat16)
        q = (-16.0 * u.expand(1, 8, n, 64)).to(DEVICE, torch.bfloat16).requires_grad_()
        v = torch.randn(1, 8, n, 64, generator=g).to(DEVICE, torch.bfloat16)
        mask = torch.full((n, n), -math.inf, device=DEVICE).triu(1).to(torch.bfloat16)[None, None]
        lse = torch.logsumexp((q.float() @ k.float().transpose(-1, -2)) / 8 + mask.float(), -1).min().item()
        backends = [SDPBackend.CUDNN_ATTENTION] if DEVICE.type == "cuda" else [SDPBackend.MATH]
        try:
            with sdpa_kernel(backends):
                torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
            finite = bool(q.grad.isfinite().all())
        except RuntimeError as e:  # no cuDNN attention for these shapes
            finite = f"not run: {str(e).splitlines()[0][:80]}"
        rows.append({"length": n, "min_logsumexp": round(lse, 1), "query_grad_finite": finite})
    result = {"part": "cudnn", "rows": rows, "pass": rows[1]["query_grad_finite"] is True}  # the padded length
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    global DEVICE, SMOKE
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "gpu"))
    parser.add_argument("--only", default="", help="comma-separated parts: scoring, grpo, gpt2, ppo, trpo, rm, lora, "
                                                 "resume, fsdp, cudnn")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device: to try this script itself")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default="", help="where the report goes (default: OUT/gpu_check.json)")
    cli = parser.parse_args()
    out, only, DEVICE, SMOKE = Path(cli.out), set(filter(None, cli.only.split(","))), torch.device(cli.device), cli.smoke
    want = lambda part: not only or part in only  # noqa: E731
    out.mkdir(parents=True, exist_ok=True)
    print(cuda(torch.cuda.get_device_name, "cpu"), torch.__version__, flush=True)
    folders = build_models(out / "models")
    llama, gpt2 = folders["llama135m"], folders["gpt2"]
    steps = (lambda n: 1) if SMOKE else (lambda n: n)
    rl = dict(task="letter", eval_prompts=4 if SMOKE else 16, eval_interval=1000, save_interval=1000,
              max_new_tokens=4 if SMOKE else 128)
    report, failures = {"device": cuda(torch.cuda.get_device_name, "cpu"), "torch": torch.__version__, "runs": []}, []
    if want("scoring"):
        report["scoring"] = scoring_passes(llama)
    if want("grpo"):
        r = run("grpo", out, "grpo_llama135m", model=llama, steps=steps(5), prompts_per_step=16, group_size=8,
                micro_batch_size=32, **rl)
        if r["train/ratio"][0] != 1.0 or r["train/kl"][0] != 0.0:
            failures.append(f"GRPO step 1: ratio {r['train/ratio'][0]} (want 1), KL {r['train/kl'][0]} (want 0)")
        report["runs"].append(r)
    if want("gpt2"):
        report["runs"].append(run("grpo", out, "grpo_gpt2", model=gpt2, steps=steps(3), prompts_per_step=16,
                                  group_size=8, micro_batch_size=32, **rl))
    if want("ppo"):
        report["runs"].append(run("ppo", out, "ppo_llama135m", model=llama, steps=steps(3), prompts_per_step=64,
                                  minibatch_size=16, ppo_epochs=2, **rl))
    if want("trpo"):
        report["runs"].append(run("trpo", out, "trpo_llama135m", model=llama, steps=steps(2), prompts_per_step=32,
                                  trust_region_layers=2, **rl))
    if want("rm"):
        report["runs"].append(run("reward_model", out, "rm_llama135m", model=llama, num_pairs=64 if SMOKE else 256,
                                  batch_size=32, eval_interval=1000))
    if want("lora"):  # adapters, gradient checkpointing, the merged checkpoint
        report["runs"].append(run("grpo", out, "grpo_lora", model=llama, steps=steps(2), prompts_per_step=16, group_size=8,
                                  micro_batch_size=32, lora_rank=16, lora_merge=True, gradient_checkpointing=True, **rl))
        report["runs"].append(run("ppo", out, "ppo_checkpointing", model=llama, steps=steps(2), prompts_per_step=32,
                                  minibatch_size=16, ppo_epochs=1, gradient_checkpointing=True, **rl))
    for part, check in (("resume", lambda: resume_check(out, llama, rl, 1 if SMOKE else 2)),
                        ("fsdp", lambda: fsdp_check(llama)), ("cudnn", cudnn_check)):
        if want(part):
            report[part] = check()
            if not report[part]["pass"]:
                failures.append(f"{part}: {json.dumps(report[part])}")
    report["failures"] = failures
    Path(cli.json or out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print("\n".join(failures) or "all checks passed", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
