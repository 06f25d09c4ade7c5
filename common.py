"""The core a step of grpo.py, ppo.py and trpo.py touches: rollouts and log-probabilities; nothing algorithm-specific.

1. Rollouts: batched sampling (the plain decode loop) and the completion mask.
2. Log-probabilities: the plain padded computation first, then the packed one the scripts use (tested equal).
3. The sampler against the trainer: the gap between their log-probabilities, and importance weights for it.
It imports nothing else of the project: copy it alone. Elsewhere: tasks and rewards (tasks.py), the GPU
decoder (static_decode.py), the run's machinery (plumbing/: models, processes, logging, checkpoints, input).

"Note N" refers to these details (Huang et al. 2024, "The N Implementation Details of RLHF with
PPO"): 1. left-pad prompts, positions from the attention mask; 2. recompute log-probs in a separate
pass, logits divided by the sampling temperature; 3. the completion mask runs up to and including
the first EOS, built by position (pad may equal eos); 4. dropout off; 5. the logits at position t
predict token t+1; 6. the [batch, length, vocabulary] logits run out of memory first.
"""

import contextlib
import math
from dataclasses import dataclass, fields

import torch

# ----------------------------------------------------------------------------------------------
# 1. Rollouts


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] left-padded (note 1)
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T] 1 up to and including the first EOS
    truncated: torch.Tensor  # [B] bool: no EOS within max_new_tokens
    texts: list[str]  # decoded completions, special tokens removed
    prompt_truncated: torch.Tensor  # [B] bool: the prompt was cut to max_prompt_length (its first tokens dropped)
    sampler_logprobs: torch.Tensor  # [B, T] log π(token) as the decoder saw it (full softmax at the temperature)


