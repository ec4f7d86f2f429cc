"""SplitReason figures: labelled axes with units, and the series they promise."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from effllm_lib.offload import plots, rewards  # noqa: E402
from effllm_lib.offload import simulator as sim  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_speedup_vs_offload_one_line_per_pair():
    table = sim.speedup_table(sim.paper_pairs(), [0.0, 0.05, 0.1])
    fig = plots.speedup_vs_offload(table, "t", marks=(5, 10))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "tokens decoded by the big model (%)"
    assert ax.get_ylabel() == "speed-up over the big model alone (x)"
    lines = [l for l in ax.get_lines() if l.get_label() in set(table.pair)]
    assert len(lines) == table.pair.nunique()
    first = table[table.pair == lines[0].get_label()]
    np.testing.assert_allclose(lines[0].get_xdata(), 100 * first.coverage)
    np.testing.assert_allclose(lines[0].get_ydata(), first.speedup)


def test_coverage_curve_matches_the_library_on_known_texts():
    r, curve = plots.coverage_reward_curve()
    for frac in (0.1, 0.4, 0.7):
        inside = int(frac * 1000)
        text = "<bigmodel>" + "x" * inside + "</bigmodel>" + "y" * (1000 - 21 - inside)
        assert rewards.coverage_reward(text) == pytest.approx(np.interp(rewards.coverage(text), r, curve), abs=1e-9)


def test_reward_shapes_axes():
    fig = plots.reward_shapes()
    a, b = fig.axes
    assert a.get_xlabel() == "characters inside <bigmodel> tags (%)"
    assert b.get_ylabel() == "tag-count term"
    # hand-computed: (0.5 n if n <= 8 else 4 - 0.5 (n - 8)) // 2 -> 0 for n = 3, 1 for n = 4, 2 for n = 8
    ys = b.get_lines()[0].get_ydata()
    assert (ys[3], ys[4], ys[8]) == (0, 1, 2)


def test_accuracy_vs_offload_plots_every_mode_with_its_interval():
    import pandas as pd

    summary = pd.DataFrame([
        {"mode": "small only", "kind": "small", "pass@1": 0.1, "ci_lo": 0.0, "ci_hi": 0.3, "big_token_pct": 0.0},
        {"mode": "big only", "kind": "big", "pass@1": 0.5, "ci_lo": 0.3, "ci_hi": 0.7, "big_token_pct": 100.0},
        {"mode": "entropy 30%", "kind": "entropy", "pass@1": 0.3, "ci_lo": 0.1, "ci_hi": 0.5, "big_token_pct": 28.0},
        {"mode": "entropy 15%", "kind": "entropy", "pass@1": 0.2, "ci_lo": 0.0, "ci_hi": 0.4, "big_token_pct": 14.0}])
    fig = plots.accuracy_vs_offload(summary, "t")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "tokens written by the big model (%)" and ax.get_ylabel() == "pass@1 (%)"
    ent = [c for c in ax.containers if c.get_label() == "entropy trigger"][0].lines[0]
    np.testing.assert_allclose(np.asarray(ent.get_xdata(), dtype=float), [14.0, 28.0])  # sorted by offload
    np.testing.assert_allclose(np.asarray(ent.get_ydata(), dtype=float), [20.0, 30.0])
    assert len(ax.get_legend().get_texts()) == 3
    with_assisted = pd.concat([summary, pd.DataFrame([{"mode": "assisted", "kind": "assisted", "pass@1": 0.5,
                                                       "ci_lo": 0.3, "ci_hi": 0.7, "big_token_pct": 100.0,
                                                       "drafted_pct": 40.0}])], ignore_index=True)
    ax = plots.accuracy_vs_offload(with_assisted).axes[0]
    a = [c for c in ax.containers if c.get_label().startswith("assisted")][0].lines[0]
    np.testing.assert_allclose(np.asarray(a.get_xdata(), dtype=float), [60.0])
    with pytest.raises(ValueError, match="columns"):
        plots.accuracy_vs_offload(summary.drop(columns="ci_lo"))
