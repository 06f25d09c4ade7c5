"""One side of benchmarks/vs_trl.sh: Hugging Face TRL's GRPOTrainer at the settings of the speed
target, timed per step. Runs in the separate environment vs_trl.sh makes; TRL is never a
dependency of this project. Prints a JSON line: median seconds per step and peak memory."""

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import plumbing  # noqa: E402  (the same model folder and prompts as grpo.py)
import tasks  # noqa: E402

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 6
checkpointing = sys.argv[2:] == ["--gradient-checkpointing"]  # TRL's own default is on; the target's settings, off
torch.set_num_threads(torch.get_num_threads())
train, _ = plumbing.load_prompts("arithmetic", None, seed=1)
dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                             for r in train[:400]])


def correct(completions, answer, **kwargs):
    return [tasks.correct_reward(c[0]["content"], a) for c, a in zip(completions, answer)]


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


folder = plumbing.embedded_model_folder()
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
config = GRPOConfig(output_dir="/tmp/trl_grpo_bench", per_device_train_batch_size=16, num_generations=4,
                    max_completion_length=32, beta=0.04, num_iterations=1, learning_rate=5e-6, max_steps=steps,
                    temperature=1.0, top_k=0, use_cpu=True, bf16=False, gradient_checkpointing=checkpointing,
                    logging_steps=1, save_strategy="no", report_to="none", seed=1)
timer = StepTimer()
trainer = GRPOTrainer(model=model, reward_funcs=correct, args=config, train_dataset=dataset,
                      processing_class=AutoTokenizer.from_pretrained(folder, padding_side="left"), callbacks=[timer])
trainer.train()
print(json.dumps({"trl_step_s": statistics.median(timer.times[1:]), "trl_steps": len(timer.times),
                  "trl_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}))