def completion_mask(completion_ids: torch.Tensor, eos: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask by position (note 3): 1 up to and including the first EOS, 0 after -> ([B, T], truncated [B])."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))
    T = completion_ids.shape[1]
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), T)  # [B]; T when there is none
    mask = torch.arange(T, device=completion_ids.device)[None] <= first_eos[:, None]
    return mask.long(), ~is_eos.any(1)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
           top_k: int = 0, min_p: float = 0.0, u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token ids [B] from logits [B, V]: the argmax, or a draw from softmax(logits / T) cut to the
    top_k most likely tokens (0: all), to those at least min_p times as likely as the most likely one,
    and to the top-p nucleus (the fewest most likely tokens whose probabilities add up to top_p).
    u [B, 1]: the uniform draws, float64 (default: drawn here). Also returns log π(token) [B] under the
    full softmax(logits / T), the distribution the training passes score with (note 2), not the cut one."""
    log_probs = torch.log_softmax(logits.float() / temperature, -1)  # [B, V]
    if greedy:
        ids = logits.argmax(-1)
        return ids, log_probs.gather(-1, ids[:, None]).squeeze(-1)
    probs = log_probs.exp()
    if top_k > 0:
        probs = probs.masked_fill(probs < probs.topk(min(top_k, probs.shape[-1]), -1).values[:, -1:], 0.0)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, 0.0)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p * sorted_probs.sum(-1, keepdim=True)
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    # Inverse CDF: the first token whose cumulative probability exceeds u·total, u ~ U[0, 1): the same
    # draw as torch.multinomial(probs, 1), which draws one random number per vocabulary entry.
    cdf = probs.double().cumsum(-1)  # [B, V]; float64: no rounding drift over a large vocabulary
    u = torch.rand(len(probs), 1, device=probs.device, dtype=torch.float64) if u is None else u
    ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    return ids, log_probs.gather(-1, ids[:, None]).squeeze(-1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             greedy: bool = False, group_size: int = 1, top_k: int = 0, min_p: float = 0.0,
             max_prompt_length: int | None = None, decode=None) -> Rollout:
    """Sample G = group_size completions for each prompt (a string or chat messages) -> a Rollout of len(prompts)·G
    rows, a prompt's G rows together. Each prompt runs once, its key/value cache repeated G times; then `decode`
    samples (default `decode_loop`; static_decode.decode_static draws the same tokens with fixed shapes and, on
    CUDA, a graph). Greedy output equals `model.generate`'s. Prompts over max_prompt_length tokens keep their
    last ones. Sampling runs in eval mode (a layer in training mode would go through gradient checkpointing)."""
    with eval_mode(model):
        enc = tokenizer([format_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        prompt_truncated = (enc["attention_mask"].sum(1) > (max_prompt_length or math.inf)).repeat_interleave(group_size)
        if max_prompt_length:  # left padding: the last max_prompt_length columns hold each prompt's last tokens
            enc = {k: v[:, -max_prompt_length:] for k, v in enc.items()}
        prompt_ids = enc["input_ids"].repeat_interleave(group_size, 0)  # [B, P]
        prompt_mask = enc["attention_mask"].repeat_interleave(group_size, 0)
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=True, logits_to_keep=1,
                    position_ids=(enc["attention_mask"].cumsum(-1) - 1).clamp(min=0))  # note 1
        cache = out.cache
        cache.batch_repeat_interleave(group_size)
        logits = out.logits[:, -1].repeat_interleave(group_size, 0)  # [B, V]: predicts each row's first token
        eos = model.generation_config.eos_token_id  # an id, a list of ids or None; and the tokenizer's
        eos = torch.tensor(sorted({tokenizer.eos_token_id, *([eos] if isinstance(eos, int) else eos or [])}), device=model.device)
        B = len(prompt_ids)

        def draw(logits, rows=slice(None)):  # one uniform per row and step, ended rows too: both decoders draw alike
            u = None if greedy else torch.rand(B, 1, device=logits.device, dtype=torch.float64)[rows]
            return sample(logits, temperature, top_p, greedy, top_k, min_p, u)  # (ids, log-probs) [rows]

        completion_ids, sampler_logprobs = (decode or decode_loop)(model, cache, logits, prompt_mask, max_new_tokens, eos, draw)
        mask, truncated = completion_mask(completion_ids, eos.tolist())
        width = int(mask.sum(1).max())  # the longest completion: later columns are padding
        completion_ids = torch.where(mask.bool(), completion_ids, tokenizer.pad_token_id)[:, :width]  # pad after each EOS
        mask = mask[:, :width]
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Rollout(prompt_ids, prompt_mask, completion_ids, mask, truncated, texts, prompt_truncated,
                       sampler_logprobs[:, :width] * mask)


def decode_loop(model, cache, logits, prompt_mask, max_new_tokens: int, eos, draw):
    """The plain decode loop -> (completion ids, their log-probs), [B, ≤ max_new_tokens] each. logits [B, V]
    predict each row's first token; cache holds the prompts' keys and values; draw(logits, rows) -> (ids,
    log-probs) of the rows still decoding. A row leaves the batch and the cache once it has sampled an EOS."""
    B = len(prompt_mask)
    completion_ids = prompt_mask.new_zeros(B, max_new_tokens)
    sampler_logprobs = torch.zeros(B, max_new_tokens, device=logits.device)
    running, attention_mask = torch.arange(B, device=logits.device), prompt_mask  # rows still decoding
    for t in range(max_new_tokens):
        next_ids, sampler_logprobs[running, t] = draw(logits, running)  # [rows running]
        completion_ids[running, t] = next_ids
        going_on = ~torch.isin(next_ids, eos)
        n_going = int(going_on.sum())  # the one host sync of a decode step
        if t == max_new_tokens - 1 or n_going == 0:
            break
        if n_going < len(running):  # drop the rows that just ended from the batch and from the cache
            running, next_ids, attention_mask = running[going_on], next_ids[going_on], attention_mask[going_on]
            cache.batch_select_indices(going_on.nonzero().squeeze(1))
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(running), 1)], 1)
        logits = model(input_ids=next_ids[:, None], attention_mask=attention_mask, cache=cache, use_cache=True,
                       position_ids=attention_mask.sum(1, keepdim=True) - 1).logits[:, -1]
    return completion_ids[:, : t + 1], sampler_logprobs[:, : t + 1]


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() for the block, then every module back in the mode it was in."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def rollout_slice(r: Rollout, rows) -> Rollout:
    """Some rows of a rollout (a slice, or a tensor or list of indices)."""
    texts = r.texts[rows] if isinstance(rows, slice) else [r.texts[i] for i in rows]
    return Rollout(**{f.name: texts if f.name == "texts" else getattr(r, f.name)[rows] for f in fields(Rollout)})


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """Several rollouts as one: prompts left-padded and completions right-padded to the longest."""
    def cat(name):
        parts = [getattr(r, name) for r in rollouts]
        if name == "texts" or parts[0].dim() == 1:
            return [t for p in parts for t in p] if name == "texts" else torch.cat(parts)
        width, value = max(p.shape[1] for p in parts), pad_id if name.endswith("_ids") else 0
        pad = lambda p: (width - p.shape[1], 0) if name.startswith("prompt") else (0, width - p.shape[1])  # noqa: E731
        return torch.cat([torch.nn.functional.pad(p, pad(p), value=value) for p in parts])

    return Rollout(**{f.name: cat(f.name) for f in fields(Rollout)})


# ----------------------------------------------------------------------------------------------
# 2. Log-probabilities


def padded_logprobs(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """log π(completion tokens) [B, T], 0 after each completion's end: the plain way, as a reference.

    The whole padded batch [prompt | completion] goes through the model once; positions come from the
    attention mask (note 1); logits are divided by the temperature (note 2); position t predicts
    token t+1 (note 5). The scripts use `completion_logprobs`, tested equal to this."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)  # [B, P + T]
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    T = rollout.completion_ids.shape[1]
    logprobs = torch.log_softmax(logits[:, -T - 1 : -1].float() / temperature, -1)  # [B, T, V]
    return logprobs.gather(-1, rollout.completion_ids[..., None]).squeeze(-1) * rollout.completion_mask


