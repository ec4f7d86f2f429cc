"""PQA figures: labelled axes with units, and the series they promise, on the committed sweeps."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from effllm_lib.pq import plots, sweeps  # noqa: E402


@pytest.fixture(scope="module")
def df():
    return sweeps.seed_mean(sweeps.load_committed())  # one row per configuration, as the notebook plots it


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_accuracy_vs_shape_lines_are_the_grid(df):
    grid = df[df.experiment == "grid"]
    fig = plots.accuracy_vs_shape(grid)
    assert len(fig.axes) == grid.network.nunique()
    ax = fig.axes[0]
    net = ax.get_title()
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("prototypes per subspace N_p", "top-1 accuracy (%)")
    g = grid[(grid.network == net) & (grid["mode"] == "both")]
    l_s = g.subvec_len.min()
    line = next(l for l in ax.get_lines() if l.get_label() == f"L_s {l_s:g}, fine-tuned")
    np.testing.assert_allclose(line.get_ydata(), g[g.subvec_len == l_s].sort_values("n_prototypes").accuracy)


def test_layer_mse_log_axes(df):
    ax = plots.layer_mse(df[df.experiment == "grid"]).axes[0]
    assert ax.get_ylabel() == "mean layer-output MSE (activation units²)"
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"


def test_training_modes_one_panel_per_network(df):
    modes = df[df.experiment == "modes"]
    fig = plots.training_modes(modes)
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == list(modes.network.unique())
    assert fig.axes[0].get_ylabel() == "top-1 accuracy (%)"


def test_bit_width_drops_cells_are_reference_minus_accuracy(df):
    bits = df[df.experiment == "bits"]
    ref = df[(df.experiment == "lowbit") & df.proto_bits.isna()].set_index("network").accuracy
    fig = plots.bit_width_drops(bits, ref)
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("LUT entry bits", "prototype bits")
    net = ax.get_title()
    b = bits[bits.network == net]
    cell = b[(b.proto_bits == 8) & (b.lut_bits == 8)].accuracy.iloc[0]
    assert f"{ref[net] - cell:.1f}" in {t.get_text() for t in ax.texts}


def test_encoding_cells_one_star_per_prototype():
    import torch
    pairs, protos = torch.rand(200, 2) * 2, torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.5]])
    ax = plots.encoding_cells(pairs, protos).axes[0]
    stars = ax.collections[1].get_offsets()
    np.testing.assert_allclose(stars, protos.numpy())
    assert ax.get_xlabel() == "pixel 1 (normalized intensity, a.u.)"
    # the cell image assigns each grid point to its nearest prototype: the corner (0, 0) is prototype 0's
    assert ax.images[0].get_array()[0, 0] == 0


def test_prototypes_and_lut_shapes():
    import torch.nn as nn
    from effllm_lib.pq import PQConfig, PQConv2d
    layer = PQConv2d.from_dense(nn.Conv2d(1, 8, 3, padding=1), PQConfig(n_prototypes=16, subvec_len=9)).eval()
    fig = plots.prototypes_and_lut(layer)
    assert fig.axes[0].images[0].get_array().shape == (12, 12)  # 4 x 4 patches of 3 x 3
    assert fig.axes[1].images[0].get_array().shape == (16, 8)
    assert fig.axes[2].get_ylabel() == "table entry (activation units)"


def test_pq_error_lines_per_subvector_length():
    import pandas as pd
    err = pd.DataFrame({"L_s": [2, 2, 9, 9], "N_p": [4, 16, 4, 16], "relative MSE": [0.1, 0.05, 0.4, 0.3]})
    ax = plots.pq_error(err, 72).axes[0]
    assert [l.get_label() for l in ax.get_lines()] == ["L_s = 2", "L_s = 9"]
    assert ax.get_ylabel() == "relative output MSE (unitless)" and "72 inputs" in ax.get_title()


def test_pareto_front_hand_case():
    from effllm_lib.pq.pareto import pareto_front
    # (perf, acc): b dominates a; c and d trade off; e ties d on both axes (neither dominates)
    perf = [1.0, 2.0, 3.0, 0.5, 0.5]
    acc = [50.0, 60.0, 40.0, 90.0, 90.0]
    assert pareto_front(perf, acc) == [False, True, True, True, True]
    with pytest.raises(ValueError):
        pareto_front([1.0], [])


def test_accuracy_vs_perf_per_area_front_and_stars():
    import pandas as pd
    pts = pd.DataFrame({"network": ["kws"] * 4, "n_prototypes": [4, 8, 16, 32], "subvec_len": [4, 4, 4, 2],
                        "accuracy": [50.0, 70.0, 80.0, 60.0], "float_accuracy": [90.0] * 4,
                        "perf_per_area": [2.0, 1.5, 1.0, 0.5], "paper_setting": [False, False, True, False],
                        "on_front": [True, True, True, False]})
    ax = plots.accuracy_vs_perf_per_area(pts).axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("performance per area over the DLA (x)", "top-1 accuracy (%)")
    front = next(l for l in ax.get_lines() if l.get_label() == "Pareto front")
    np.testing.assert_allclose(front.get_xdata(), [1.0, 1.5, 2.0])
    np.testing.assert_allclose(front.get_ydata(), [80.0, 70.0, 50.0])
    stars = next(c for c in ax.collections if c.get_label() == "authors' settings")
    np.testing.assert_allclose(stars.get_offsets(), [[1.0, 80.0]])


def test_pareto_points_from_the_committed_sweeps(df):
    from effllm_lib.pq import accelerator as A, pareto
    pts = pareto.points(df[df.network == "kws"])
    grid = df[(df.network == "kws") & (df.experiment == "grid") & (df["mode"] == "both")]
    assert len(pts) == grid.groupby(["n_prototypes", "subvec_len"]).ngroups
    r = pts[(pts.n_prototypes == 16) & (pts.subvec_len == 4)].iloc[0]
    assert r.main_setting and r.paper_setting
    # brute force over the hardware grid for this one setting
    best = max(A.compare_network(A.load_layers("kws"), A.PQConfigHW(subvec_len=4, n_prototypes=16, num_out_vec=nov,
                                                                  num_subspace_vec=nsv, memory=m))["perf_per_area"]
               for nov in A.NUM_OUT_VEC_GRID for nsv in A.NUM_SUBSPACE_VEC_GRID for m in ("DDR", "HBM"))
    assert r.perf_per_area == pytest.approx(best)
    front = pts[pts.on_front]
    for p in pts.itertuples():  # nothing on the front is beaten on both axes
        assert not ((front.perf_per_area > p.perf_per_area) & (front.accuracy > p.accuracy)).any() or not p.on_front


def test_accuracy_vs_temperature_error_bars():
    import pandas as pd
    s = pd.DataFrame({"mode": ["kmeans", "both", "both"], "forward": ["-", "soft", "soft"],
                      "tau": [None, 0.1, 1.0], "accuracy": [60.0, 70.0, 75.0], "seed_ci95": [None, None, None],
                      "boot_lo": [58.0, 68.0, 72.0], "boot_hi": [62.0, 71.0, 77.0], "float_accuracy": [90.0] * 3})
    ax = plots.accuracy_vs_temperature(s).axes[0]
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "top-1 accuracy (%)"
    bars = next(c for c in ax.containers if c.get_label() == "both, soft")
    line, caps, _ = bars.lines
    np.testing.assert_allclose(line.get_ydata(), [70.0, 75.0])
    ys = sorted(np.concatenate([c.get_ydata() for c in caps]))
    assert ys == [68.0, 71.0, 72.0, 77.0]  # the bootstrap interval's ends as caps


def test_lut_speedups_bars_are_the_committed_ratios():
    from effllm_lib import results
    bench = results.load("pqa", "lut_benchmark_xeon")
    ax = plots.lut_speedups(bench).axes[0]
    assert ax.get_xlabel().startswith("speed-up over dense")
    b = bench[(bench.subvec_len == 4) & (bench.encoder == "exact")]
    bars = next(c for c in ax.containers if c.get_label() == "exact encoder")
    widths = sorted(round(p.get_width(), 6) for p in bars)
    assert widths == sorted(round(v, 6) for v in b.speedup)
    with pytest.raises(ValueError):
        plots.lut_speedups(bench, subvec_len=3)


def test_layer_mse_float_column_and_bad_column():
    import pandas as pd
    g = pd.DataFrame({"network": ["kws"] * 4, "mode": ["kmeans"] * 4, "n_prototypes": [4, 16, 4, 16],
                      "subvec_len": [2, 2, 8, 8], "layer_mse": [1.0, 0.5, 2.0, 1.5],
                      "layer_mse_float": [0.4, 0.1, 0.9, 0.6]})
    ax = plots.layer_mse(g, "layer_mse_float").axes[0]
    assert "float inputs" in ax.get_title()
    ys = sorted(np.concatenate([l.get_ydata() for l in ax.get_lines() if len(l.get_ydata())]))
    assert ys == [0.1, 0.4, 0.6, 0.9]
    with pytest.raises(ValueError):
        plots.layer_mse(g, "mse")
