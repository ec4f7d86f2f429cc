"""Each serving figure draws the committed results with labelled axes (units) and every series it promises."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from effllm_lib import results  # noqa: E402
from effllm_lib.serving import plots, profiler  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def labels(ax):
    return ax.get_xlabel(), ax.get_ylabel()


def test_stage_breakdown_one_panel_per_machine_every_stage():
    bd = results.load("serving", "breakdown")
    fig = plots.stage_breakdown({"CPU": bd, "again": bd})
    assert len(fig.axes) == 2
    assert labels(fig.axes[0]) == ("median latency per stage (ms)", "image size")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == list(profiler.STAGES)
    # one bar per size and stage; the stacked bars end at the sum of the stage medians
    bars = fig.axes[0].patches
    assert len(bars) == 3 * len(profiler.STAGES)
    mn = bd[bd.model == "mobilenet_v2"].set_index("size")
    for row, size in enumerate(plots.SIZES):  # barh puts the sizes at y = 0, 1, 2
        end = max(b.get_x() + b.get_width() for b in bars if round(b.get_y() + b.get_height() / 2) == row)
        assert end == pytest.approx(sum(mn.loc[size, f"{s}_ms"] for s in profiler.STAGES))


def test_preprocess_share_heatmap_cells_are_the_file():
    bd = results.load("serving", "breakdown")
    fig = plots.preprocess_share_heatmap(bd)
    ax = fig.axes[0]
    assert labels(ax) == ("image size", "model (task)")
    assert fig.axes[1].get_ylabel() == "preprocessing share (%)"
    texts = {t.get_text() for t in ax.texts}
    assert f"{bd.preprocess_share.max():.0f}" in texts and len(ax.texts) == len(bd)


def test_throughput_and_latency_axes_and_modes():
    fig = plots.throughput_and_latency(results.load("serving", "throughput_saturation"),
                                       results.load("serving", "throughput_curve"))
    a, b = fig.axes[:2]
    assert labels(a) == ("image size", "throughput (requests/s)")
    assert labels(b) == ("offered load (requests/s, Poisson)", "median latency (ms)")
    assert {t.get_text() for t in a.get_legend().get_texts()} == {"jpeg", "pixels"}


def test_gpu_share_and_throughput_log_axis():
    fig = plots.gpu_share_and_throughput(results.load("serving", "breakdown_h100"),
                                         results.load("serving", "throughput_saturation_h100"))
    assert fig.axes[0].get_title().startswith("H100")
    tp = [ax for ax in fig.axes if ax.get_ylabel() == "throughput (requests/s, log)"]
    assert len(tp) == 1 and tp[0].get_yscale() == "log"


def test_pipeline_parts_every_broker_and_part():
    summary = results.load("serving", "pipeline_summary")
    fig = plots.pipeline_parts(summary, results.load("serving", "pipeline_crops"))
    a, b = fig.axes
    assert labels(a) == ("median per crop (ms)", "broker")
    assert [t.get_text() for t in a.get_legend().get_texts()] == ["detector", "broker", "queue", "classifier"]
    assert {t.get_text() for t in a.get_yticklabels()} == set(summary.broker)
    assert labels(b) == ("broker", "broker time per crop (ms, log)")


@pytest.mark.parametrize("tag", ["", "_h100"])
def test_designs_labels_each_design_with_its_speedup(tag):
    opt = results.load("serving", "optimizations" + tag)
    fig = plots.designs(opt, results.load("serving", "optimizations_runs" + tag), "here")
    a, b = fig.axes
    assert labels(a) == ("throughput (requests/s); dots: passes", "design")
    assert b.get_xlabel() == "requests per server CPU-second"
    assert {t.get_text().strip() for t in a.texts} == {f"{s:.2f}x" for s in opt.speedup}


def test_routing_latency_series():
    rt = results.load("serving", "routing")
    fig = plots.routing(rt, results.load("serving", "routing_runs"))
    a, b = fig.axes
    assert labels(a) == ("throughput (requests/s); dots: passes", "design")
    assert b.get_xlabel() == "latency (ms)"
    assert [t.get_text() for t in b.get_legend().get_texts()] == list(plots.ROUTING_LATENCIES.values())


def _fair_frames():
    import pandas as pd

    from effllm_lib.serving import fair

    rows = []
    tp = {"prior work: batching, Pillow": ([10, 12, 11], "baseline"), "optimized: combined": ([30, 33, 27], "optimized"),
          "ceiling: pre-decoded pixels": ([60, 61, 59], "reference")}
    for d, (vals, role) in tp.items():
        for r, v in enumerate(vals):
            rows.append({"design": d, "role": role, "pass": r, "throughput_rps": v, "p50_ms": 1, "p99_ms": 2,
                         "mean_batch": 4, "requests_per_cpu_s": 1, "errors": 0})
    runs = pd.DataFrame(rows)
    return fair.ratios(runs), runs


def test_fair_comparison_bars_are_the_medians_and_ratios_per_pass():
    summary, runs = _fair_frames()
    fig = plots.fair_comparison(summary, runs, "here")
    a, b = fig.axes
    assert labels(a) == ("throughput (requests/s); dots: passes", "design")
    assert [t.get_text() for t in a.get_yticklabels()] == list(summary.design)
    assert sorted(p.get_width() for p in a.patches[:3]) == [11, 30, 60]
    assert b.get_xlabel() == "throughput / prior work: batching, Pillow (x)"
    # the ratio points: medians of per-pass ratios against the baseline (30/11, 33/12, 27/10 -> 2.75)
    xs = b.lines[0].get_xdata()
    assert xs[1] == pytest.approx(sorted([30 / 10, 33 / 12, 27 / 11])[1])


def test_reduced_decode_accuracy_panels():
    import numpy as np
    import pandas as pd

    summary = pd.DataFrame({"set": ["c", "c", "p"], "factor": [2, 8, np.nan], "n": [100, 100, 24],
                            "top1_original": [80, 80, np.nan], "top1_full": [78, 70, np.nan],
                            "top1_reduced": [78.5, 75, np.nan], "change_pp": [0.5, 5, np.nan],
                            "change_lo_pp": [-0.5, 3, np.nan], "change_hi_pp": [1.5, 7, np.nan],
                            "agreement": [99, 90, 96], "agreement_lo": [98, 88, 88], "agreement_hi": [100, 92, 100]})
    fig = plots.reduced_decode_accuracy(summary)
    a, b = fig.axes
    assert a.get_ylabel() == "top-1 accuracy (%)" and b.get_ylabel() == "reduced - full, top-1 (pp, 95% CI)"
    assert sorted(p.get_height() for p in a.patches) == sorted([80, 80, 78, 70, 78.5, 75])
    assert list(b.lines[0].get_ydata()) == [0.5, 5]
    assert "agreement 96%" in b.texts[0].get_text()


def test_committed_fair_and_accuracy_figures_draw():
    summary = results.load("serving", "fair_cpu2")
    fig = plots.fair_comparison(summary, results.load("serving", "fair_runs_cpu2"), "here")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(summary.design)
    acc = results.load("serving", "reduced_decode_accuracy")
    fig = plots.reduced_decode_accuracy(acc)
    assert list(fig.axes[1].lines[0].get_ydata()) == list(acc.change_pp.dropna())
    assert "lower bound" in fig.axes[1].texts[0].get_text()


def test_loaded_breakdown_one_panel_per_size_bars_sum_the_stages():
    import pandas as pd

    bd = results.load("serving", "breakdown")
    mn = bd[(bd.model == "mobilenet_v2") & bd["size"].isin(["medium", "large"])]
    frames = []
    for k, d in enumerate(["pil", "nvjpeg, batched"]):
        f = mn.copy()
        f["decoder"], f["throughput_rps"] = d, 10.0 * (k + 1)
        frames.append(f)
    loaded = pd.concat(frames, ignore_index=True)
    fig = plots.loaded_breakdown(loaded, "H200")
    assert len(fig.axes) == 2
    assert labels(fig.axes[0]) == ("median latency per stage (ms)", "decoder")
    bars = fig.axes[1].patches  # large photos
    assert len(bars) == 2 * len(profiler.STAGES)
    large = mn.set_index("size").loc["large"]
    for row in (0, 1):
        end = max(b.get_x() + b.get_width() for b in bars if round(b.get_y() + b.get_height() / 2) == row)
        assert end == pytest.approx(sum(large[f"{s}_ms"] for s in profiler.STAGES))
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert texts == ["10 req/s", "20 req/s"]
