"""SparAMX figures: labelled axes with units, and the series they promise, on the committed results."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from effllm_lib import results  # noqa: E402
from effllm_lib.sparse import pack_bf16, plots, prune_magnitude  # noqa: E402
from effllm_lib.sparse.bench import decoder_layer_summary, limits_breakdown  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_tile_numbers_every_nonzero_once():
    w = prune_magnitude(torch.randn(16, 32), 0.5).bfloat16()
    packed = pack_bf16(w)
    fig = plots.tile(w, packed)
    numbers = sorted(int(t.get_text()) for t in fig.axes[1].texts)
    assert numbers == list(range(int((w != 0).sum())))
    assert fig.axes[0].get_xlabel() == "input index k (0-31)"


def test_compression_series():
    comp = pd.DataFrame({"sparsity": [0.0, 0.5], "measured": [0.9, 1.7], "formula": [0.94, 1.78]})
    ax = plots.compression(comp, (64, 64)).axes[0]
    assert ax.get_ylabel() == "dense bf16 bytes / compressed bytes (x)"
    assert [l.get_label() for l in ax.get_lines()] == ["measured", "formula"]


def test_decoder_layer_lines_are_the_summary():
    lat = results.load("sparamx", "layer_latency_xeon")
    fig = plots.decoder_layer({"Xeon": lat})
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("sparsity (%)", "decoder-layer linears, latency (ms)")
    summ = decoder_layer_summary(lat)
    line = next(l for l in ax.get_lines() if l.get_label() == "sparse_amx")
    np.testing.assert_allclose(line.get_ydata(), summ[summ.impl == "sparse_amx"].total_us / 1e3)
    assert {"bound, sparse weight", "bound, dense bf16 weight"} <= {l.get_label() for l in ax.get_lines()}


def test_limits_four_bars_per_layer():
    lat, lim = results.load("sparamx", "layer_latency_xeon"), results.load("sparamx", "limits_xeon")
    table = limits_breakdown(lat, lim, 0.5).assign(machine="Xeon")
    ax = plots.limits(table).axes[0]
    assert len(ax.patches) == 4 * len(table)
    assert ax.get_ylabel() == "time per call (ms)"


def test_thread_scaling_and_batch_sweep_axes():
    ts = plots.thread_scaling({"Xeon": results.load("sparamx", "thread_scaling_xeon")}).axes[0]
    assert ts.get_xlabel() == "threads" and ts.get_yscale() == "log"
    fig = plots.batch_sweep({"Xeon": results.load("sparamx", "batch_sweep_xeon")})
    assert fig.axes[0].get_ylabel() == "latency per token (µs)"
    assert fig.axes[1].get_ylabel() == "AVX-512 sparse time / this time (x)"
    avx = next(l for l in fig.axes[1].get_lines() if l.get_label().startswith("sparse_avx512"))
    np.testing.assert_allclose(avx.get_ydata(), 1.0)  # AVX-512 against itself


def test_live_latency_bound_line():
    live = pd.DataFrame({"impl": ["torch_bf16", "torch_bf16", "sparse_avx512", "sparse_avx512"],
                         "sparsity": [0.0, 0.5] * 2, "latency_us": [10.0, 10.0, 9.0, 6.0], "bound_us": [5, 5, 5, 3]})
    ax = plots.live_latency(live, "sparse_avx512", "t").axes[0]
    assert ax.get_ylabel() == "latency per call (µs)"
    bound = next(l for l in ax.get_lines() if l.get_label() == "bandwidth bound (sparse)")
    np.testing.assert_allclose(bound.get_ydata(), [5, 3])


def test_pruning_cost_one_panel_per_model_ratios_and_intervals():
    rows = []
    for model, dense in (("a", 10.0), ("b", 20.0)):
        rows.append(dict(model=model, method="dense", sparsity=0.0, perplexity=dense, ppl_ratio=1.0, ratio_lo=1.0,
                         ratio_hi=1.0))
        for method, base in (("magnitude", 3.0), ("wanda", 1.5)):
            for s in (0.5, 0.7):
                r = base * (s / 0.5) ** 2
                rows.append(dict(model=model, method=method, sparsity=s, perplexity=dense * r, ppl_ratio=r,
                                 ratio_lo=r * 0.9, ratio_hi=r * 1.2))
    fig = plots.pruning_cost(pd.DataFrame(rows))
    assert len(fig.axes) == 2 and fig.axes[1].get_title().startswith("b (dense 20.0)")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "perplexity / dense (x, log)" and ax.get_yscale() == "log"
    mag = next(c for c in ax.containers if c.get_label() == "magnitude")
    line, _, (bars,) = mag.lines
    np.testing.assert_allclose(np.asarray(line.get_xdata(), float), [0, 50, 70])
    np.testing.assert_allclose(np.asarray(line.get_ydata(), float), [1.0, 3.0, 3.0 * 1.96])
    # the error bar of the 70 % magnitude point spans the paired interval, hand-computed
    seg = np.asarray(bars.get_segments()[2])
    np.testing.assert_allclose(seg, [[70, 5.88 * 0.9], [70, 5.88 * 1.2]])


def test_pruning_cost_on_the_committed_smollm2_run():
    ppl = results.load("sparamx", "pruning_perplexity")
    ax = plots.pruning_cost(ppl).axes[0]
    line = next(c for c in ax.containers if c.get_label() == "wanda").lines[0]
    w = ppl[ppl.method.isin(["dense", "wanda"])].sort_values("sparsity")
    np.testing.assert_allclose(np.asarray(line.get_ydata(), float), w.ppl_ratio)
