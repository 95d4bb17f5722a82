import matplotlib; matplotlib.use("Agg")  # noqa: E702

# Notebook 03's DensityExplorer, driven through every control's extreme values (an exception
# inside a widget's Output would not fail nbmake, so the callbacks are tested here), and the SLQ
# progress it reports. Its density helpers: tests/experiments/test_spectral_density.py.

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.experiments.spectral_density import integrate  # noqa: E402
from hesskit.widgets.spectral_density import DensityExplorer  # noqa: E402

OUTLIERS = (5.0, 7.0, 9.0)


def spiked(n: int = 120, seed: int = 0, outliers=OUTLIERS) -> tuple[torch.Tensor, np.ndarray]:
    """A random symmetric matrix with a bulk in [-0.1, 0.5] and well-separated outliers."""
    gen = torch.Generator().manual_seed(seed)
    bulk = torch.rand(n - len(outliers), generator=gen, dtype=torch.float64) * 0.6 - 0.1
    eigenvalues = torch.cat([bulk, torch.tensor(outliers, dtype=torch.float64)])
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (Q * eigenvalues) @ Q.T, np.sort(eigenvalues.numpy())


def integral(result: dict, key: str) -> float:
    return integrate(result[key], result["grid"])


def test_density_explorer_over_its_controls():
    A, eigs = spiked()
    B, _ = spiked(outliers=())
    explorer = DensityExplorer({"spiked": A, "bulk only": B}, num_runs=3, num_steps=10, sigma=0.01)
    explorer.show()
    first = explorer.result
    np.testing.assert_allclose(first["eigenvalues"], eigs, atol=1e-10)
    assert first["name"] == "spiked" and first["n"] == 120 and first["outliers"] == 3
    assert first["nodes"].shape == first["weights"].shape == (3, 10)
    assert first["num_matvecs"] == 30

    controls = explorer.controls
    assert set(controls) == {"weights", "num_runs", "num_steps", "sigma"}
    assert (controls["num_runs"].min, controls["num_runs"].max) == (1, 20)
    assert (controls["num_steps"].min, controls["num_steps"].max) == (5, 100)

    def check(r: dict, runs: int, steps: int, sigma: float) -> None:
        assert r["nodes"].shape == (runs, steps) and r["num_matvecs"] == runs * steps
        np.testing.assert_allclose(r["weights"].sum(axis=1), 1.0, atol=1e-10)
        # Ritz values interlace: every node lies inside the spectrum
        assert r["nodes"].min() >= eigs[0] - 1e-9 and r["nodes"].max() <= eigs[-1] + 1e-9
        np.testing.assert_allclose(r["sigma"], sigma * (eigs[-1] - eigs[0]), rtol=1e-9)
        # both smoothed densities are probability densities on the grid
        assert abs(integral(r, "exact") - 1) < 1e-3 and abs(integral(r, "estimate") - 1) < 1e-3
        assert (r["estimate"] >= 0).all() and 0 <= r["l1"] <= 2
        # Gauss quadrature is exact for degree < 2m, so each run's f(t) = t^2 estimate is a
        # Hutchinson estimate: the mean is within a few standard errors of ||A||_F^2
        frob, err, exact = r["frobenius"]
        np.testing.assert_allclose(exact, (eigs**2).sum(), rtol=1e-10)
        if runs > 1:
            assert abs(frob - exact) < 4 * err
        # the outliers are extreme and well separated: 20 steps find the largest exactly
        if steps >= 20:
            np.testing.assert_allclose(r["nodes"].max(axis=1), OUTLIERS[-1], rtol=1e-8)

    # every slider to its minimum and maximum, through the setters (each one re-renders)
    for name in ("num_runs", "num_steps", "sigma"):
        control = controls[name]
        for end in (control.min, control.max):
            control.value = 10.0**end if name == "sigma" else end
            v = explorer.values()
            check(explorer.result, v["num_runs"], v["num_steps"], v["sigma"])
            assert explorer.figure.axes[0].get_xlabel() == "eigenvalue λ of the Hessian"
            assert explorer.figure.axes[0].get_yscale() == "log"
            assert explorer.output.outputs[0]["data"]["image/png"]

    # every corner of (runs, steps, sigma), computed without drawing
    l1 = {}
    for runs in (1, 20):
        for steps in (5, 100):
            for sigma in (1e-3, 1e-1):
                r = explorer.compute(num_runs=runs, num_steps=steps, sigma=sigma, weights="spiked")
                check(r, runs, steps, sigma)
                l1[runs, steps, sigma] = r["l1"]
    # more runs and steps help, a sharper smoothing is harder to match
    assert l1[20, 100, 0.1] < l1[1, 5, 0.1] and l1[20, 100, 0.001] < l1[1, 5, 0.001]
    assert l1[20, 100, 0.1] < l1[20, 100, 0.001]
    assert l1[20, 100, 0.1] < 0.05

    # a fixed seed: the first run of a 20-run answer is the 1-run answer
    many = explorer.compute(num_runs=20, num_steps=30, sigma=0.01, weights="spiked")["nodes"]
    one = explorer.compute(num_runs=1, num_steps=30, sigma=0.01, weights="spiked")["nodes"]
    np.testing.assert_allclose(one[0], many[0])

    for name in controls["weights"].options:
        controls["weights"].value = name
        assert explorer.result["name"] == name
        assert explorer.result["outliers"] == (3 if name == "spiked" else 0)


