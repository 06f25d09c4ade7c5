"""docs/walkthrough.md stays true: its links name functions at the lines given, and its worked
examples are the numbers the project's functions produce."""

import ast
import math
import re
from pathlib import Path

import torch

import grpo
import ppo
import reward_model

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "walkthrough.md"
LINK = re.compile(r"\[`(\w+)\.(\w+)`\]\(\.\./([\w/]+)\.py#L(\d+)-L(\d+)\)")  # plumbing.x may link plumbing/models.py


def fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def function_lines(module: str, name: str) -> tuple[int, int]:
    """(first line, last line) of a top-level function, decorators included."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return start, node.end_lineno


def token_weights(loss_type: str, lengths: list[int], advantages: list[float], max_new_tokens: int) -> list[float]:
    """d loss / d log π of the first token of each completion, at ratio 1 (each batch used once)."""
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    logprobs = torch.zeros(mask.shape, requires_grad=True)
    loss, _ = grpo.grpo_loss(logprobs, logprobs.detach(), torch.tensor(advantages), mask, beta=0.0, epsilon=0.2,
                             epsilon_high=0.2, loss_type=loss_type, max_new_tokens=max_new_tokens)
    (grad,) = torch.autograd.grad(loss, logprobs)
    return grad[:, 0].tolist()


def worked_examples() -> dict[str, str]:
    """Each number the walkthrough shows, computed with the project's own functions."""
    one = torch.tensor
    pg = torch.zeros(2, 2, requires_grad=True)  # two completions of 2 and 1 tokens, A = +1 and −1
    pg_loss, _ = grpo.grpo_loss(pg, pg.detach(), one([1.0, -1.0]), one([[1, 1], [1, 0]]), beta=0.0, epsilon=0.2,
                                epsilon_high=0.2, loss_type="grpo", max_new_tokens=2)
    (pg_grad,) = torch.autograd.grad(pg_loss, pg)
    rewards, mask = one([[0.0, 0.0, 0.0, 0.8]]), torch.ones(1, 4)
    advantages, returns = ppo.gae(rewards, torch.zeros(1, 4), mask, gamma=0.9, lam=1.0)
    advantages_v, _ = ppo.gae(rewards, torch.full((1, 4), 0.5), mask, gamma=0.9, lam=1.0)
    group = one([1.0, 0.0, 0.0, 1.0])
    return {
        "BT_EXAMPLE": f"{reward_model.bradley_terry_loss(one([1.0]), one([0.0])).item():.4f}",
        "BT_TIE": f"{reward_model.bradley_terry_loss(one([0.0]), one([0.0])).item():.4f}",
        "GAE_REWARDS": fmt(rewards[0].tolist()),
        "GAE_ADVANTAGES": fmt(advantages[0].tolist()),
        "GAE_RETURNS": fmt(returns[0].tolist()),
        "GAE_ADVANTAGES_V": fmt(advantages_v[0].tolist()),
        "GROUP_REWARDS": fmt(group.tolist()),
        "GROUP_ADVANTAGES": fmt(grpo.group_advantages(group, 4).tolist()),
        "K3_EXAMPLE": f"{grpo.kl_penalty(one(-1.0), one(-1.5), one(-1.0)).item():.4f}",
        "K1_EXAMPLE": f"{grpo.kl_penalty(one(-1.0), one(-1.5), one(-1.0), 'k1').item():.4f}",
        "PG_GRAD": fmt(pg_grad[one([[1, 1], [1, 0]]).bool()].tolist()),
        "WHITEN_EXAMPLE": fmt(ppo.whiten(one([[1.0, 3.0]]), torch.ones(1, 2))[0].tolist()),
        "LENGTH_WEIGHTS_GRPO": fmt([-w for w in token_weights("grpo", [2, 4], [1.0, 1.0], 4)]),
        "LENGTH_WEIGHTS_DR": fmt([-w for w in token_weights("dr_grpo", [2, 4], [1.0, 1.0], 4)]),
        "LENGTH_WEIGHTS_DAPO": fmt([-w for w in token_weights("dapo", [2, 4], [1.0, 1.0], 4)]),
    }


def test_every_link_names_a_function_at_those_lines():
    links = LINK.findall(DOC.read_text())
    assert len(links) >= 30
    for module, name, file, start, end in links:
        assert file == module or file.startswith(module + "/"), f"{module}.{name} links to {file}.py"
        assert function_lines(file, name) == (int(start), int(end)), f"{module}.{name}: update its line range"


def test_every_section_a_docstring_names_is_a_section_of_the_walkthrough():
    """Each "§N (Title)" in a script's docstring names section N of docs/walkthrough.md by its title."""
    sections = dict(re.findall(r"^## (\d+)\. (.+)$", DOC.read_text(), re.M))
    files = [*ROOT.glob("*.py"), *ROOT.glob("plumbing/*.py")]
    references = [(f.name, n, title) for f in files for n, title in re.findall(r"§(\d+) \(([^)]*)\)", f.read_text())]
    assert len(references) >= 7  # grpo.py, ppo.py and trpo.py name two sections each, reward_model.py one
    for file, n, title in references:
        assert sections.get(n) == title, f"{file}: §{n} ({title}) is not a section; the walkthrough has {sections}"


def test_every_worked_example_is_what_the_code_computes():
    text = DOC.read_text()
    for key, value in worked_examples().items():
        assert value in text, f"{key}: the code gives {value}"


def test_the_gae_example_is_the_discounted_reward():
    # λ = 1 and V = 0: A_t = γ^(3−t) · 0.8, so the doc's numbers are the textbook ones.
    expected = fmt([0.9**3 * 0.8, 0.9**2 * 0.8, 0.9 * 0.8, 0.8])
    assert worked_examples()["GAE_ADVANTAGES"] == expected
    assert worked_examples()["BT_TIE"] == f"{math.log(2):.4f}"
