"""Devices and processes: the GPU or the CPU, torchrun's process group, collectives, DDP and FSDP2."""

import atexit
import contextlib
import gc
import math
import os
import random
import warnings
from datetime import timedelta

import torch


def world_size() -> int:
    """Number of processes: WORLD_SIZE under torchrun, else 1. Readable before any set-up."""
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    """This process's rank: RANK under torchrun, else 0. Readable before any set-up."""
    return int(os.environ.get("RANK", 0))


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


def init_distributed(device: torch.device, timeout_minutes: float = 30.0) -> int:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) -> this process's rank (0 alone).

    A collective waits timeout_minutes for the other processes, then the run stops (torch's default is
    10 minutes for NCCL, 30 for gloo); it must cover rank 0 evaluating or saving alone while the others
    wait. NCCL's flight recorder keeps each process's last 2,000 collectives and writes them on a timeout
    to /tmp/nccl_trace_rank_<r> (read them with `python -m torch.distributed.flight_recorder.fr_trace`):
    what each rank was doing when it stopped."""
    global COLLECTIVE_DEVICE
    COLLECTIVE_DEVICE = device
    if world_size() == 1:
        return 0
    if torch.distributed.is_initialized():  # a second run in this process: the group is left only at exit
        return torch.distributed.get_rank()
    if device.type == "cuda":
        for name, value in {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
                            "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}.items():
            os.environ.setdefault(name, value)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         timeout=timedelta(minutes=timeout_minutes),
                                         device_id=device if device.type == "cuda" else None)
    # Sharded models hold reference cycles (FSDP's hooks), freed only by the garbage collector: collect them while
    # the interpreter is whole, not during its shutdown, where freeing tensors a collective's work still names
    # has aborted a process (SIGABRT, "terminate called without an active exception": seen twice in ~25 CPU runs
    # of the --fsdp PPO test, at the end of a finished run; pytorch#179291 describes this for gloo).
    atexit.register(gc.collect)
    return torch.distributed.get_rank()


def leave_at_exit() -> None:
    """Once every process has finished the run (after a barrier): destroy the process group at the interpreter's
    exit, when main() has returned and its DDP and FSDP wrappers are freed (the garbage collector first, for FSDP's
    reference cycles). Destroyed while a wrapper still lived, the wrapper freed after it has aborted a process at
    exit (tests/ddp_grad_check.py: 6 of 25 runs; a two-process DDP script: 5 of 50, 0 of 50 in this order); a PPO
    run under torchrun that once hung in CI after its last line had that order too (the hang did not recur here).
    Not after an error: a process that destroys the group while another waits in a collective can hang both."""
    def leave():
        gc.collect()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(leave)


COLLECTIVE_DEVICE: torch.device | None = None  # the run's device (init_distributed): every collective's tensors live there


def on_collective_device(x: torch.Tensor) -> None:
    """Refuse x when it is not on the run's device: NCCL takes CUDA tensors only, so a CPU tensor in a
    collective fails only on GPUs. Checked alone too, so that a one-GPU run finds it."""
    if COLLECTIVE_DEVICE is not None and x.device.type != COLLECTIVE_DEVICE.type:
        raise RuntimeError(f"a collective was given a tensor on {x.device} in a run on {COLLECTIVE_DEVICE}; "
                           "move it to the run's device first (NCCL has no CPU tensors)")


@contextlib.contextmanager
def one_voice():
    """For errors every process finds alike (the input checks): under torchrun rank 0 prints the reason,
    the other processes exit with the same status (1) without a word."""
    try:
        yield
    except SystemExit as e:
        if isinstance(e.code, str) and rank() != 0:
            raise SystemExit(1) from None
        raise


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over processes of a tensor on the run's device (itself when alone)."""
    on_collective_device(x)
    if world_size() > 1:
        x = x.detach().clone()
        torch.distributed.all_reduce(x)
        x /= world_size()
    return x


def all_std(x: torch.Tensor) -> torch.Tensor:
    """The unbiased std of x [N] (on the run's device) over the whole batch, every process's rows together."""
    n, mean = len(x) * world_size(), all_mean(x.mean())
    return (all_mean(((x - mean) ** 2).mean()) * n / (n - 1)).sqrt()


def per_process(total: int, flag: str) -> int:
    """`total` split evenly over the processes -> each one's share; refused in one line when it does not divide."""
    if total % world_size():
        raise SystemExit(f"{flag} {total} is not divisible by the {world_size()} processes; "
                         "each process samples the same number of prompts")
    return total // world_size()


def accumulating(train_model, last: bool):
    """The context of one minibatch's backward when gradients add up over several before a step: under
    DDP, no all-reduce except in the last one's (DDP all-reduces in every backward otherwise); FSDP
    reduce-scatters in each, and alone there is nothing to skip."""
    ddp = isinstance(train_model, torch.nn.parallel.DistributedDataParallel)
    return train_model.no_sync() if ddp and not last else contextlib.nullcontext()


def all_agree(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on every process (itself when alone): for decisions every process must share."""
    return all_mean(torch.tensor(float(flag), device=device)).item() == 1.0


def reduce_metrics(metrics: dict, device: torch.device) -> dict[str, float]:
    """{name: scalar tensor or number} -> {name: float}, averaged over processes: one transfer, one all-reduce."""
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(()) for v in metrics.values()])
    return dict(zip(metrics, all_mean(values).tolist()))


def replica_spread(model) -> float:
    """max − min over processes of a checksum of the parameters (Σ p, accumulated in float64 without
    a float64 copy): 0 when the replicas agree."""
    checksum = torch.stack([p.detach().sum(dtype=torch.float64) for p in model.parameters()]).sum().reshape(1)
    on_collective_device(checksum)
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


def distribute(module, fsdp: bool, bf16: bool = False):
    """Under torchrun: with fsdp, `module` sharded in place (and returned); else a DistributedDataParallel
    wrapper around it, for the loss's forward and backward (the bare module stays for generation).
    Alone: the module itself."""
    if world_size() == 1:
        return module
    if fsdp:
        return shard(module, bf16=bf16)
    return torch.nn.parallel.DistributedDataParallel(module)


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


def check_finite(value: torch.Tensor, what: str) -> None:
    """Stop before a NaN/inf reaches the weights; the last checkpoint and the logs stay as they are."""
    value = float(value.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} is {value}; stopping. The last good checkpoint is kept.")
