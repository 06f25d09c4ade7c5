"""Tiny models built in code for the tests: a byte-level tokenizer and a 2-layer GPT-2 or Llama.

No files are shipped and nothing is downloaded; a model folder is written to a temporary path."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 bytes to printable characters (so byte-level BPE round-trips)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def byte_tokenizer(chat: bool, vocab_size: int = 0) -> PreTrainedTokenizerFast:
    """256 byte tokens plus special tokens. GPT-2 style (chat=False): one <|endoftext|>, no pad, no
    template. Llama style (chat=True): eos = pad = <|end|>, and a chat template. vocab_size: filler
    tokens up to that size (never produced by encoding, decoded as "<|1a3|>"), for a real vocabulary's
    logit sizes (benchmarks/gpu_check.py)."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for i in range(len(vocab), vocab_size - (3 if chat else 1)):
        vocab[f"<|{i:x}|>"] = i  # hex: some hold the letter a, so the letter reward varies
    specials = ["<|end|>", "<|user|>", "<|assistant|>"] if chat else ["<|endoftext|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    if chat:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|end|>",
                                       chat_template=CHAT_TEMPLATE)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_model(arch: str = "gpt2", seed: int = 0, positions: int = 256):
    """(model, tokenizer): a random 2-layer model with dropout as GPT-2 ships it (0.1), `positions` positions."""
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer(chat=arch == "llama")
    eos = tokenizer.eos_token_id
    if arch == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=positions,
                            bos_token_id=eos, eos_token_id=eos)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions,
                             eos_token_id=eos, pad_token_id=eos, bos_token_id=eos, tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def tiny_policy(arch: str = "gpt2", seed: int = 0):
    """tiny_model set up as plumbing.load_model sets up a policy: dropout off, left padding, a pad token."""
    model, tokenizer = tiny_model(arch, seed)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model.eval(), tokenizer


def save_tiny_model(folder: Path, arch: str = "gpt2", seed: int = 0, positions: int = 256) -> str:
    model, tokenizer = tiny_model(arch, seed, positions)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