def test_steps_beyond_n_give_the_exact_eigenvalues():
    A, eigs = spiked(n=40, seed=1)
    explorer = DensityExplorer({"small": A}, num_runs=2, num_steps=100, sigma=0.001)
    explorer.show()
    assert "weights" not in explorer.controls  # one matrix: no toggle
    r = explorer.result
    assert r["num_steps"] == 40
    for nodes in r["nodes"]:
        np.testing.assert_allclose(np.sort(nodes), eigs, atol=1e-9)


def test_explorer_on_a_real_hessian_with_given_eigenvalues():
    (x, y), _ = hk.data.digits(flatten=True)
    torch.manual_seed(0)
    model = hk.models.MLP(64, (3,), 10, activation="relu").double()
    H = hk.HessianOperator(model, nn.CrossEntropyLoss(), (x[:32].double(), y[:32])).dense()
    eig = torch.linalg.eigvalsh(H)
    explorer = DensityExplorer({"init": H}, eigenvalues={"init": eig}, num_runs=20, num_steps=30)
    explorer.show()
    r = explorer.result
    assert r["n"] == 75 * 3 + 10
    tr, err, exact = r["trace"]
    np.testing.assert_allclose(exact, torch.trace(H).item(), rtol=1e-9)
    assert abs(tr - exact) < 4 * err


def test_explorer_rejects_bad_hessians():
    with pytest.raises(ValueError, match="hessians"):
        DensityExplorer({})
    with pytest.raises(ValueError, match="square"):
        DensityExplorer({"bad": torch.zeros(3, 4)})


def test_explorer_reports_slq_progress_and_keeps_the_answer(progress_to):
    A, _ = spiked()
    explorer = DensityExplorer({"spiked": A}, num_runs=2, num_steps=10)
    reports = []
    progress_to(lambda done, total, what: reports.append((done, total)))
    r = explorer.compute(num_runs=3, num_steps=12, sigma=0.01)
    assert [done for done, _ in reports][:36] == list(range(1, 37)) and reports[-1] == (36, 36)
    assert {total for _, total in reports} == {36}
    # progress changes nothing: the same probes, products and quadrature as without it
    direct = hk.spectral_density(A, num_runs=3, num_steps=12, seed=0)
    np.testing.assert_array_equal(r["nodes"], direct.nodes)
    np.testing.assert_array_equal(r["weights"], direct.weights)
    assert r["num_matvecs"] == direct.num_matvecs == 36
    # the status line of a rendering explorer shows the bar
    seen = []
    explorer.status.observe(lambda change: seen.append(change["new"]), names="value")
    explorer.controls["num_steps"].value = 30
    assert any("spectral density" in s and "<progress" in s for s in seen)
    assert explorer.status.value == ""
