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
