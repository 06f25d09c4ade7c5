"""The small shared core of grpo.py, ppo.py, trpo.py and reward_model.py; nothing algorithm-specific.

1. Rollouts: batched sampling and the completion mask.
2. Log-probabilities: the plain padded computation first, then the packed one the scripts use
   (tested equal to it in values and gradients).
3. Tasks and rewards: the built-in prompts, rule rewards, reward-model scores, your own reward
   function, held-out evaluation.
It imports nothing else of the project: copy it alone. The run's machinery (loading models, devices,
processes, logging, checkpoints, Ctrl-C and resuming, checking input) is in plumbing/.

"Note N" refers to these details (Huang et al. 2024, "The N Implementation Details of RLHF with
PPO"): 1. left-pad prompts, positions from the attention mask; 2. recompute log-probs in a separate
pass, logits divided by the sampling temperature; 3. the completion mask runs up to and including
the first EOS, built by position (pad may equal eos); 4. dropout off; 5. the logits at position t
predict token t+1; 6. the [batch, length, vocabulary] logits run out of memory first.
"""

import contextlib
import math
import random
import re
import warnings
from dataclasses import dataclass

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


def completion_mask(completion_ids: torch.Tensor, eos: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask by position (note 3): 1 up to and including the first EOS, 0 after -> ([B, T], truncated [B])."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))
    T = completion_ids.shape[1]
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), T)  # [B]; T when there is none
    mask = torch.arange(T, device=completion_ids.device)[None] <= first_eos[:, None]
    return mask.long(), ~is_eos.any(1)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
           top_k: int = 0, min_p: float = 0.0, u: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: the argmax, or a draw from softmax(logits / T) cut to the
    top_k most likely tokens (0: all), to those at least min_p times as likely as the most likely one,
    and to the top-p nucleus (the fewest most likely tokens whose probabilities add up to top_p).
    u [B, 1]: the uniform draws, float64 (default: drawn here)."""
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
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
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, greedy: bool = False, group_size: int = 1, top_k: int = 0, min_p: float = 0.0,
             max_prompt_length: int | None = None, static: bool = False) -> Rollout:
    """Sample G = group_size completions for each prompt -> a Rollout of len(prompts)·G rows, each
    prompt's G rows next to each other. Each prompt is run once and its key/value cache repeated G
    times; a row leaves the batch once it has sampled EOS. Greedy output equals `model.generate`'s.
    Prompts longer than max_prompt_length tokens keep their last ones (Rollout.prompt_truncated).
    The model samples in eval mode (a layer in training mode would go through gradient checkpointing).
    static=True: the same tokens from `decode_static`'s fixed shapes (on CUDA, a captured graph)."""
    static = static and not getattr(model.config.get_text_config(), "sliding_window", None)  # whole-context layers only
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

        def draw(logits, rows=slice(None)):  # one uniform per row and step, ended rows too: both paths draw alike
            u = None if greedy else torch.rand(B, 1, device=logits.device, dtype=torch.float64)[rows]
            return sample(logits, temperature, top_p, greedy, top_k, min_p, u)

        if static:  # the same draws with fixed shapes (and a CUDA graph on CUDA)
            completion_ids = decode_static(model, cache, logits, prompt_mask, max_new_tokens, eos, draw)
        else:
            completion_ids = torch.full((B, max_new_tokens), tokenizer.pad_token_id, device=model.device)
            running, attention_mask = torch.arange(B, device=model.device), prompt_mask  # rows still decoding
            for t in range(max_new_tokens):
                next_ids = draw(logits, running)  # [rows running]
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
        mask, truncated = completion_mask(completion_ids, eos.tolist())
        width = int(mask.sum(1).max())  # the longest completion: later columns are padding
        completion_ids = torch.where(mask.bool(), completion_ids, tokenizer.pad_token_id)[:, :width]  # pad after each EOS
        mask = mask[:, :width]
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Rollout(prompt_ids, prompt_mask, completion_ids, mask, truncated, texts, prompt_truncated)


