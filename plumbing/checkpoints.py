"""Checkpoints: written atomically, and read back by --resume with every random state."""

import json
import random
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch

from plumbing.processes import world_size


TRAINING_STATE = "training_state.pt"  # in checkpoint/ beside the model: what --resume needs besides the weights
SHARDS = "shards"  # in checkpoint/ under --fsdp: torch.distributed.checkpoint's files, each process's own
REWARD_NORM_FILE = "reward_normalization.json"  # saved next to a reward model by reward_model.py


def save_checkpoint(model, tokenizer, folder: Path, extra: dict | None = None, state_dict: dict | None = None,
                    weights: bool = True, keep_tmp: bool = False) -> None:
    """`save_pretrained` into folder.tmp, then swap: a crash mid-save keeps the last good checkpoint.
    extra: {file name: object} saved beside the model: `.json` names as JSON, others with torch.save.
    state_dict: the weights to write (under FSDP, `full_state_dict`'s); default: the model's own.
    weights=False: the config and tokenizer only (the weights are in the sharded files, `save_sharded`);
    keep_tmp: folder.tmp already holds files to keep (those shards)."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    if not keep_tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    if weights:
        model.save_pretrained(tmp, state_dict=state_dict)
    else:
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
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


def rng_states(generator: torch.Generator) -> list[dict]:
    """Every random state of every process, in rank order: Python's, torch's (CPU, and its current GPU's), the
    prompt generator's. A resumed GPU run equals the uninterrupted one within tolerance, not to the bit: the
    attention backward kernels on GPUs are not deterministic."""
    # CUDA: this process's own GPU only; a resumed run may see fewer GPUs, or another one as its device.
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "generator": generator.get_state(),
             "cuda": torch.cuda.get_rng_state() if cuda else None}
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
    if isinstance(state["cuda"], torch.Tensor) and torch.cuda.is_available():  # this process's GPU (set_device'd)
        torch.cuda.set_rng_state(state["cuda"])


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
    if len(state["rng"]) != world_size() and not (Path(args.resume) / "checkpoint" / SHARDS).is_dir():
        raise SystemExit(f"--resume: the run had {len(state['rng'])} process(es), this one {world_size()}; use as many "
                         "(a checkpoint of an --fsdp run can be resumed with any number)")
    resumed = replace(type(args)(**saved), resume=args.resume, **{k: given[k] for k in may_change if given[k] != defaults[k]})
    if resumed.fsdp and world_size() == 1:  # the sharded checkpoint, read back whole into one process
        resumed = replace(resumed, fsdp=False)
    return resumed, state


def save_sharded(folder: Path, module, optimizer) -> None:
    """Each process writes its own shards of the weights and of the optimizer's state into folder/shards
    (torch.distributed.checkpoint, DCP): nothing is gathered on one process. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / SHARDS))


def load_sharded(folder: Path, module, optimizer) -> None:
    """`save_sharded`'s weights and optimizer state into module and optimizer, in place, resharded to this run's
    processes: FSDP over any number of them, or one process holding the whole model (DCP reshards on load)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder / SHARDS))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_weights(model, folder: Path) -> None:
    """A checkpoint's trained weights (or LoRA adapters) into `model`, in place: for --resume."""
    check_weight_files(folder)
    if (folder / "adapter_config.json").is_file():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
    else:
        from transformers import AutoModelForCausalLM

        model.load_state_dict(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict())


def check_weight_files(folder: str) -> None:
    """Refuse, in one line naming the file, a weights file that is cut short or damaged (a copy that did not
    finish): safetensors reads each file's header, a few kilobytes, without loading the weights."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        try:
            with safe_open(path, "pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise SystemExit(f"{path}: damaged or incomplete ({str(e).strip().splitlines()[0]}); copy or save the "
                             "model again") from None
