"""What one --fsdp checkpoint costs each process: each process writing its own shards (what the scripts do,
plumbing.save_sharded), against gathering the whole weights and AdamW state on rank 0 (what they did before).

    torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_checkpoint.py --method shards   # then --method gather

The embedded SmolLM2-135M, sharded over the processes (plumbing.shard), AdamW stepped once so that its state
exists; then one checkpoint by the method named, timed, with the rise of each process's peak resident memory
(ru_maxrss) over what training had already used. One method per run: a peak, once reached, hides a smaller one.
On the CPU with gloo; docs/benchmarks.md has the figures.
"""

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plumbing  # noqa: E402
from plumbing.checkpoints import save_sharded  # noqa: E402
from plumbing.processes import init_distributed, optimizer_state  # noqa: E402


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["shards", "gather"], required=True)
    cli = parser.parse_args()
    device = torch.device("cpu")
    rank = init_distributed(device)
    model, _ = plumbing.load_model(plumbing.EMBEDDED_MODEL, device)
    plumbing.shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(0, 1000, (2, 64))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # AdamW's two moments now exist
    folder = Path(tempfile.gettempdir()) / "fsdp_checkpoint_bench"
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    torch.distributed.barrier()
    before, start = peak_gb(), time.perf_counter()
    if cli.method == "shards":
        save_sharded(folder, model, optimizer)
    else:  # the whole state dict and AdamW state onto rank 0's CPU, then written there
        weights, state = plumbing.full_state_dict(model), optimizer_state(model, optimizer)
        if rank == 0:
            folder.mkdir(parents=True)
            torch.save({"model": weights, "optimizer": state}, folder / "whole.pt")
    torch.distributed.barrier()
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9
    print(json.dumps({"method": cli.method, "rank": rank, "seconds": round(seconds, 2), "peak_gb_before": round(before, 2),
                      "peak_gb_rise": round(peak_gb() - before, 2), "files_gb": round(size, 2)}), flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