def decode_static(model, cache, logits, prompt_mask, max_new_tokens: int, eos, draw) -> torch.Tensor:
    """`generate`'s decode loop with every shape fixed -> completion ids [B, max_new_tokens], whatever follows
    each EOS included (the completion mask leaves it out). The batch stays whole (an ended row keeps sampling),
    the key/value cache is allocated once for prompt + completion, and the host looks at the batch every 16
    steps, not every step. On CUDA one decode step is captured as a graph and replayed: the step then costs the
    GPU's time, not Python's launching of every layer's kernels (`capture_step`)."""
    from transformers import StaticCache

    B, P = prompt_mask.shape
    static = StaticCache(config=model.config, max_cache_len=P + max_new_tokens)
    for layer, prefilled in zip(static.layers, cache.layers):  # the prompt's keys and values, at slots 0..P-1
        layer.lazy_initialization(prefilled.keys, prefilled.values)
        layer.keys[:, :, :P], layer.values[:, :, :P] = prefilled.keys, prefilled.values
        layer.cumulative_length.fill_(P)  # the next slot written
    attend = torch.cat([prompt_mask, prompt_mask.new_zeros(B, max_new_tokens)], 1).bool()  # [B, P + T]: slots attended
    ids, position = prompt_mask.new_zeros(B, 1), prompt_mask.sum(1, keepdim=True)  # inputs at fixed addresses

    def step():  # the token in `ids` at `position`, its keys and values into the next slot -> logits [B, V]
        return model(input_ids=ids, position_ids=position, attention_mask=attend[:, None, None, :], cache=static,
                     use_cache=True).logits[:, -1]

    def rewind(n):  # undo n steps from the start: the cache's next slot, the slots attended, the position
        for layer in static.layers:
            layer.cumulative_length.fill_(P)
        attend[:, P : P + n] = False
        position.sub_(n)

    def two_steps(f):  # -> the logits of two steps from the start, then undone
        outs = []
        for k in range(2):
            attend[:, P + k] = True
            outs.append(f())
            position.add_(1)
        rewind(2)
        return outs

    if prompt_mask.device.type == "cuda":  # the graph, once it gives the eager step's logits over two steps
        why = "gives other logits than the eager step"
        try:
            graphed = capture_step(step, lambda: rewind(0))
            same = all(torch.allclose(a, b, rtol=1e-2, atol=1e-2) for a, b in zip(two_steps(step), two_steps(graphed)))
        except RuntimeError as e:  # something in the step that a graph cannot hold
            same, why = False, f"failed: {type(e).__name__}: {str(e).splitlines()[0]}"
        if same:
            step = graphed
        else:
            warnings.warn(f"decoding without a CUDA graph: the captured step {why}")
    completion_ids, done = prompt_mask.new_zeros(B, max_new_tokens), torch.zeros(B, dtype=torch.bool, device=ids.device)
    for t in range(max_new_tokens):
        completion_ids[:, t] = draw(logits)
        done |= torch.isin(completion_ids[:, t], eos)
        if t == max_new_tokens - 1 or (t % 16 == 15 and bool(done.all())):  # a host sync every 16 steps
            break
        ids.copy_(completion_ids[:, t, None])
        attend[:, P + t] = True  # the slot this token's keys and values go to
        logits = step()
        position.add_(1)
    return completion_ids


