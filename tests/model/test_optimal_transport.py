from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from model.optimal_transport import sinkhorn
from tests.model.reference import sinkhorn_reference, unit

ot = pytest.importorskip("ot", reason="POT is a test dependency: pip install POT")


def _problem(n: int, r: int = 16, s: int = 16, d: int = 32) -> tuple[torch.Tensor, ...]:
    """Costs 1 - <x_i, y_j> of random unit vectors and random positive marginals."""
    x, y = unit(n, r, d), unit(n, s, d)
    cost = 1 - torch.einsum("nrd,nsd->nrs", x, y)
    mu = torch.rand(n, r) + 0.05
    nu = torch.rand(n, s) + 0.05
    return cost, mu / mu.sum(-1, keepdim=True), nu / nu.sum(-1, keepdim=True)


@pytest.mark.parametrize("epsilon", [0.2, 0.05, 0.01])
def test_batched_matches_naive_per_pair_reference(epsilon: float) -> None:
    cost, mu, nu = _problem(4)
    result = sinkhorn(cost, mu, nu, epsilon=epsilon, max_iter=2000, tol=1e-6)
    assert bool(result.converged.all())
    for i in range(4):
        expected = sinkhorn_reference(cost[i], mu[i], nu[i], epsilon)
        assert_close(result.plan[i].double(), expected, atol=2e-6, rtol=1e-3)


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
@pytest.mark.parametrize(("epsilon", "shape"), [(0.05, (16, 16)), (0.1, (49, 49)), (0.05, (9, 25))])
def test_agrees_with_pot(epsilon: float, shape: tuple[int, int]) -> None:
    cost, mu, nu = _problem(2, *shape)
    result = sinkhorn(cost, mu, nu, epsilon=epsilon, max_iter=3000, tol=1e-6)
    for i in range(2):
        expected = ot.sinkhorn(
            mu[i].double().numpy(), nu[i].double().numpy(), cost[i].double().numpy(),
            reg=epsilon, method="sinkhorn_log", numItermax=5000, stopThr=1e-9,
        )  # fmt: skip
        np.testing.assert_allclose(result.plan[i].numpy(), expected, atol=2e-6, rtol=1e-3)


def test_marginals_of_the_plan() -> None:
    cost, mu, nu = _problem(32)
    result = sinkhorn(cost, mu, nu, epsilon=0.05, tol=1e-5, max_iter=500)
    assert bool(result.converged.all())
    assert_close(result.plan.sum(-1), mu, atol=1e-5, rtol=0)
    assert_close(result.plan.sum(-2), nu, atol=1e-6, rtol=0)
    assert_close(result.plan.sum((-2, -1)), torch.ones(32), atol=1e-5, rtol=0)
    assert float(result.marginal_error.max()) <= 1e-5


def test_batched_equals_one_at_a_time_and_keeps_batch_shape() -> None:
    cost, mu, nu = _problem(6)
    batched = sinkhorn(cost.view(2, 3, 16, 16), mu.view(2, 3, 16), nu.view(2, 3, 16), tol=1e-6)
    assert batched.plan.shape == (2, 3, 16, 16)
    assert batched.marginal_error.shape == (2, 3)
    for i in range(6):
        single = sinkhorn(cost[i], mu[i], nu[i], tol=1e-6)
        assert_close(batched.plan.view(6, 16, 16)[i], single.plan, atol=1e-6, rtol=1e-4)


def test_one_hot_marginals_send_all_mass_through_one_row_and_column() -> None:
    cost, _, nu = _problem(1)
    mu = torch.zeros(1, 16)
    mu[0, 3] = 1.0
    result = sinkhorn(cost, mu, nu, epsilon=0.05)
    assert not torch.isnan(result.plan).any()
    assert_close(result.plan[0, 3], nu[0], atol=1e-6, rtol=0)  # the one row carries nu exactly
    assert float(result.plan[0].sum() - result.plan[0, 3].sum()) < 1e-6
    both = torch.zeros(1, 16)
    both[0, 7] = 1.0
    single = sinkhorn(cost, mu, both, epsilon=0.05)
    assert float(single.plan[0, 3, 7]) == pytest.approx(1.0, abs=1e-6)


