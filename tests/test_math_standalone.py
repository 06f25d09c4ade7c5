"""Each math function of the four scripts runs when pasted alone into a file that imports torch:
its source is executed in a fresh namespace holding only `torch`, called, and compared with the
script's own function."""

import inspect
import textwrap

import pytest
import torch

import grpo
import ppo
import reward_model
import trpo

torch.manual_seed(0)
LOGP, OLD, REF = (torch.randn(3, 4) - 1 for _ in range(3))
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
ADV_SEQ, ADV_TOK, VALUES = torch.randn(3), torch.randn(3, 4), torch.randn(3, 4)
DIST_OLD, DIST_NEW = torch.log_softmax(torch.randn(3, 4, 5), -1), torch.log_softmax(torch.randn(3, 4, 5), -1)
W = torch.nn.Parameter(torch.zeros(3))
SPD = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
P = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
KL_GRAD = torch.autograd.grad((P**4).sum(), [P], create_graph=True)[0]  # Hessian diag(12 p²)

CALLS = {  # function: (args, kwargs)
    grpo.group_advantages: ((torch.tensor([1.0, 0.0, 0.5, 0.5]), 2), {}),
    grpo.overlong_penalty: ((torch.tensor([2, 3, 4]), 4, 2), {}),
    grpo.kl_penalty: ((LOGP, REF, OLD, "k3_ratio"), {}),
    grpo.grpo_loss: ((LOGP, OLD, ADV_SEQ, MASK), dict(kl=REF.exp(), beta=0.04, epsilon=0.2, epsilon_high=0.28,
                                                     loss_type="grpo", max_new_tokens=4,
                                                     importance_sampling_level="sequence")),
    ppo.whiten: ((VALUES, MASK), {"shift_mean": False}),
    ppo.per_token_rewards: ((LOGP, REF, ADV_SEQ, MASK), {"beta": 0.1}),
    ppo.gae: ((ADV_TOK, VALUES, MASK), {"gamma": 0.9, "lam": 0.95}),
    ppo.policy_loss: ((LOGP, OLD, ADV_TOK, MASK), {"cliprange": 0.2}),
    ppo.value_loss: ((VALUES, VALUES + 0.3, ADV_TOK, MASK), {"cliprange_value": 0.2}),
    ppo.adaptive_kl_coef: ((0.1, 8.0), {"target": 6.0, "horizon": 100, "n_steps": 16}),
    ppo.explained_variance: ((VALUES, ADV_TOK, MASK), {}),
    trpo.surrogate: ((LOGP, OLD, ADV_TOK, MASK), {}),
    trpo.mean_kl: ((DIST_OLD, DIST_NEW, MASK), {}),
    trpo.fisher_vector_product: ((KL_GRAD, [P], torch.tensor([1.0, 1.0])), {"damping": 0.1}),
    trpo.conjugate_gradient: ((lambda v: SPD @ v, torch.tensor([1.0, 2.0]), 5), {}),
    trpo.natural_step: ((torch.tensor([1.0, 2.0]), SPD @ torch.tensor([1.0, 2.0]), 0.01), {}),
    trpo.line_search: (([W], torch.ones(3), lambda: (W.sum().item(), (W**2).sum().item()), 0.0),
                       {"max_kl": 0.1, "steps": 10, "shrink": 0.5}),
    trpo.group_advantages: ((torch.tensor([1.0, 0.0, 0.0]), 3, MASK), {}),
    trpo.whiten: ((VALUES, MASK), {}),
    trpo.gae: ((ADV_TOK, VALUES, MASK), {"gamma": 1.0, "lam": 0.95}),
    trpo.explained_variance: ((VALUES, ADV_TOK, MASK), {}),
    reward_model.bradley_terry_loss: ((ADV_SEQ, ADV_SEQ.flip(0)), {}),
    reward_model.pairwise_accuracy: ((ADV_SEQ, ADV_SEQ.flip(0)), {}),
}


def test_every_math_function_is_covered():
    """The functions under each script's "The math" ruler are all in CALLS (a new one must be added)."""
    for module in (grpo, ppo, trpo, reward_model):
        source = inspect.getsource(module)
        math_section = source.split("# The math")[1].split("# ------------")[0]
        names = {line[4:].split("(")[0] for line in math_section.splitlines() if line.startswith("def ")}
        assert names and names <= {f.__name__ for f in CALLS if f.__module__ == module.__name__}, module.__name__


def flat(result):
    if isinstance(result, dict):
        return [v for v in result.values()]
    if isinstance(result, tuple):
        return [x for r in result for x in flat(r)]
    return [result]


@pytest.mark.parametrize("function", list(CALLS), ids=lambda f: f"{f.__module__}.{f.__name__}")
def test_math_function_runs_pasted_alone_beside_import_torch(function):
    args, kwargs = CALLS[function]
    namespace = {"torch": torch}
    exec(textwrap.dedent(inspect.getsource(function)), namespace)  # fails here on a name the file lacks...
    with torch.no_grad():
        W.zero_()
    pasted = namespace[function.__name__](*args, **kwargs)  # ... or here, when it is called
    with torch.no_grad():
        W.zero_()
    original = function(*args, **kwargs)
    for a, b in zip(flat(pasted), flat(original), strict=True):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b))
