import matplotlib; matplotlib.use("Agg")  # noqa: E702

# Notebook 03's density helpers: the evaluation grid, the exact smoothed density, the trapezoidal
# rule and the outlier count. The explorer: tests/widgets/test_spectral_density_explorer.py.

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hesskit.curvature.results import smoothed_density  # noqa: E402
from hesskit.experiments.spectral_density import count_outliers, density_grid, exact_density, integrate  # noqa: E402


def test_helpers():
    grid = density_grid(-1.0, 2.0, 0.1)
    assert grid[0] == pytest.approx(-1.5) and grid[-1] == pytest.approx(2.5)
    density = exact_density(np.array([-1.0, 0.0, 2.0]), grid, 0.1)
    assert integrate(density, grid) == pytest.approx(1.0, abs=1e-6)
    two = smoothed_density(np.array([0.0]), np.array([2.0]), grid, 0.1)
    assert integrate(two, grid) == pytest.approx(2.0, abs=1e-6)
    assert integrate(grid, grid) == pytest.approx((2.5**2 - 1.5**2) / 2)
    assert count_outliers(np.array([10.0, 9.0, 1.0, 0.9, 0.8, -1.0])) == 2
    assert count_outliers(np.linspace(0.1, 1.0, 30)) == 0
    with pytest.raises(ValueError, match="sigma"):
        smoothed_density(np.zeros(2), np.ones(2), grid, 0.0)