def test_identical_costs_give_a_diagonal_plan_for_distinct_parts() -> None:
    x = torch.eye(16)  # orthogonal parts: cost 0 on the diagonal, 1 elsewhere
    cost = 1 - x @ x.T
    uniform = torch.full((16,), 1 / 16)
    result = sinkhorn(cost, uniform, uniform, epsilon=0.05)
    assert_close(torch.diagonal(result.plan).sum(), torch.tensor(1.0), atol=1e-6, rtol=0)


def test_small_epsilon_stays_finite_where_a_plain_kernel_underflows() -> None:
    cost, mu, nu = _problem(4)
    epsilon = 0.005  # the plain kernel exp(-C / epsilon) underflows to 0 in fp32 here
    assert float(torch.exp(-cost.max() / epsilon)) == 0.0
    result = sinkhorn(cost, mu, nu, epsilon=epsilon, max_iter=2000, tol=1e-5)
    assert torch.isfinite(result.plan).all()
    assert_close(result.plan.sum(-2), nu, atol=1e-6, rtol=0)
    assert float(result.marginal_error.max()) < 1e-3


def test_half_precision_inputs_are_solved_in_fp32() -> None:
    cost, mu, nu = _problem(3)
    half = sinkhorn(cost.half(), mu.half(), nu.half(), tol=1e-5)
    full = sinkhorn(cost.half().float(), mu.half().float(), nu.half().float(), tol=1e-5)
    assert half.plan.dtype == torch.float32
    assert_close(half.plan, full.plan)


def test_non_convergence_is_reported() -> None:
    cost, mu, nu = _problem(2)
    result = sinkhorn(cost, mu, nu, epsilon=0.01, max_iter=2, tol=1e-9)
    assert result.iterations == 2
    assert not bool(result.converged.any())
    assert float(result.marginal_error.min()) > 1e-9


def test_stops_early_once_converged() -> None:
    cost, mu, nu = _problem(2)
    result = sinkhorn(cost, mu, nu, epsilon=0.2, max_iter=1000, tol=1e-4, check_every=5)
    assert result.iterations < 1000
    assert result.iterations % 5 == 0
    assert bool(result.converged.all())


def test_differentiable_when_autograd_is_on() -> None:
    cost, mu, nu = _problem(2)
    cost.requires_grad_(True)
    result = sinkhorn(cost, mu, nu, tol=1e-6)
    (result.plan * cost).sum().backward()
    assert cost.grad is not None
    assert torch.isfinite(cost.grad).all()


@pytest.mark.parametrize(
    ("cost", "mu", "nu"),
    [((16, 16), (15,), (16,)), ((16, 16), (16,), (3,)), ((16,), (16,), (16,))],
)
def test_shape_errors_name_the_expected_shapes(
    cost: tuple[int, ...], mu: tuple[int, ...], nu: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError, match=r"cost \(\.\.\., R, S\)"):
        sinkhorn(torch.rand(cost), torch.rand(mu), torch.rand(nu))


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    cost, mu, nu = _problem(8)
    cpu = sinkhorn(cost, mu, nu, tol=1e-6)
    gpu = sinkhorn(cost.cuda(), mu.cuda(), nu.cuda(), tol=1e-6)
    assert_close(gpu.plan.cpu(), cpu.plan, atol=1e-6, rtol=1e-4)


def test_cpu_chunking_gives_the_same_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    import model.optimal_transport

    cost, mu, nu = _problem(10)
    whole = sinkhorn(cost, mu, nu, tol=1e-6)
    # chunks of at most 3 problems: 4 chunks
    monkeypatch.setattr(model.optimal_transport, "_CPU_CHUNK_ELEMENTS", 3 * 16 * 16)
    chunked = sinkhorn(cost, mu, nu, tol=1e-6)
    assert_close(chunked.plan, whole.plan, atol=1e-6, rtol=1e-4)
    assert chunked.marginal_error.shape == (10,)
