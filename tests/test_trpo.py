import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parameters_to_vector

import common
import trpo
from test_grpo import run_script, scalars
from tiny import tiny_policy


def test_conjugate_gradient_solves_a_random_spd_system():
    torch.manual_seed(0)
    M = torch.randn(20, 20, dtype=torch.float64)
    A = M @ M.T + 0.5 * torch.eye(20, dtype=torch.float64)
    b = torch.randn(20, dtype=torch.float64)
    x, residual = trpo.conjugate_gradient(lambda v: A @ v, b, iters=60, tol=1e-20)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), atol=1e-8, rtol=1e-8)
    assert residual < 1e-8


def test_conjugate_gradient_of_zero_is_zero():
    x, residual = trpo.conjugate_gradient(lambda v: 2 * v, torch.zeros(5), iters=10)
    assert torch.equal(x, torch.zeros(5)) and residual == 0


def test_fisher_vector_product_equals_the_explicit_fisher_times_a_vector():
    """F = mean_t Σ_v π(v) ∇log π(v) ∇log π(v)ᵀ, built from per-token Jacobians, vs double backward of KL̄."""
    torch.manual_seed(0)
    model, tokenizer = tiny_policy("llama")
    model.requires_grad_(False)
    params = [model.model.norm.weight, model.model.layers[-1].mlp.down_proj.weight]  # 32 + 2048 parameters
    for p in params:
        p.requires_grad_(True)
    rollout = common.generate(model, tokenizer, ["hi", "hello there"], max_new_tokens=4)
    mask = rollout.completion_mask

    def log_dist():  # [B, T, V], attention as plain ops (twice differentiable), as in trpo.main
        with sdpa_kernel(SDPBackend.MATH):
            return torch.log_softmax(common.unpack(common.forward_completion(model, rollout), mask).double() / 0.9, -1)

    old = log_dist().detach()
    kl_grad = torch.autograd.grad(trpo.mean_kl(old, log_dist(), mask), params, create_graph=True)
    kl_grad = torch.cat([g.reshape(-1) for g in kl_grad])
    v = torch.randn_like(kl_grad)
    fvp = trpo.fisher_vector_product(kl_grad, params, v, damping=0.0)

    flat_log_dist = log_dist()[mask.bool()].reshape(-1)  # [N·V] over the real tokens
    n_tokens = int(mask.sum())
    rows = torch.eye(len(flat_log_dist), dtype=flat_log_dist.dtype)  # one backward per (token, v), batched
    jacobian = torch.autograd.grad(flat_log_dist, params, rows, is_grads_batched=True)
    jacobian = torch.cat([j.reshape(len(flat_log_dist), -1) for j in jacobian], 1).double()  # [N·V, P]
    probs = flat_log_dist.detach().exp()
    fisher = jacobian.T @ (probs[:, None] * jacobian) / n_tokens
    torch.testing.assert_close(fvp.double(), fisher @ v.double(), atol=1e-5, rtol=1e-3)


def test_natural_step_puts_the_quadratic_kl_model_at_the_radius_whatever_the_damping():
    """½ sᵀFs = δ with F undamped: CG solves (F + λI) x = g, and λ must not shrink the step (it did: with λ|x|² in the
    model, trpo.py's first steps reached a KL of 0.004-0.006 against δ = 0.01)."""
    torch.manual_seed(0)
    M = torch.randn(6, 3, dtype=torch.float64)
    F, g = M @ M.T, torch.randn(6, dtype=torch.float64)  # rank 3: singular, as a Fisher from few tokens is
    for damping in (0.01, 0.1, 1.0):
        x, _ = trpo.conjugate_gradient(lambda v: F @ v + damping * v, g, iters=50, tol=1e-20)
        s = trpo.natural_step(x, F @ x, max_kl=0.01)
        assert (0.5 * s @ F @ s).item() == pytest.approx(0.01, rel=1e-9)
        assert torch.allclose(s / s.norm(), x / x.norm())


def test_line_search_accepts_only_within_the_trust_region():
    w = torch.nn.Parameter(torch.zeros(3))
    evaluate = lambda: (w.sum().item(), (w**2).sum().item())  # surrogate, "KL"
    result = trpo.line_search([w], torch.ones(3), evaluate, 0.0, max_kl=0.1, steps=10, shrink=0.5)
    assert result["accepted"] and result["kl"] <= 0.1 and result["tries"] == 4  # 3·(1/8)² ≤ 0.1 < 3·(1/4)²
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.125))


def test_a_step_that_cannot_improve_is_rejected_and_parameters_are_restored_bitwise():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    before = parameters_to_vector(params).detach().clone()
    step = torch.randn_like(before) * 1e-3  # θ + s − s would not give back the same bits
    evaluate = lambda: (-1.0, 0.0)  # always worse than before
    result = trpo.line_search(params, step, evaluate, surrogate_before=0.0, max_kl=0.1, steps=5, shrink=0.7)
    assert not result["accepted"] and result["tries"] == 5
    assert torch.equal(parameters_to_vector(params), before)


