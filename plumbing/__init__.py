"""The run's machinery for grpo.py, ppo.py, trpo.py and reward_model.py, written once and split by concern.
It never calls algorithm code: each script keeps its loop and its phases in plain sight.

- run.py: the flags the RL scripts share (RLArgs, TrainArgs) and `Run`: checks before anything loads,
  run folder, TensorBoard, held-out evaluation, checkpoints, --resume, Ctrl-C, the last line, teardown.
- models.py: loading (the embedded SmolLM2-135M-Instruct, hub ids, folders), the policy and its reference
  (`load_policy`: gradient checkpointing, LoRA, DDP or FSDP), a saved reward model as a reward.
- processes.py: the device, torchrun's process group, collectives, DDP and FSDP2.
- checkpoints.py: atomic checkpoints, random states, reading a run back for --resume.
- inputs.py: flag ranges, JSONL files, prompts, reward settings and your reward function.

Everything is importable from here as `plumbing.<name>`.
"""

from plumbing.checkpoints import *  # noqa: F401,F403
from plumbing.inputs import *  # noqa: F401,F403
from plumbing.models import *  # noqa: F401,F403
from plumbing.processes import *  # noqa: F401,F403
from plumbing.run import *  # noqa: F401,F403
