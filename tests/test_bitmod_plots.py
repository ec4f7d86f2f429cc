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


def _summary_and_orderings():
    # a hand-made table: two methods, clip off/on, one calibrated; KL and ratios with known intervals
    summary = pd.DataFrame([
        {"config": "float", "dtype": "float", "bits": 16, "clip": False, "calibration": "none", "kl": 0.0,
         "kl_lo": 0.0, "kl_hi": 0.0},
        *[{"config": f"{m}3{'+clip' if c else ''}", "dtype": m, "bits": 3, "clip": c, "calibration": "none",
           "kl": k, "kl_lo": k * 0.9, "kl_hi": k * 1.1}
          for m, c, k in (("ant", False, 0.5), ("ant", True, 0.4), ("bitmod", False, 0.3), ("bitmod", True, 0.2))],
        {"config": "bitmod3+clip+awq", "dtype": "bitmod", "bits": 3, "clip": True, "calibration": "awq",
         "kl": 0.15, "kl_lo": 0.1, "kl_hi": 0.2}])
    orderings = pd.DataFrame([
        {"bits": 3, "clip": c, "calibration": "none", "comparison": "ant vs bitmod", "ppl_ratio": r,
         "ppl_ratio_lo": r - 0.05, "ppl_ratio_hi": r + 0.05} for c, r in ((False, 1.3), (True, 1.2))])
    return summary, orderings


def test_kl_by_config_one_errorbar_per_config_with_the_interval():
    summary, _ = _summary_and_orderings()
    fig = plots.kl_by_config(summary, bits=(3,))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and "nats" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ant", "bitmod"]
    # each errorbar container: the point and its vertical interval ends
    points = sorted(float(c.lines[0].get_ydata()[0]) for c in ax.containers)
    assert points == [0.15, 0.2, 0.3, 0.4, 0.5]
    with pytest.raises(ValueError, match="4-bit"):
        plots.kl_by_config(summary, bits=(4,))


def test_paired_ratios_show_each_clip_setting_with_its_interval():
    _, orderings = _summary_and_orderings()
    fig = plots.paired_ratios(orderings)
    ax = fig.axes[0]
    assert "paired 95% interval" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["ant / bitmod"]
    xs = sorted(float(c.lines[0].get_xdata()[0]) for c in ax.containers)
    assert xs == [1.2, 1.3]
    segs = ax.containers[0].lines[2][0].get_segments()  # the horizontal interval of the first series
    assert [round(float(v), 6) for v in segs[0][:, 0]] == [1.25, 1.35]
    with pytest.raises(ValueError, match="no orderings"):
        plots.paired_ratios(orderings, calibration="awq")
