import numpy as np
import pytest

from effllm_lib import stats


def test_mean_interval_covers_the_normal_approximation():
    rng = np.random.default_rng(1)
    x = rng.normal(10, 2, size=400)
    est, lo, hi = stats.mean_ci(x, n_boot=4000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))           # textbook interval, independent of the code
    assert est == pytest.approx(x.mean())
    assert lo == pytest.approx(x.mean() - half, abs=0.06) and hi == pytest.approx(x.mean() + half, abs=0.06)


def test_pairing_narrows_the_interval_of_a_difference():
    rng = np.random.default_rng(2)
    difficulty = rng.random(500)
    a = (rng.random(500) < difficulty).astype(float)
    b = np.where(rng.random(500) < 0.05, 1 - a, a)            # b disagrees with a on ~5% of items
    _, lo, hi = stats.paired_difference_ci(a, b, n_boot=3000)
    # unpaired: the two accuracies' own binomial errors add up (independent reference)
    p = a.mean()
    unpaired_half = 1.96 * np.sqrt(2 * p * (1 - p) / len(a))
    assert hi - lo < unpaired_half                             # far narrower than the unpaired interval
    assert lo <= a.mean() - b.mean() <= hi


def test_grouped_difference_weights_groups_equally():
    a = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], float)
    b = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], float)
    groups = ["big"] * 8 + ["small"] * 2
    est, lo, hi = stats.group_mean_difference_ci(a, b, groups, n_boot=500)
    assert est == pytest.approx((0.0 + -1.0) / 2)               # mean of per-group differences, not -0.2
    assert lo <= est <= hi


def test_identical_inputs_give_a_zero_width_interval():
    x = np.ones(50)
    assert stats.paired_difference_ci(x, x, n_boot=200) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("args, msg", [
    (([1.0, 2.0], [1.0]), "same length"),
    (([],), "at least one item"),
    (([1.0, float("nan")],), "NaN"),
])
def test_bad_input(args, msg):
    with pytest.raises(ValueError, match=msg):
        stats.bootstrap_ci(lambda *a: 0.0, *args, n_boot=200)
