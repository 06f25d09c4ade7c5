"""The run's machinery for grpo.py, ppo.py, trpo.py and reward_model.py, written once and split by concern.
It never calls algorithm code: each script keeps its loop and its phases in plain sight.

Every name a script uses is imported below from the file that defines it:

| file           | what lives there                                                                        |
|----------------|-----------------------------------------------------------------------------------------|
| run.py         | the shared flags (RLArgs, TrainArgs) and `Run`: checks, folder, logging, evaluation, checkpoints, resume, Ctrl-C |
| models.py      | loading models (embedded SmolLM2, hub ids, folders), `load_policy`, LoRA, a reward model as a reward |
| processes.py   | the device, torchrun's processes, collectives (all_mean, all_std), DDP and FSDP2         |
| checkpoints.py | atomic checkpoints, random states, reading a run back for --resume                     |
| data.py        | prompts and preference pairs from files (JSONL, parquet, JSON, CSV, saved data sets, the hub) |
| inputs.py      | flag ranges, idle flags, context lengths, reward settings, your reward functions       |
"""

from plumbing.checkpoints import REWARD_NORM_FILE, TRAINING_STATE, save_checkpoint
from plumbing.data import load_prompts, read_jsonl, read_pairs
from plumbing.inputs import (check_prompt_lengths, check_ranges, check_rewards, load_reward_function,
                             refuse_idle_flags)
from plumbing.models import (EMBEDDED_GGUF, EMBEDDED_MODEL, RewardScorer, adapters_off, add_lora, check_lm_head,
                             check_model_name, embedded_model_folder, enable_gradient_checkpointing, load_model,
                             load_policy, model_positions)
from plumbing.processes import (accumulating, all_agree, all_mean, all_std, check_finite, clip_grad_norm, distribute,
                                full_state_dict, gathered, is_sharded, per_process, pick_device, rank, set_seed, shard,
                                world_size)
from plumbing.run import RANGES, Interrupt, RLArgs, Run, TrainArgs, adamw, make_writer, run_folder