def completion_logprobs(model, rollout: Rollout, temperature: float, chunk_size: int | None = None,
                        entropy: bool = False, group_size: int = 1):
    """`padded_logprobs`, faster and in less memory -> [B, T] (and the entropy H(π) [B, T] with entropy=True).

    chunk_size rows (a multiple of group_size) per forward pass (`forward_completion`). Builds a graph
    unless called under torch.no_grad()."""
    outs = []
    for rows in torch.arange(len(rollout.texts)).split(chunk_size or len(rollout.texts)):
        mb = rollout_slice(rollout, rows)
        logits = forward_completion(model, mb, group_size)  # [N_chunk, V]
        outs.append(token_logprobs(logits, mb.completion_ids[mb.completion_mask.bool()], temperature, entropy))
    if entropy:
        return tuple(unpack(torch.cat(o), rollout.completion_mask) for o in zip(*outs))
    return unpack(torch.cat(outs), rollout.completion_mask)


def forward_completion(model, rollout: Rollout, group_size: int = 1, hidden: bool = False):
    """One forward pass over the packed batch (`pack`) -> logits [N, V] for its N real completion
    tokens in row-major order (`unpack` puts per-token values back into [B, T]); with hidden=True
    also the last hidden state [N, H] that predicts each of them, for a value head.

    The LM head runs at those N positions only (note 6). What it requires of a model: attention that
    takes a 4-D additive mask (SDPA or eager; plumbing's load_model asks for SDPA), and logits that are
    the LM head applied to the last hidden state, no soft-capping or scaling (plumbing's check_lm_head
    refuses other models when they load)."""
    device_type = next(model.parameters()).device.type  # the mask's dtype: the attention's
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32
    packed = pack(rollout, group_size, dtype, PACK_MULTIPLE.get(device_type, 1))
    out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False,
                attention_mask=packed["attention_mask"], output_hidden_states=True, logits_to_keep=1)
    states = out.hidden_states[-1][0][packed["before"]]  # [N, H]: after the final norm; predicts token t+1
    # The bare model under DDP. Under FSDP the root's weights stay gathered after its forward (plumbing.shard).
    lm_head = getattr(model, "module", model).get_output_embeddings()
    # (W @ hᵀ)ᵀ, not lm_head(h): the same logits, but W's gradient comes out as a fresh tensor, which
    # autograd adds a tied input embedding's gradient into in place (one V×H buffer fewer).
    logits = (lm_head.weight @ states.T).T
    logits = logits if lm_head.bias is None else logits + lm_head.bias
    return (logits, states) if hidden else logits


# The packed length is padded to a multiple of 128 on CUDA, with tokens that attend only to themselves.
# cuDNN attention (SDPA's choice on H100/H200 when given a mask) returns a NaN query gradient for a
# length ≡ 64 (mod 128) wherever a row's log-sum-exp is below about −88.7 (pytorch#196678, since torch
# 2.11; TRL#7181 met it through Qwen2.5's massive-activation heads). Random weights never get there.
PACK_MULTIPLE = {"cuda": 128}