def capture_step(step, rewind):
    """step() recorded once as a CUDA graph -> a function that replays it (same inputs' addresses, new values).
    Warm-up runs on a side stream, as torch.cuda.graph asks; rewind() undoes what it wrote into the cache.
    Autocast's weight cache is off while recording, so that each replay casts the weights it reads."""
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.get_autocast_dtype("cuda")
    with torch.autocast("cuda", dtype=dtype, enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(device).wait_stream(side)
        rewind()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()

    def replay():
        graph.replay()
        return logits.clone()

    return replay


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
    return Rollout(r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows], r.completion_mask[rows],
                   r.truncated[rows], r.texts[rows] if isinstance(rows, slice) else [r.texts[i] for i in rows],
                   r.prompt_truncated[rows])


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """Several rollouts as one: prompts left-padded and completions right-padded to the longest."""
    P, T = max(r.prompt_ids.shape[1] for r in rollouts), max(r.completion_ids.shape[1] for r in rollouts)

    def cat(tensors, width, value, left):
        pad = lambda x: torch.nn.functional.pad(x, (width - x.shape[1], 0) if left else (0, width - x.shape[1]),  # noqa: E731
                                                value=value)
        return torch.cat([pad(x) for x in tensors])

    return Rollout(cat([r.prompt_ids for r in rollouts], P, pad_id, True), cat([r.prompt_mask for r in rollouts], P, 0, True),
                   cat([r.completion_ids for r in rollouts], T, pad_id, False),
                   cat([r.completion_mask for r in rollouts], T, 0, False), torch.cat([r.truncated for r in rollouts]),
                   [t for r in rollouts for t in r.texts], torch.cat([r.prompt_truncated for r in rollouts]))


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
# 3. Tasks and rewards. A prompt is a dict {"prompt": str, "answer": str | None}.

TASKS = ("arithmetic", "letter")
LETTER = "a"  # the `letter` task rewards the share of this character: learnable in seconds


def task_prompts(task: str, seed: int, n_eval: int = 64) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompts of a built-in task: "What is A + B?" (A, B in 1..50; a fixed held-out
    split), or `letter`. Prompts from a JSONL file (--data) are read by plumbing's load_prompts."""
    if task == "arithmetic":
        pairs = [(a, b) for a in range(1, 51) for b in range(1, 51)]
        random.Random(1234).shuffle(pairs)  # not the seed: held-out stays held out across seeds
        rows = [{"prompt": f"What is {a} + {b}? Answer with just the number.", "answer": str(a + b)} for a, b in pairs]
        return rows[n_eval:], rows[:n_eval]
    if task == "letter":
        words = ["apple", "banana", "cat", "dog", "sea", "tree", "river", "stone", "light", "cloud"]
        rng = random.Random(seed)
        rows = [{"prompt": f"Say something about {rng.choice(words)} {i}.", "answer": None} for i in range(1000 + n_eval)]
        return rows[n_eval:], rows[:n_eval]
    raise SystemExit(f"--task {task}: unknown; choose one of {TASKS} or pass --data FILE.jsonl")


def correct_reward(completion: str, answer: str) -> float:
    """1 when the last number in the completion equals a numeric answer (else: the answer appears)."""
    try:
        answer_number = float(answer)
    except ValueError:
        return float(answer.strip().lower() in completion.lower())
    numbers = re.findall(r"-?\d+(?:\.\d+)?", completion.replace(",", ""))
    return float(bool(numbers) and float(numbers[-1]) == answer_number)


def format_reward(completion: str) -> float:
    """1 when the completion is just a number, as the arithmetic prompts ask."""
    return float(re.fullmatch(r"\s*-?\d+(?:\.\d+)?\.?\s*", completion) is not None)


def letter_reward(completion: str) -> float:
    return completion.count(LETTER) / max(len(completion), 1)


def rule_rewards(task: str, data: str | None, rows: list[dict], format_weight: float = 0.0) -> dict:
    """The rule rewards for these prompts, {name: (fn(completion, answer) -> float, weight)}; empty
    when the prompts have no answers to check (a JSONL file scored by a reward model)."""
    if task == "letter" and data is None:
        return {"letter": (lambda c, a: letter_reward(c), 1.0)}
    if any(r["answer"] is None for r in rows):
        return {}
    return {"correct": (correct_reward, 1.0), **({"format": (lambda c, a: format_reward(c), format_weight)}
                                                  if format_weight else {})}


def reward_model_inputs(tokenizer, prompts: list[str], completions: list[str], max_length: int) -> dict:
    """(prompt, completion) pairs as the reward model reads them: formatted prompt, completion, EOS;
    right-truncated to max_length."""
    texts = [format_prompt(tokenizer, p) + c + tokenizer.eos_token for p, c in zip(prompts, completions)]
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                     add_special_tokens=False)


