"""BitMoD figures: labelled axes with units, and the series they promise."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from effllm_lib import results  # noqa: E402
from effllm_lib.bitmod import datatypes as dt  # noqa: E402
from effllm_lib.bitmod import plots  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_value_sets_one_row_per_type_special_value_in_red():
    fig = plots.value_sets(("fp4", "fp4_er_pos"))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fp4", "fp4_er_pos"]
    assert ax.get_xlabel().startswith("representable value")
    # collections: (all values, extra) per row; fp4 has no extra value, fp4_er_pos exactly one
    sizes = [len(c.get_offsets()) for c in ax.collections]
    assert sizes == [len(dt.grid("fp4").values), 0, len(dt.grid("fp4_er_pos").values), 1]


def test_synthetic_mse_panels_per_bits():
    fig = plots.synthetic_mse(results.load("bitmod", "synthetic_mse"))
    assert [ax.get_title() for ax in fig.axes] == ["3-bit, groups of 128", "4-bit, groups of 128"]
    assert fig.axes[0].get_ylabel() == "MSE / MSE of INT-asym (ratio)"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list(plots.MSE_ORDER)


def test_real_weights_shares_sum_to_one():
    real = pd.DataFrame({"dtype": ["int", "bitmod"] * 2, "bits": [3, 3, 4, 4], "relative_mse": [0.1, 0.05, 0.02, 0.01]})
    types = pd.DataFrame({"bits": [3, 3, 4, 4], "type": ["er_pos", "ea_neg"] * 2, "count": [3, 1, 2, 2]})
    fig = plots.real_weights(real, types, n_layers=2)
    a, b = fig.axes
    assert a.get_yscale() == "log" and a.get_ylabel() == "relative MSE (MSE / mean w², log)"
    assert b.get_ylabel() == "share of groups (fraction)"
    heights = sorted(round(p.get_height(), 3) for p in b.patches if p.get_height() > 0)
    assert heights == [0.25, 0.5, 0.5, 0.75]  # 3/4, 1/4 at 3 bits; 1/2, 1/2 at 4 bits


def test_cycle_ratios_panels_per_stage():
    cycles = results.load("bitmod", "accel_cycles")
    fig = plots.cycle_ratios(cycles)
    axes = [ax for ax in fig.axes if ax.get_ylabel()]
    assert len(axes) == cycles.stage.nunique()
    assert axes[0].get_ylabel() == "modelled / published cycles (ratio)"


@pytest.mark.parametrize("name, fn, ylabel", [
    ("accel_speedup", lambda t: plots.speedups(t, 256, 20), "speed-up over the FP16 accelerator (x)"),
    ("accel_energy", plots.energies, "energy / FP16 energy (ratio)"),
])
def test_stage_bars_heights_are_the_table(name, fn, ylabel):
    table = results.load("bitmod", name)
    fig = fn(table)
    axes = [ax for ax in fig.axes if ax.get_ylabel()]
    assert [ax.get_ylabel() for ax in axes] == [ylabel, ylabel]
    col = "prefill_speedup" if name == "accel_speedup" else "prefill_energy_vs_fp16"
    heights = sorted(round(p.get_height(), 6) for p in axes[0].patches if p.get_height() > 0)
    assert heights == sorted(round(v, 6) for v in table[col])


def test_sensitivity_one_panel_per_knob():
    sweeps = results.load("bitmod", "accel_sensitivity")
    fig = plots.sensitivity(sweeps)
    assert [ax.get_xlabel() for ax in fig.axes] == [plots.SENSITIVITY_LABELS[k] for k in dict.fromkeys(sweeps.knob)]
    assert len(fig.axes[0].get_lines()) == 2 * sweeps.over.nunique()


def test_small_models_axes():
    ax = plots.small_models(results.load("bitmod", "accel_small_models")).axes[0]
    assert ax.get_ylabel() == "generation speed-up over FP16 (x)"