def pack(rollout: Rollout, group_size: int = 1, dtype=torch.float32, multiple: int = 1) -> dict:
    """Lay a batch out as one row of its real tokens: each prompt once (rows come in groups of
    G = group_size that share one prompt), then each completion up to its mask's end; no padding.

    Token i attends to token j when both are in the same group, j ≤ i, and j is a prompt token or
    in the same completion: each completion sees its prompt and its own past, exactly as alone.
    Returns input_ids and position_ids [1, n]; that mask [1, 1, n, n] as an additive bias of `dtype`
    (0: attend, -inf: not), built once and shared by every layer; and `before` [N]: for each of the
    N real completion tokens, row-major, the packed index of the token whose hidden state predicts it.
    multiple: n is padded up to a multiple of it with tokens (id 0, position 0) that attend only to themselves."""
    G, device = group_size, rollout.completion_ids.device
    in_prompt = rollout.prompt_mask[::G].bool()  # [B/G, P]: each group's prompt, padding dropped
    in_completion = rollout.completion_mask.bool()  # [B, T]
    prompt_len = in_prompt.sum(1)  # [B/G]
    p_group, _ = in_prompt.nonzero(as_tuple=True)  # per prompt token: its group
    c_row, c_t = in_completion.nonzero(as_tuple=True)  # per completion token: its row and position
    c_group = c_row // G
    group, row = torch.cat([p_group, c_group]), torch.cat([torch.full_like(p_group, -1), c_row])  # [n]
    position_ids = torch.cat([(in_prompt.cumsum(1) - 1)[in_prompt], prompt_len[c_group] + c_t])  # note 1
    n_real = len(group)
    pad = torch.arange(-n_real % multiple, device=device)  # padding tokens, each alone in a group of its own
    group, row = torch.cat([group, -2 - pad]), torch.cat([row, pad * 0 - 2])
    position_ids = torch.cat([position_ids, pad * 0])
    n = len(group)
    i = torch.arange(n, device=device)
    attend = (group[:, None] == group) & (i[None] <= i[:, None]) & ((row == -1)[None] | (row[:, None] == row))
    # An additive mask in the attention's dtype, its rows padded to a multiple of 16 elements: SDPA
    # then uses it as it is in every layer instead of converting or re-aligning a copy per layer.
    bias = torch.full((n, -(-n // 16) * 16), -math.inf, dtype=dtype, device=device)[:, :n]
    bias.masked_fill_(attend, 0.0)
    # A completion's first token is predicted by the last token of its prompt, the others by the one before.
    before = torch.where(c_t == 0, prompt_len.cumsum(0)[c_group] - 1, i[len(p_group) : n_real] - 1)
    input_ids = torch.cat([rollout.prompt_ids[::G][in_prompt], rollout.completion_ids[in_completion], pad * 0])
    return {"input_ids": input_ids[None], "position_ids": position_ids[None], "attention_mask": bias[None, None],
            "before": before}


def unpack(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values [N, ...] of the real completion tokens (row-major) -> [B, T, ...], 0 where mask is 0."""
    out = values.new_zeros(*mask.shape, *values.shape[1:])
    out[mask.bool()] = values
    return out


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, entropy: bool = False):
    """log π(ids) = log softmax(logits / temperature)[ids], [..., V] -> [...] in fp32 (`TokenLogprobs`);
    with entropy=True also H(π) [...] (no gradient)."""
    shape = ids.shape
    logprobs, ent = TokenLogprobs.apply(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), temperature, entropy)
    return (logprobs.view(shape), ent.view(shape)) if entropy else logprobs.view(shape)


class TokenLogprobs(torch.autograd.Function):
    """log softmax(x)[i] = x[i] - logsumexp(x), x = logits / temperature, with its gradient
    (onehot(i) - softmax(x)) / temperature written by hand: autograd through the division, gather
    and logsumexp would hold three or four [N, V] buffers where memory peaks (note 6). Only the
    logits are kept, in their own dtype (bf16 under autocast); fp32 work goes ROWS rows at a time.
    First derivatives only: trpo.py's Fisher-vector products differentiate twice through the logits."""

    ROWS = 1024  # rows of fp32 [ROWS, V] temporaries at a time

    @staticmethod
    def forward(ctx, logits, ids, temperature: float, entropy: bool):
        lse, logprobs = (logits.new_empty(len(logits), dtype=torch.float32) for _ in range(2))
        ent = torch.empty_like(lse) if entropy else None
        for r in TokenLogprobs.row_chunks(len(logits)):
            x = logits[r].float() / temperature  # the distribution that was sampled from (note 2)
            lse[r] = torch.logsumexp(x, -1)
            logprobs[r] = x.gather(-1, ids[r, None]).squeeze(-1) - lse[r]
            if entropy:  # H = logsumexp(x) - Σ softmax(x)·x
                ent[r] = lse[r] - (x - lse[r, None]).exp_().mul_(x).sum(-1)
        ctx.save_for_backward(logits, ids, lse)
        ctx.temperature = temperature
        if entropy:
            ctx.mark_non_differentiable(ent)
        return logprobs, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _):
        logits, ids, lse = ctx.saved_tensors
        out = torch.empty_like(logits)  # in the logits' dtype
        for r in TokenLogprobs.row_chunks(len(logits)):
            d = (logits[r].float() / ctx.temperature - lse[r, None]).exp_().neg_()  # -softmax(x)
            d.scatter_add_(-1, ids[r, None], torch.ones_like(d[:, :1]))  # + onehot(ids)
            out[r] = d.mul_(grad[r, None] / ctx.temperature)
        return out, None, None, None

    @staticmethod
    def row_chunks(n: int) -> list[slice]:
        return [slice(i, i + TokenLogprobs.ROWS) for i in range(0, n, TokenLogprobs.ROWS)]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over mask == 1 (all of it, or along dim); a NaN at a masked-out position stays out."""
    x, mask = torch.where(mask.bool(), x, 0.0), mask.to(x.dtype)
    return x.sum() / mask.sum().clamp(min=1) if dim is None else x.sum(dim) / mask.sum(dim).clamp(min=1)


# ----------------------------------------------------------------------------------------------
# 3. The sampler against the trainer: their log-probs differ by kernels, batch shapes and bf16 rounding (a
# decoder bug, by far more), and with μ = 1 the ratio π_θ/π_old is 1 whatever the decoder did.


def sampler_mismatch(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor) -> dict:
    """The sampler's log-probs against the trainer's over real tokens ([B, T] each): mean and max |log π_trainer −
    log π_sampler|, the k3 estimate of KL(sampler ‖ trainer) (r = π_trainer/π_sampler at tokens the sampler
    drew, k3 = r − log r − 1), and the share of tokens whose r leaves [0.5, 2]."""
    real = mask.bool()
    n = real.sum().clamp(min=1)
    log_r = torch.where(real, trainer_logprobs.detach().double() - sampler_logprobs.double(), 0.0)  # float64:
    return {"sampler/abs_diff_mean": log_r.abs().sum() / n, "sampler/abs_diff_max": log_r.abs().max(),  # k3 ≈ x²/2
            "sampler/kl_k3": (torch.expm1(log_r) - log_r).sum() / n,  # expm1: no cancellation at |log r| ~ 1e-5
            "sampler/ratio_outside_0.5_2": ((log_r.abs() > math.log(2)) & real).sum() / n}


def sampler_correction(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                       mode: str = "token_truncate", cap: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights that turn the sampler's tokens into the trainer's (no gradient) -> (w [B, T],
    the share of real tokens whose weight was truncated or masked). With r_t = π_trainer/π_sampler:
      token_truncate:    w_t = min(r_t, C)                    (TIS, Yao et al. 2025)
      token_mask:        w_t = r_t if 1/C ≤ r_t ≤ C, else 0   (IcePop-style: such a token is left out)
      sequence_truncate: w_t = min(Π_s r_s, C) for every token of the completion
      sequence_mask:     w_t = Π_s r_s if 1/C ≤ Π_s r_s ≤ C, else 0 (the whole completion left out)
      none:              w_t = 1
    The weight multiplies each token's policy loss; the clip of π_θ/π_old stays a separate factor."""
    real = mask.bool()
    log_r = torch.where(real, trainer_logprobs.detach().float() - sampler_logprobs.float(), 0.0)
    if mode == "none":
        return torch.ones_like(log_r), torch.zeros(())
    if mode.startswith("sequence"):
        log_r = log_r.sum(1, keepdim=True).expand_as(log_r)  # log Π_s r_s, at every token of the row
    r = log_r.exp()
    if mode.endswith("truncate"):
        cut = r > cap
        w = r.clamp(max=cap)
    elif mode.endswith("mask"):
        cut = log_r.abs() > math.log(cap)
        w = torch.where(cut, 0.0, r)
    else:
        raise ValueError(f"unknown importance-sampling correction {mode!r}")
    return torch.where(real, w, 0.0), (cut & real).sum() / real.sum().clamp(min=1)


def format_prompt(tokenizer, prompt) -> str:
    """A prompt as the model reads it: a list of chat messages through the chat template, a
    string as one user message through it; without a chat template, a string as a plain-text question."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise ValueError("chat messages need a chat template, and this tokenizer has none: give prompts as strings")
    return f"Question: {prompt}\nAnswer:"


def autocast(device: torch.device, dtype: str):
    """bf16 autocast on CUDA by default ("auto"), or anywhere with dtype="bf16"; weights stay fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, dtype))


def uses_bf16(device: torch.device, dtype: str) -> bool:
    """What the --dtype flag means: bf16 on CUDA by default ("auto"), or anywhere with "bf16"."""
    return dtype == "bf16" or (dtype == "auto" and device.type == "cuda")