def test_group_advantages_are_zero_for_a_group_of_equal_scores_whatever_the_lengths():
    """As in grpo.py: no second whitening over all tokens, which would shift every advantage by an
    amount that depends on the completions' lengths."""
    lengths = torch.tensor([3, 3, 3, 3, 3, 20, 20, 4])
    mask = (torch.arange(20)[None] < lengths[:, None]).long()
    advantages = trpo.group_advantages(torch.tensor([0.0, 0, 0, 0, 1, 0, 0, 0]), 4, mask)
    assert advantages[:4].abs().max() == 0
    z = 0.75 / (0.5 + 1e-4)  # group 2: (1 - mean 0.25) / (std 0.5 + eps)
    torch.testing.assert_close(advantages[4, :3], torch.full((3,), z), atol=1e-3, rtol=0)
    assert (advantages[mask == 0] == 0).all()


def test_surrogate_at_the_old_policy_is_the_mean_advantage():
    logprobs = torch.randn(2, 3)
    advantages, mask = torch.randn(2, 3), torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert trpo.surrogate(logprobs, logprobs, advantages, mask).item() == pytest.approx(
        common.masked_mean(advantages, mask).item())


def test_mean_kl_is_zero_for_the_same_distribution_and_matches_torch():
    log_p, log_q = torch.log_softmax(torch.randn(2, 3, 7), -1), torch.log_softmax(torch.randn(2, 3, 7), -1)
    mask = torch.ones(2, 3)
    assert trpo.mean_kl(log_p, log_p, mask).item() == 0.0
    expected = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum") / 6
    assert trpo.mean_kl(log_p, log_q, mask).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("arch, extra", [("gpt2", []), ("llama", ["--advantage", "group", "--group-size", "2",
                                                                  "--trust-region-layers", "1", "--gradient-checkpointing"])])
def test_trpo_runs_end_to_end(arch, extra, gpt2_folder, llama_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = gpt2_folder if arch == "gpt2" else llama_folder
    (tmp_path / "rewards.py").write_text("def short(completions, **kwargs):\n    return [-len(c) / 10 for c in completions]\n")
    extra = [*extra, "--reward-fn", f"{tmp_path / 'rewards.py'}:short"] if arch == "llama" else extra
    result = run_script("trpo.py", "--model", folder, "--task", "letter", "--steps", "2", "--prompts-per-step", "4",
                        "--eval-prompts", "4", "--run-name", "e2e", *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "e2e"
    critic = ["value/loss", "value/explained_variance"]  # gae only: --advantage group has no value head
    for tag in ["trpo/kl_after", "trpo/accepted", "trpo/line_search_tries", "trpo/cg_residual",
                "trpo/expected_improvement", "time/cg_s", *(critic if arch == "gpt2" else [])]:
        assert len(scalars(run_dir, tag)) == 2, tag
    AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint")
    assert (run_dir / "checkpoint" / "value_head.pt").is_file()
    if arch == "llama":
        assert len(scalars(run_dir, "reward/short")) == 2


@pytest.mark.parametrize("step", [
    {},  # the defaults: the step along the gradient (λ above F's curvature along it, one CG iteration)
    {"cg_damping": 1.0, "cg_iters": 10, "fisher_fraction": 1.0, "value_lr": 1e-3},  # the natural gradient
], ids=["defaults", "natural-gradient"])
def test_trpo_learns_the_letter_reward_and_every_accepted_step_is_in_the_trust_region(step, llama_folder, tmp_path):
    """All parameters under the trust region: the letter's share is a unigram change, made in the embeddings and LM
    head, which --trust-region-layers leaves out (with 2 layers, here every block, the score stayed at 0).
    Seeds 1-6 on this machine (2026-12-05): the last 10 of 40 steps scored 0.93-1.0 against 0.07-0.24 in the first
    10 with the natural gradient, 1.0 against 0.02-0.34 on the defaults (the test asks for +0.2), and 25-40 steps
    were accepted (it asks for 20: once every completion scores the same, the advantages are 0, no step improves L,
    and the line search rejects it, as it should)."""
    args = trpo.Args(model=llama_folder, task="letter", steps=40, max_kl=0.05, beta=0.001, missing_eos_penalty=None,
                     max_new_tokens=16, eval_interval=1000, eval_prompts=4, save_interval=1000,
                     output_dir=str(tmp_path), run_name="learn", seed=1, **step)
    run_dir = trpo.main(args)
    scores = scalars(run_dir, "objective/scores")
    assert sum(scores[-10:]) / 10 > sum(scores[:10]) / 10 + 0.2, scores
    accepted, kl_after = scalars(run_dir, "trpo/accepted"), scalars(run_dir, "trpo/kl_after")
    assert sum(accepted) >= 20
    assert all(kl <= 0.05 for a, kl in zip(accepted, kl_after) if a)


@pytest.mark.parametrize("argv, message", [
    (["--advantage", "group"], "needs --group-size ≥ 2"),
    (["--fisher-fraction", "0"], "--fisher-fraction 0.0: must be in (0, 1]"),
    (["--model", "./nowhere"], "--model ./nowhere: no such folder"),
])
def test_trpo_bad_input_fails_early_and_writes_nothing(argv, message, tmp_path):
    result = run_script("trpo.py", *argv, cwd=tmp_path)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
