"""Generation alone on one CUDA GPU: the plain decode loop against the static one (fixed shapes, one CUDA
graph per step: static_decode.decode_static), on SmolLM2-135M's shape and GPT-2's, random weights, bf16 autocast.

    python benchmarks/gpu_generation.py [--out DIR] [--smoke]      (benchmarks/gpu.sh runs it)

For each model, rows (16, 128, 512) and new tokens (128, 1024; GPT-2: as many as its 1,024 positions leave after
the prompt): tokens per second, ms per decode step, the static path's set-up (cache, capture, the two-step check)
included, peak memory, and the share of greedy tokens on which the two paths agree (bf16: the two see different key
lengths, so a near-tie can break the other way and the rest of that row follows; reported, not required).
Tokens are those kept, up to each row's end (the static path decodes ended rows too). Each line also prints the
bandwidth bound of a step: the bf16 weights plus the cache read once, at the H200's 4.8 TB/s. Then a whole
GRPO step with each path (grpo.py --generation loop / static). --smoke: tiny sizes on the CPU, to try the script.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import plumbing  # noqa: E402
import static_decode  # noqa: E402
from gpu_check import build_models, run  # noqa: E402

BANDWIDTH = 4.8e12  # bytes/s, the H200's HBM3e


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.time() - start, torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0.0


def generation(folder: str, device, sizes) -> list[dict]:
    model, tokenizer = plumbing.load_model(folder, device)
    config = model.config.get_text_config()
    weight_bytes = 2 * sum(p.numel() for p in model.parameters())
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = config.hidden_size // config.num_attention_heads
    rows_out = []
    for rows, new_tokens in sizes:
        prompts = [f"Question {i}: what is {i} + {i}?" for i in range(rows)]
        longest = max(len(ids) for ids in tokenizer([common.format_prompt(tokenizer, p) for p in prompts])["input_ids"])
        new_tokens = min(new_tokens, getattr(config, "max_position_embeddings", 10**9) - longest)  # GPT-2: 1,024 in all
        out = {"model": Path(folder).name, "rows": rows, "new_tokens": new_tokens}
        tokens = {}
        for path in ("loop", "static"):
            with common.autocast(device, "auto"):
                generate = lambda: common.generate(model, tokenizer, prompts, new_tokens, greedy=True,  # noqa: E731
                                                   decode=static_decode.decode_static if path == "static" else None)
                generate() if path == "static" else None  # warm-up (kernels, allocator)
                rollout, seconds, peak = timed(generate, device)
            tokens[path] = rollout.completion_ids
            n = int(rollout.completion_mask.sum())
            out[path] = {"tokens_per_s": round(n / seconds), "ms_per_step": round(1000 * seconds / rollout.completion_ids.shape[1], 2),
                         "seconds": round(seconds, 2), "peak_gb": round(peak, 2)}
        cache_bytes = 2 * 2 * config.num_hidden_layers * rows * kv_heads * head_dim * (16 + new_tokens)  # k and v, bf16
        out["bound_ms_per_step"] = round(1000 * (weight_bytes + cache_bytes) / BANDWIDTH, 3)
        out["speedup"] = round(out["static"]["tokens_per_s"] / out["loop"]["tokens_per_s"], 2)
        width = min(tokens["loop"].shape[1], tokens["static"].shape[1])
        out["greedy_agreement"] = round((tokens["loop"][:, :width] == tokens["static"][:, :width]).float().mean().item(), 4)
        print(json.dumps(out), flush=True)
        rows_out.append(out)
    del model
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "generation"))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", default="llama135m,gpt2,grpo", help="comma-separated parts: llama135m, gpt2, grpo")
    parser.add_argument("--json", default="", help="where the report goes (default: OUT/gpu_generation.json)")
    cli = parser.parse_args()
    only = cli.only.split(",")
    device = torch.device("cpu" if cli.smoke else "cuda")
    import gpu_check

    gpu_check.DEVICE, gpu_check.SMOKE = device, cli.smoke
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    folders = build_models(out / "models")
    sizes = [(2, 8)] if cli.smoke else [(16, 128), (128, 128), (512, 128), (16, 1024), (128, 1024)]
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "generation": [r for name in ("llama135m", "gpt2") if name in only
                             for r in generation(folders[name], device, sizes)]}
    steps = dict(task="letter", steps=1 if cli.smoke else 3, prompts_per_step=16, group_size=8, micro_batch_size=32,
                 eval_prompts=0, max_new_tokens=4 if cli.smoke else 128, model=folders["llama135m"])
    if "grpo" in only:
        report["grpo_step"] = [run("grpo", out, f"grpo_{path}", generation=path, **steps) for path in ("loop", "static")]
    Path(cli.json or out / "gpu_generation.json").write_text(json.dumps(report, indent=1))
    print("greedy agreement per size:", [r["greedy_agreement"] for r in report["generation"]])


if __name__ == "__main__":
    main()