def reward_model_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar score at the last real token of each row, whatever the padding side -> [B] fp32.
    (HF's own pooling finds that token by comparing with the pad id, which fails when pad == eos.)"""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)  # index of the last 1 in each row
    return model.score(hidden[torch.arange(len(last)), last]).squeeze(-1).float()


def call_reward_function(name: str, fn, rows: list[dict], completions: list[str]) -> torch.Tensor:
    """fn's rewards [N], NaN where it returned None ("does not apply"); anything but one number (or None)
    per completion, or a value that is not finite, stops the run."""
    values = fn(prompts=[r["prompt"] for r in rows], completions=completions, answer=[r["answer"] for r in rows])
    try:
        values = [None if v is None else float(v) for v in values]
    except (TypeError, ValueError):
        raise SystemExit(f"reward function {name} returned {str(values)[:200]}: return a list of one float "
                         "(or None) per completion") from None
    if len(values) != len(completions):
        raise SystemExit(f"reward function {name} returned {len(values)} values for {len(completions)} completions")
    if not all(v is None or math.isfinite(v) for v in values):
        raise SystemExit(f"reward function {name} returned a value that is not finite: {values}")
    return torch.tensor([math.nan if v is None else v for v in values])


def compute_rewards(rows: list[dict], completions: list[str], rules: dict, rule_weight: float = 1.0,
                    scorer=None, scorer_weight: float = 1.0,
                    functions: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the rule rewards, the reward-model score (scorer(prompts, completions) -> [N], such
    as plumbing's RewardScorer) and the user's reward functions ({name: (fn, weight)}; None counts 0)
    -> ([N], {name: [N]})."""
    parts = {name: (torch.tensor([fn(c, r["answer"]) for r, c in zip(rows, completions)]), rule_weight * weight)
             for name, (fn, weight) in rules.items()} if rule_weight != 0 else {}
    if scorer is not None:
        parts["reward_model"] = (scorer([r["prompt"] for r in rows], completions), scorer_weight)
    for name, (fn, weight) in (functions or {}).items():  # NaN where the function said None: counts 0
        parts[name] = (call_reward_function(name, fn, rows, completions), weight)
    total = sum(weight * (values.nan_to_num(0.0) if name in (functions or {}) else values)
                for name, (values, weight) in parts.items())
    return total.float(), {name: values for name, (values, _) in parts.items()}


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], reward_fn, max_new_tokens: int, dtype: str, batch_size: int = 32,
             max_prompt_length: int | None = None, static: bool = False) -> dict:
    """Greedy completions on held-out prompts, cut as the training prompts are -> {"reward": mean total,
    name: mean of each part}; reward_fn(rows, completions) -> (total [N], {name: [N]}), as compute_rewards."""
    texts = []
    for i in range(0, len(rows), batch_size):
        with autocast(model.device, dtype):
            texts += generate(model, tokenizer, [r["prompt"] for r in rows[i : i + batch_size]], max_new_tokens,
                              greedy=True, max_prompt_length=max_prompt_length, static=static).texts
    total, parts = reward_fn(rows, texts)
    return {"reward": total.mean().item(), **{k: v.nanmean().item() for k, v in parts.items()}}


def format_prompt(tokenizer, text: str) -> str:
    """The chat template when the tokenizer has one, else a plain-text prompt."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Question: {text}\nAnswer:"


def autocast(device: torch.device, dtype: str):
    """bf16 autocast on CUDA by default ("auto"), or anywhere with dtype="bf16"; weights stay fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, dtype))


def uses_static(device: torch.device, generation: str) -> bool:
    """What the --generation flag means: `decode_static` on CUDA by default ("auto"), or anywhere with "static"."""
    return generation == "static" or (generation == "auto" and device.type == "cuda")


def uses_bf16(device: torch.device, dtype: str) -> bool:
    """What the --dtype flag means: bf16 on CUDA by default ("auto"), or anywhere with "bf16"."""
    return dtype == "bf16" or (dtype == "auto" and device.type == "cuda")


