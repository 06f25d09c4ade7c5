"""What fits where: the largest model grpo.py can train on one 24 GB or 80 GB GPU, or on eight 80 GB
GPUs with --fsdp, by arithmetic.

    python benchmarks/fits.py [--tokens-per-pass 8192]

Memory of a training pass = the states that stay + the activations of one minibatch:
- full fine-tuning keeps 20 bytes a parameter: fp32 weights (4), the fp32 reference copy (4),
  the gradients (4), AdamW's two moments (8); bf16 autocast adds a transient bf16 copy of the weights
  a pass uses (2). LoRA keeps the frozen fp32 weights (4) and their transient bf16 copy (2); the
  reference is the same weights with the adapters off, and the adapters' own states are < 1 %.
- activations per token ≈ C · layers · hidden bytes, with C measured on an H200 (gpu_check.py's
  scoring passes, bf16 autocast, SmolLM2-135M's shape: 30 layers, 576 wide): 9.27 GB for 7,111
  tokens and 18.08 GB for 14,467, less the 0.54 GB of fp32 gradients, is 1.23 and 1.21 MB a token,
  C ≈ 70 bytes per token, layer and hidden unit. With gradient checkpointing each layer keeps only
  its fp32 input (4 bytes per token and hidden unit) and one layer is recomputed at a time.
- the logits of the pass: 4 bytes per token and vocabulary entry (bf16 logits kept for the
  backward pass, and their bf16 gradient).
- FSDP over N GPUs (--fsdp, full fine-tuning only): the 20 bytes of states a parameter are split N
  ways. The root's parameters (embeddings, LM head) stay gathered in bf16 after a forward, the
  reference's for good (plumbing.shard): one vocabulary × hidden matrix each, 2 bytes an entry. On top,
  the larger of the training pass (its activations and logits, one decoder layer gathered) and
  generation (every weight of the policy gathered once, 2 bytes a parameter: plumbing.gathered).
Not counted: generation's key/value cache (another phase, usually smaller), the CUDA context and the
allocator's fragmentation (keep ~10 % spare). Shapes from the models' published configs.
"""

import argparse

C_ACTIVATION = 70.0  # bytes per token · layer · hidden unit, measured (see the docstring)
MODELS = {  # name: (parameters, layers, hidden size, vocabulary)
    "SmolLM2-135M": (0.135e9, 30, 576, 49152),
    "Qwen2.5-0.5B": (0.49e9, 24, 896, 151936),
    "Llama-3.2-1B": (1.24e9, 16, 2048, 128256),
    "Qwen2.5-1.5B": (1.54e9, 28, 1536, 151936),
    "Qwen2.5-3B": (3.09e9, 36, 2048, 151936),
    "Llama-3.2-3B": (3.21e9, 28, 3072, 128256),
    "Qwen2.5-7B": (7.62e9, 28, 3584, 152064),
    "Llama-3.1-8B": (8.03e9, 32, 4096, 128256),
    "Qwen2.5-14B": (14.7e9, 48, 5120, 152064),
}
SETUPS = {  # name: (bytes per parameter, gradient checkpointing)
    "full": (22, False), "full + checkpointing": (22, True), "LoRA": (6, False), "LoRA + checkpointing": (6, True),
}


def memory_gb(model: str, setup: str, tokens: int, gpus: int = 1) -> float:
    """GB on each GPU; gpus > 1: FSDP over that many (full fine-tuning)."""
    params, layers, hidden, vocab = MODELS[model]
    per_param, checkpointing = SETUPS[setup]
    per_token = (4 * layers * hidden + C_ACTIVATION * hidden) if checkpointing else C_ACTIVATION * layers * hidden
    training_pass = tokens * (per_token + 4 * vocab)
    if gpus == 1:
        return (per_param * params + training_pass) / 1e9
    root = 2 * vocab * hidden  # an embedding matrix gathered in bf16
    training = 2 * root + 2 * params / layers + training_pass  # the policy's and the reference's roots, one layer
    generation = root + 2 * params  # the reference's root, the whole policy
    return ((per_param - 2) * params / gpus + max(training, generation)) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens-per-pass", type=int, default=8192, help="real tokens in one minibatch's pass")
    tokens = parser.parse_args().tokens_per_pass
    print(f"GB for one pass of {tokens} tokens (prompts + completions of a minibatch):\n")
    fsdp = [s for s in SETUPS if not s.startswith("LoRA")]  # --fsdp refuses --lora-rank
    columns = [*SETUPS, *(f"{s}, --fsdp on 8 (each)" for s in fsdp)]
    print("| model | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for model in MODELS:
        figures = [memory_gb(model, s, tokens) for s in SETUPS] + [memory_gb(model, s, tokens, 8) for s in fsdp]
        print(f"| {model} | " + " | ".join(f"{x:.1f}" for x in figures) + " |")
    print("\nLargest that fits (90 % of each card):\n\n| GPUs | " + " | ".join(SETUPS) + " |\n|---|" + "---|" * len(SETUPS))
    for gpu_gb, gpus in ((24, 1), (80, 1), (80, 8)):
        best = [max((m for m in MODELS if memory_gb(m, s, tokens, gpus) <= 0.9 * gpu_gb), key=lambda m: MODELS[m][0],
                    default="none") if gpus == 1 or s in fsdp else "(no LoRA with --fsdp)" for s in SETUPS]
        print(f"| {f'8 × {gpu_gb} GB, --fsdp' if gpus > 1 else f'{gpu_gb} GB'} | " + " | ".join(best) + " |")


if __name__ == "__main__":
    main()
