"""A faster decoder for common.generate: every shape fixed, and on CUDA one decode step replayed as a CUDA graph.

A reader of the algorithms never needs this file: `common.decode_loop` is the plain loop, and this
one samples the same tokens with the same log-probabilities (tests/test_common.py holds them equal,
greedy and sampled). The scripts pass it as `common.generate(..., decode=static_decode.decode_static)`
under `--generation static`, and by default on CUDA (`plumbing.sampling`).

Why it is faster on a GPU: the plain loop's step costs Python's launching of every layer's kernels
(~1.3 ms a layer measured on an H200, docs/benchmarks.md), far more than the GPU's own work at 135M.
With fixed shapes (the batch kept whole, the key/value cache allocated once for prompt + completion,
inputs at fixed addresses) the step can be recorded once and replayed. The host looks at the batch
every 16 steps, not every step.
"""

import contextlib
import functools
import warnings

import torch

import common

# Why the CUDA graph is off in this process, after its first failure: a capture is not tried again.
GRAPH_OFF: list[str] = []


def supports_static(model) -> bool:
    """True when every cache layer of the model is a plain full-attention one: sliding-window, chunked,
    linear-attention or shared-KV layers (hybrid configs) keep other state, which this decoder does not fill."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    cache = StaticCache(config=model.config, max_cache_len=2)
    return all(type(layer) is StaticLayer for layer in cache.layers)


def decode_static(model, cache, logits, prompt_mask, max_new_tokens: int, eos, draw, capture=None):
    """common.decode_loop's contract with every shape fixed -> (completion ids [B, max_new_tokens],
    the sampler's log-probabilities [B, max_new_tokens]), whatever follows each EOS included (the
    completion mask leaves it out). An ended row keeps sampling, so the batch never changes shape.
    capture(step, rewind) -> a replaying step: default on CUDA `capture_step`, elsewhere none (tests pass one)."""
    from transformers import StaticCache

    if not supports_static(model):
        return common.decode_loop(model, cache, logits, prompt_mask, max_new_tokens, eos, draw)
    B, P = prompt_mask.shape
    static = StaticCache(config=model.config, max_cache_len=P + max_new_tokens)
    # Under autocast the keys come out of the rotary product in fp32; attention casts them to bf16 as it reads
    # them. Stored in bf16, the cache is half the size and nothing is cast each step: the same numbers.
    device_type = prompt_mask.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    for layer, prefilled in zip(static.layers, cache.layers):  # the prompt's keys and values, at slots 0..P-1
        layer.lazy_initialization(prefilled.keys.to(dtype), prefilled.values.to(dtype))
        layer.keys[:, :, :P], layer.values[:, :, :P] = prefilled.keys, prefilled.values
        layer.cumulative_length.fill_(P)  # the next slot written
        if dtype is not None:  # StaticLayer.update copies with index_copy_, which wants the cache's own dtype
            layer.update = functools.partial(update_as, layer.update, dtype)
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

    if capture is None and prompt_mask.device.type == "cuda" and not GRAPH_OFF:
        capture = capture_step
        if any(type(m).__name__.startswith("FSDP") for m in model.modules()):  # sharded: its hooks gather in each step
            GRAPH_OFF.append("the model is sharded (FSDP); a graph of its gathers is not shown to work")
            capture = None
    # The graph is used once it gives the eager step's logits over two steps; a step that has fewer than
    # three decode steps to replay gains nothing from it (and has no room for the two trial steps).
    if capture is not None and max_new_tokens > 2:
        why = "gives other logits than the eager step"
        try:
            graphed = capture(step, lambda: rewind(0))
            same = all(torch.allclose(a, b, rtol=1e-2, atol=1e-2) for a, b in zip(two_steps(step), two_steps(graphed)))
        except Exception as e:  # something in the step that a graph cannot hold
            same, why = False, f"failed: {type(e).__name__}: {str(e).splitlines()[0]}"
        if same:
            step = graphed
        else:  # said once; this process decodes eagerly from now on
            GRAPH_OFF.append(f"the captured step {why}")
            warnings.warn(f"decoding without a CUDA graph: {GRAPH_OFF[-1]}")
    completion_ids = prompt_mask.new_zeros(B, max_new_tokens)
    sampler_logprobs = torch.zeros(B, max_new_tokens, device=ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    for t in range(max_new_tokens):
        completion_ids[:, t], sampler_logprobs[:, t] = draw(logits)
        done |= torch.isin(completion_ids[:, t], eos)
        if t == max_new_tokens - 1 or (t % 16 == 15 and bool(done.all())):  # a host sync every 16 steps
            break
        ids.copy_(completion_ids[:, t, None])
        attend[:, P + t] = True  # the slot this token's keys and values go to
        logits = step()
        position.add_(1)
    return completion_ids, sampler_logprobs


def update_as(update, dtype, keys, values, *args, **kwargs):
    """A cache layer's update, given the new keys and values in the cache's dtype."""
    return update(keys.to(dtype), values.to(dtype), *args, **kwargs)


def capture_step(step, rewind):
    """step() recorded once as a CUDA graph -> a function that replays it (same inputs' addresses, new values).

    Warm-up runs on a side stream, as CUDA graphs ask; rewind() undoes what it wrote into the cache.
    Under autocast the warm-up fills autocast's weight cache (bf16 copies of the fp32 weights), and the
    graph records reads of those copies, not casts: a replay reads bf16 weights. The copies live until
    the caller's autocast block ends, after the last replay (generate is called inside it; the graph
    is dropped when decode_static returns). Captured with capture_begin/capture_end rather than
    `torch.cuda.graph`, which empties the caching allocator on every entry."""
    device = torch.device("cuda", torch.cuda.current_device())
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
        torch.cuda.synchronize(device)
        rewind()
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin()
        try:
            logits = step()
        except Exception:  # end the capture and free its private memory pool, then report the step's own error
            with contextlib.suppress(RuntimeError):
                graph.capture_end()
            graph.reset()
            raise
        graph.capture_end()
    torch.cuda.current_stream(device).wait_stream(side)

    def replay():
        graph.replay()
        return logits.clone()

    return replay
