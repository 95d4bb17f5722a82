"""Estimators against exact answers; random ones by statistical tests with fixed seeds whose
tolerances come from the estimator's variance (each bound is derived where it is used)."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import KINDS, make_case, random_symmetric

import hesskit as hk

TRIALS = 400


def _rademacher_variance(A):
    """Var[z^T A z] for Rademacher z: 2 (||A||_F^2 - sum_i A_ii^2)."""
    return 2 * ((A**2).sum() - (A.diag() ** 2).sum()).item()


# ---------------------------------------------------------------- trace
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_and_its_stderr_is_calibrated(distribution):
    A = random_symmetric(40, seed=1, decay=0.97)
    m = 30
    results = [hk.trace(A, m, method="hutchinson", distribution=distribution, seed=s) for s in range(TRIALS)]
    values = np.array([r.value for r in results])
    stderrs = np.array([r.stderr for r in results])
    truth = A.trace().item()
    variance = _rademacher_variance(A) if distribution == "rademacher" else 2 * (A**2).sum().item()
    # the mean of TRIALS independent estimates has sd sqrt(variance / (m * TRIALS)): 4 sd
    assert abs(values.mean() - truth) <= 4 * math.sqrt(variance / (m * TRIALS))
    # E[stderr^2] = variance / m exactly; the spread of stderr^2 over trials gives its 4-sd band
    s2 = stderrs**2
    assert abs(s2.mean() - variance / m) <= 4 * s2.std() / math.sqrt(TRIALS)
    # nominal 95% intervals cover at the t_29 rate, 0.940; binomial sd over 400 trials 0.012: 4 sd
    covered = np.mean(np.abs(values - truth) <= 1.96 * stderrs)
    assert 0.940 - 0.048 <= covered <= min(0.940 + 0.048, 1.0)


def test_hutchpp_is_unbiased_covers_and_beats_hutchinson_on_decaying_spectra():
    A = random_symmetric(40, seed=2, decay=0.8)
    truth = A.trace().item()
    m = 60
    pp = [hk.trace(A, m, method="hutch++", seed=s) for s in range(TRIALS)]
    hutch = [hk.trace(A, m, method="hutchinson", seed=s) for s in range(TRIALS)]
    values = np.array([r.value for r in pp])
    assert abs(values.mean() - truth) <= 4 * values.std() / math.sqrt(TRIALS)
    # 20 residual probes: t_19 coverage at 1.96 is 0.935; binomial 4 sd over 400 trials 0.049
    covered = np.mean([abs(r.value - truth) <= 1.96 * r.stderr for r in pp])
    assert 0.935 - 0.049 <= covered <= 1.0
    mse_pp = np.mean((values - truth) ** 2)
    mse_hutch = np.mean((np.array([r.value for r in hutch]) - truth) ** 2)
    assert mse_pp < 0.1 * mse_hutch
    assert all(r.num_matvecs == m for r in pp)


def test_hutchpp_is_exact_once_the_sketch_spans_the_space():
    A = random_symmetric(20, seed=3)
    result = hk.trace(A, num_matvecs=3 * 20, method="hutch++", seed=0)
    assert abs(result.value - A.trace().item()) < 1e-9
    assert result.stderr < 1e-9


@pytest.mark.parametrize("kind", list(KINDS))
def test_trace_of_curvature_operators(kind):
    case = make_case("cnn")
    op = KINDS[kind](case.model, case.criterion, case.batches)
    exact = op.dense().trace().item()
    for method in ("xtrace", "hutch++", "hutchinson"):
        result = hk.trace(op, num_matvecs=90, method=method, seed=0)
        assert abs(result.value - exact) <= 4 * result.stderr + 1e-10
        assert result.num_matvecs == 90 and result.seed == 0 and result.method == method
    assert 0 <= result.matvec_time <= result.wall_time and result.overhead_time >= 0


def test_seeds_reproduce_and_are_reported():
    A = random_symmetric(15)
    assert hk.trace(A, 9, seed=7).value == hk.trace(A, 9, seed=7).value
    first = hk.trace(A, 9)
    assert isinstance(first.seed, int) and hk.trace(A, 9, seed=first.seed).value == first.value
    state = torch.get_rng_state()
    hk.trace(A, 9, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched


def test_confidence_interval_uses_the_t_quantile_of_its_samples():
    result = hk.trace(random_symmetric(15), 30, method="hutchinson", seed=0)
    lo, hi = result.confidence_interval(0.95)
    assert result.num_samples == 30
    assert lo < result.value < hi and math.isclose(hi - result.value, 2.045230 * result.stderr, rel_tol=1e-5)
    assert hk.trace(random_symmetric(15), 30, method="hutch++", seed=0).num_samples == 10
    assert all(math.isnan(b) for b in hk.trace(random_symmetric(15), 3, method="hutch++", seed=0).confidence_interval())


# ---------------------------------------------------------------- diagonal
def test_diagonal_errors_match_their_stderr_and_the_theoretical_variance():
    A = random_symmetric(30, seed=4, decay=0.95)
    m = 2000
    result = hk.diagonal(A, num_matvecs=m, method="hutchinson", seed=0)
    z = (result.value - A.diag()) / result.stderr
    # 30 approximately normal z-scores: P(max |z| > 4.5) ~ 30 * 6.8e-6
    assert z.abs().max().item() < 4.5
    # Rademacher: Var[z_i (Az)_i] = sum_{j != i} A_ij^2. The relative sd of a sample variance
    # over m = 2000 near-normal samples is sqrt(2 / m) = 3.2%; 0.2 is over 6 sd
    theory = ((A**2).sum(1) - A.diag() ** 2) / m
    assert ((result.stderr**2 / theory) - 1).abs().max().item() < 0.2


def test_diagonal_is_exact_on_diagonal_matrices_with_rademacher_probes():
    A = torch.diag(torch.linspace(-2, 3, 12, dtype=torch.float64))
    result = hk.diagonal(A, num_matvecs=3, method="hutchinson", seed=0)
    assert torch.allclose(result.value, A.diag()) and result.stderr.abs().max() < 1e-14  # rounding only


def test_diagonal_of_a_curvature_operator():
    case = make_case("layernorm")
    op = hk.HessianOperator(case.model, case.criterion, case.batches)
    exact = op.dense().diag()
    for method in ("xdiag", "hutchinson"):
        result = hk.diagonal(op, num_matvecs=64, method=method, seed=1)
        z = (result.value - exact) / result.stderr.clamp_min(1e-12)
        assert result.value.shape == exact.shape and z.abs().max().item() < 5.5  # ~100 entries, 64 probes


# ---------------------------------------------------------------- eigenvalues
def _check_pairs(A, result):
    exact = torch.linalg.eigvalsh(A)
    for value, vector, residual in zip(result.values, result.vectors.T, result.residuals):
        true_residual = (A @ vector - value * vector).norm()
        assert abs(true_residual - residual) <= 1e-6 * residual + 1e-10 * exact.abs().max()
        assert (exact - value).abs().min() <= residual + 1e-12
    V = result.vectors
    assert torch.allclose(V.T @ V, torch.eye(V.shape[1], dtype=V.dtype), atol=1e-8)


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_lanczos_finds_the_extreme_eigenvalues(which):
    A = random_symmetric(80, seed=5, decay=0.93)
    exact = torch.linalg.eigvalsh(A)
    result = hk.eigenvalues(A, k=4, which=which, tol=1e-8, seed=0)
    expected = {
        "largest": exact.flip(0)[:4],
        "smallest": exact[:4],
        "magnitude": exact[exact.abs().argsort(descending=True)][:4],
    }[which]
    assert torch.allclose(result.values, expected, rtol=0, atol=1e-8 * exact.abs().max().item())
    assert result.converged.all() and result.which == which
    _check_pairs(A, result)


def test_thick_restart_converges_with_a_tiny_basis():
    A = random_symmetric(300, seed=6, decay=0.99, negative=False)
    result = hk.eigenvalues(A, k=5, tol=1e-9, basis_size=7, max_matvecs=5000, seed=0)
    exact = torch.linalg.eigvalsh(A).flip(0)[:5]
    assert result.converged.all()
    assert torch.allclose(result.values, exact, atol=1e-8)
    _check_pairs(A, result)


def test_lanczos_is_exact_when_the_basis_reaches_n():
    A = random_symmetric(12, seed=7)
    result = hk.eigenvalues(A, k=12, tol=1e-12, seed=0)
    assert torch.allclose(result.values, torch.linalg.eigvalsh(A).flip(0), atol=1e-10)


def test_unconverged_eigenpairs_are_reported_not_hidden():
    A = random_symmetric(200, seed=8, decay=0.999)
    with pytest.warns(UserWarning, match="did not reach tol"):
        result = hk.eigenvalues(A, k=3, tol=1e-12, max_matvecs=10, seed=0)
    assert not result.converged.all() and result.num_matvecs == 10


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", ["bn_cnn", "layernorm", "unused"])
def test_eigenvalues_of_curvature_operators(name, kind):
    case = make_case(name)
    op = KINDS[kind](case.model, case.criterion, case.batches)
    D = op.dense()
    exact = torch.linalg.eigvalsh(D)
    top = hk.eigenvalues(op, k=3, tol=1e-9, seed=0)
    assert torch.allclose(top.values, exact.flip(0)[:3], atol=1e-8 * exact.abs().max().item())
    _check_pairs(D, top)
    if kind == "hessian":  # negative curvature
        bottom = hk.eigenvalues(op, k=2, which="smallest", tol=1e-9, seed=0)
        assert torch.allclose(bottom.values, exact[:2], atol=1e-8 * exact.abs().max().item())


def test_power_iteration_finds_top_magnitude_eigenvalues_with_more_products_than_lanczos():
    A = random_symmetric(60, seed=9, decay=0.85)
    exact = torch.linalg.eigvalsh(A)
    expected = exact[exact.abs().argsort(descending=True)][:3]
    power = hk.power_iteration(A, k=3, max_iters=2000, tol=1e-6, seed=0)
    assert torch.allclose(power.values, expected, atol=1e-5 * expected.abs().max().item())
    assert power.converged.all() and power.method == "power_iteration"
    lanczos = hk.eigenvalues(A, k=3, which="magnitude", tol=1e-6, seed=0)
    assert lanczos.num_matvecs < power.num_matvecs


# ---------------------------------------------------------------- spectral density
def test_slq_weights_nodes_and_density():
    A = random_symmetric(50, seed=10, decay=0.9)
    exact = torch.linalg.eigvalsh(A).numpy()
    result = hk.spectral_density(A, num_runs=4, num_steps=12, seed=0)
    assert result.nodes.shape == result.weights.shape == (4, 12)
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, rtol=1e-12)
    assert result.nodes.min() >= exact.min() - 1e-9 and result.nodes.max() <= exact.max() + 1e-9
    grid = np.linspace(exact.min() - 5, exact.max() + 5, 20001)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    assert abs(trapezoid(result.density(grid, sigma=0.1), grid) - 1) < 1e-6
    assert result.num_matvecs == 48


def test_slq_with_n_steps_recovers_the_exact_spectrum():
    A = random_symmetric(25, seed=11)
    result = hk.spectral_density(A, num_runs=1, num_steps=25, seed=0)
    np.testing.assert_allclose(np.sort(result.nodes[0]), torch.linalg.eigvalsh(A).numpy(), atol=1e-9)


def test_slq_trace_estimates_are_unbiased_with_calibrated_stderr():
    A = random_symmetric(40, seed=12, decay=0.95)
    result = hk.spectral_density(A, num_runs=TRIALS, num_steps=6, seed=0)
    # With Rademacher probes each run of f(x) = x^2 is exactly z^T A^2 z (Gauss quadrature is
    # exact for degree < 2 * steps): Hutchinson on A^2, with variance 2(||A^2||_F^2 - sum diag^2)
    value, stderr = result.estimate_trace(lambda x: x**2)
    sd = math.sqrt(_rademacher_variance(A @ A) / TRIALS)
    assert abs(value - (A**2).sum().item()) <= 4 * sd
    # relative sd of a sample sd over 400 runs is about 1 / sqrt(2 * 400) = 3.5%: 20% is > 5 sd
    assert abs(stderr / sd - 1) < 0.2
    value, stderr = result.estimate_trace(lambda x: x)
    assert abs(value - A.trace().item()) <= 4 * math.sqrt(_rademacher_variance(A) / TRIALS)


def test_slq_on_a_curvature_operator_and_plot():
    import matplotlib

    matplotlib.use("Agg")
    case = make_case("mlp")
    op = hk.GGNOperator(case.model, case.criterion, case.batches)
    result = hk.spectral_density(op, num_runs=3, num_steps=10, seed=0)
    exact = torch.linalg.eigvalsh(op.dense())
    assert result.nodes.max() <= exact.max().item() + 1e-9
    ax = result.plot()
    assert ax.get_xlabel() == "eigenvalue" and ax.get_ylabel() == "density"


# ---------------------------------------------------------------- bad input
def test_estimators_reject_bad_arguments():
    A = random_symmetric(10)
    with pytest.raises(ValueError, match="num_matvecs"):
        hk.trace(A, num_matvecs=0)
    with pytest.raises(ValueError, match="num_matvecs"):
        hk.trace(A, num_matvecs=2, method="hutch++")
    with pytest.raises(ValueError, match="method"):
        hk.trace(A, method="xtrace++")
    with pytest.raises(ValueError, match="distribution"):
        hk.diagonal(A, distribution="uniform")
    with pytest.raises(ValueError, match="num_matvecs"):
        hk.diagonal(A, num_matvecs=-1)
    with pytest.raises(ValueError, match="k: expected at most"):
        hk.eigenvalues(A, k=11)
    with pytest.raises(ValueError, match="k: "):
        hk.eigenvalues(A, k=0)
    with pytest.raises(ValueError, match="which"):
        hk.eigenvalues(A, which="LM")
    with pytest.raises(ValueError, match="tol"):
        hk.eigenvalues(A, tol=0)
    with pytest.raises(ValueError, match="num_steps"):
        hk.spectral_density(A, num_steps=11)
    with pytest.raises(ValueError, match="num_runs"):
        hk.spectral_density(A, num_runs=0)
    with pytest.raises(ValueError, match="seed"):
        hk.trace(A, seed=-1)
    with pytest.raises(TypeError, match="op"):
        hk.trace(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="nan"):
        hk.trace(torch.full((4, 4), float("nan")), 3, method="hutchinson")


def test_numpy_numbers_are_accepted_and_give_the_same_results():
    """Sweeps written with np.arange / np.logspace pass numpy integers and floats."""
    A = random_symmetric(12)
    assert hk.trace(A, num_matvecs=np.int64(9), seed=np.int64(3)).value == hk.trace(A, num_matvecs=9, seed=3).value
    assert torch.equal(hk.diagonal(A, num_matvecs=np.int32(5), seed=np.uint8(1)).value,
                       hk.diagonal(A, num_matvecs=5, seed=1).value)
    ours, plain = hk.eigenvalues(A, k=np.int64(2), seed=np.int64(0)), hk.eigenvalues(A, k=2, seed=0)
    assert torch.equal(ours.values, plain.values) and ours.seed == 0 and type(ours.seed) is int
    assert hk.spectral_density(A, num_runs=np.int64(2), num_steps=np.int64(4), seed=0).nodes.shape == (2, 4)
    p = torch.nn.Parameter(torch.ones(3))
    opt = hk.optim.AdaHessian([p], lr=np.float32(0.1), update_every=np.int64(2), seed=np.int64(1))
    assert opt.update_every == 2 and type(opt.update_every) is int
    opt.step(lambda: (p**2).sum())
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)  # plain Python numbers: loadable with weights_only=True
    saved.seek(0)
    assert torch.load(saved, weights_only=True)["param_groups"][0]["lr"] == pytest.approx(0.1)
    assert hk.MFACInverseOperator(3, num_grads=np.int64(2), damping=np.float32(1e-3)).num_grads == 2
    for bad in (np.bool_(True), True, 2.0, np.float64(2.0)):
        with pytest.raises(ValueError, match="num_matvecs"):
            hk.trace(A, num_matvecs=bad)


def test_no_warnings_on_the_happy_path():
    case = make_case("mlp")
    op = hk.HessianOperator(case.model, case.criterion, case.batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hk.eigenvalues(op, k=2, seed=0)
        hk.trace(op, seed=0)


def test_lanczos_does_not_stop_on_the_second_eigenvalue_with_a_loose_tolerance():
    """Two close top eigenvalues and a loose tol: a tiny Krylov space can hold a Ritz value with a
    small residual near lambda_2; the minimum of k + 5 steps must still find lambda_1."""
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(200, 200, generator=gen, dtype=torch.float64)).Q
    eig = torch.cat([torch.tensor([1.0, 0.86], dtype=torch.float64), 0.05 * torch.rand(198, generator=gen, dtype=torch.float64)])
    A = (Q * eig) @ Q.T
    for seed in range(20):
        result = hk.eigenvalues(A, k=1, tol=1e-2, seed=seed)
        assert abs(result.values[0].item() - 1.0) < 2e-2, seed


def test_lanczos_warm_start():
    A = random_symmetric(60, seed=13, decay=0.9, negative=False)
    cold = hk.eigenvalues(A, k=1, tol=1e-10, seed=0)
    warm = hk.eigenvalues(A, k=1, tol=1e-10, start=cold.vectors[:, 0] + 1e-6 * torch.randn(60, dtype=torch.float64))
    assert torch.allclose(warm.values, cold.values, atol=1e-9) and warm.num_matvecs <= cold.num_matvecs
    with pytest.raises(ValueError, match="start"):
        hk.eigenvalues(A, k=1, start=torch.zeros(60, dtype=torch.float64))


def test_power_iteration_reports_the_vector_it_returns_when_out_of_iterations():
    A = random_symmetric(50, seed=14, decay=0.99, negative=False)
    with pytest.warns(UserWarning, match="did not reach tol"):
        result = hk.power_iteration(A, k=2, max_iters=5, tol=1e-12, seed=0)
    for value, vector, residual in zip(result.values, result.vectors.T, result.residuals):
        assert torch.isclose(vector @ A @ vector, value, atol=1e-12)
        assert torch.isclose((A @ vector - value * vector).norm(), residual, atol=1e-12)


def test_a_tolerance_below_the_dtype_precision_warns():
    A = random_symmetric(30, seed=15).float()
    with pytest.warns(UserWarning, match="float32"):
        hk.eigenvalues(A, k=1, tol=1e-8, seed=0)
