"""The serving chapter's figures, one function per figure; each returns the matplotlib Figure it drew.

The notebooks call these with committed results (``results.load("serving", ...)``); every axis is labelled
with its unit.
"""

from __future__ import annotations

import warnings

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .. import figures
from . import profiler

SIZES = ("small", "medium", "large")


def _stage_bars(ax, bd: pd.DataFrame, model: str, title: str) -> None:
    rows = bd[bd.model == model].set_index("size").loc[list(SIZES)]
    left = pd.Series(0.0, index=rows.index)
    for color, stage in zip(sns.color_palette("tab10", len(profiler.STAGES)), profiler.STAGES):
        ax.barh(rows.index, rows[f"{stage}_ms"], left=left, color=color, label=stage)
        left += rows[f"{stage}_ms"]
    figures.label(ax, "median latency per stage (ms)", "image size", title)


def stage_breakdown(machines: dict[str, pd.DataFrame], model: str = "mobilenet_v2") -> plt.Figure:
    """Stacked stage medians per image size, one panel per machine ({label: breakdown frame})."""
    fig, axes = plt.subplots(1, len(machines), figsize=(5.5 * len(machines) + 2.5, 3.2), sharey=True,
                             squeeze=False)
    for ax, (where, bd) in zip(axes[0], machines.items()):
        _stage_bars(ax, bd, model, f"MobileNetV2, one client: {where}")
    axes[0][0].legend(ncol=5, fontsize="small", loc="upper center",
                      bbox_to_anchor=(0.5 * len(machines), -0.3))
    return fig


def preprocess_share_heatmap(bd: pd.DataFrame, ax=None, where: str = "") -> plt.Figure:
    """Share of latency in decode + resize + normalize + copy (%), model x image size."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.4))
    share = bd.pivot(index="model", columns="size", values="preprocess_share")[list(SIZES)]
    sns.heatmap(share, annot=True, fmt=".0f", cmap="rocket_r", vmin=0, vmax=100, ax=ax,
                cbar_kws={"label": "preprocessing share (%)"})
    figures.label(ax, "image size", "model (task)",
                  (f"{where}: " if where else "") + "decode + resize + normalize + copy, % of latency")
    return ax.figure


def throughput_and_latency(sat: pd.DataFrame, curve: pd.DataFrame) -> plt.Figure:
    """Closed-loop throughput with and without preprocessing, and median latency under open-loop load."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    sns.barplot(sat, x="size", y="throughput_rps", hue="mode", ax=axes[0], errorbar=None)
    figures.label(axes[0], "image size", "throughput (requests/s)", "8 closed-loop clients")
    sns.lineplot(curve, x="offered_rps", y="p50_ms", hue="mode", style="size", marker="o", ax=axes[1])
    axes[1].set_yscale("log")
    axes[1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figures.label(axes[1], "offered load (requests/s, Poisson)", "median latency (ms)", "open loop")
    fig.tight_layout()
    return fig


def gpu_share_and_throughput(bd: pd.DataFrame, sat: pd.DataFrame, where: str = "H100") -> plt.Figure:
    """The GPU machine's preprocessing shares (heatmap) and its throughput with and without preprocessing."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    preprocess_share_heatmap(bd, axes[0], where)
    sns.barplot(sat, x="size", y="throughput_rps", hue="mode", ax=axes[1], errorbar=None)
    axes[1].set_yscale("log")
    figures.label(axes[1], "image size", "throughput (requests/s, log)", f"{where}, 8 closed-loop clients")
    fig.tight_layout()
    return fig


def pipeline_parts(summary: pd.DataFrame, crops: pd.DataFrame) -> plt.Figure:
    """Median crop latency split into detector / broker / queue / classifier, and broker time per crop."""
    parts = ["detector_ms", "broker_ms", "queue_ms", "classifier_ms"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    summary.set_index("broker")[parts].plot.barh(stacked=True, ax=axes[0],
                                                 color=sns.color_palette("colorblind", len(parts)))
    figures.label(axes[0], "median per crop (ms)", "broker", "crop latency by part")
    axes[0].legend([p.removesuffix("_ms") for p in parts], fontsize="small", ncol=4, loc="upper center",
                   bbox_to_anchor=(0.5, -0.25))
    with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib 3.11 a deprecated argument
        warnings.simplefilter("ignore", DeprecationWarning)
        sns.boxplot(crops, x="broker", y="broker_ms", ax=axes[1], showfliers=False)
    axes[1].set_yscale("log")
    figures.label(axes[1], "broker", "broker time per crop (ms, log)", "serialization + transfer")
    fig.tight_layout()
    return fig


def designs(opt: pd.DataFrame, runs: pd.DataFrame, where: str) -> plt.Figure:
    """Throughput of each server design (bars: medians, dots: passes, labels: speed-up) and its CPU cost."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(opt) + 1.2), gridspec_kw={"width_ratios": [3, 2]})
    sns.barplot(opt, y="design", x="throughput_rps", ax=axes[0], color=figures.color("throughput"))
    sns.stripplot(runs, y="design", x="throughput_rps", ax=axes[0], color="black", size=4)
    right = runs.groupby("design")["throughput_rps"].max()
    for i, row in enumerate(opt.itertuples()):
        axes[0].text(right[row.design], i, f"  {row.speedup:.2f}x", va="center", fontsize="small")
    figures.label(axes[0], "throughput (requests/s); dots: passes", "design",
                  f"{where}: 8 closed-loop clients, medium photos")
    sns.barplot(opt, y="design", x="requests_per_cpu_s", ax=axes[1], color=figures.color("cpu"))
    axes[1].set_yticklabels([])
    figures.label(axes[1], "requests per server CPU-second", "", "CPU cost")
    fig.tight_layout()
    return fig


ROUTING_LATENCIES = {"small_p50_ms": "1 MP, median", "small_p99_ms": "1 MP, p99", "large_p50_ms": "15 MP, median",
                     "large_p99_ms": "15 MP, p99"}


def routing(rt: pd.DataFrame, rt_runs: pd.DataFrame) -> plt.Figure:
    """Throughput of each routing design (dots: passes) and its latency per size class."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3))
    sns.barplot(rt, y="design", x="throughput_rps", ax=axes[0], color=figures.color("throughput"))
    sns.stripplot(rt_runs, y="design", x="throughput_rps", ax=axes[0], color="black", size=4)
    figures.label(axes[0], "throughput (requests/s); dots: passes", "design", "mixed 1 MP / 15 MP photos")
    lat = rt.rename(columns=ROUTING_LATENCIES).melt(id_vars="design", value_vars=list(ROUTING_LATENCIES.values()),
                                                    var_name="latency", value_name="ms")
    sns.barplot(lat, y="design", x="ms", hue="latency", ax=axes[1], palette="crest")
    axes[1].set_yticklabels([])
    figures.label(axes[1], "latency (ms)", "", "per size class")
    axes[1].legend(fontsize="x-small", bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return fig


ROLE_COLORS = {"baseline": "#9e9e9e", "optimized": "#2a9d8f", "reference": "#e9c46a"}


def fair_comparison(summary: pd.DataFrame, runs: pd.DataFrame, where: str) -> plt.Figure:
    """The fair comparison: throughput per design (bars: medians, coloured by role; dots: passes), and each
    design's throughput over the best baseline (dot: median of per-pass ratios; bar: min to max)."""
    order = list(summary.design)
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(order) + 1.4), gridspec_kw={"width_ratios": [3, 2]})
    colors = [ROLE_COLORS[r] for r in summary.role]
    axes[0].barh(range(len(order)), summary.throughput_rps, color=colors)
    for i, d in enumerate(order):
        tp = runs.loc[runs.design == d, "throughput_rps"]
        axes[0].plot(tp, [i] * len(tp), "k.", ms=5)
    axes[0].set_yticks(range(len(order)), order)
    axes[0].invert_yaxis()
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ROLE_COLORS.values()]
    axes[0].legend(handles, list(ROLE_COLORS), fontsize="small", loc="upper right")  # the baselines' bars are short
    figures.label(axes[0], "throughput (requests/s); dots: passes", "design", where)
    y = list(range(len(order)))
    err = [summary.ratio_median - summary.ratio_min, summary.ratio_max - summary.ratio_median]
    axes[1].errorbar(summary.ratio_median, y, xerr=err, fmt="o", color="black", capsize=3)
    axes[1].axvline(1.0, color="grey", ls="--", lw=1)
    axes[1].set_yticks(y, [""] * len(y))
    axes[1].set_ylim(axes[0].get_ylim())
    figures.label(axes[1], f"throughput / {summary.best_baseline.iloc[0]} (x)", "",
                  "ratio per pass: median, min to max")
    fig.tight_layout()
    return fig


def reduced_decode_accuracy(summary: pd.DataFrame) -> plt.Figure:
    """Top-1 accuracy with full and with reduced (DCT-domain) decoding per upscale factor, the change with its
    paired 95% bootstrap interval, and the photos' top-1 agreement."""
    cifar = summary[summary.factor.notna()].sort_values("factor")
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    x = range(len(cifar))
    width = 0.27
    for k, (col, lab) in enumerate((("top1_original", "original, no JPEG"), ("top1_full", "full decode"),
                                    ("top1_reduced", "reduced decode"))):
        axes[0].bar([i + (k - 1) * width for i in x], cifar[col], width, label=lab)
    axes[0].set_xticks(list(x), [f"{int(f)}x\n(1/{int(f)} scale)" for f in cifar.factor])
    axes[0].set_ylim(0, 112)  # room above the bars for the legend
    axes[0].set_yticks(range(0, 101, 20))
    axes[0].legend(fontsize="x-small", loc="upper center", ncol=3)
    figures.label(axes[0], "upscale factor of the JPEG (DCT scale of the reduced decode)", "top-1 accuracy (%)",
                  f"CIFAR-10 test set (n = {int(cifar.n.iloc[0])}), Keras CNN")
    err = [cifar.change_pp - cifar.change_lo_pp, cifar.change_hi_pp - cifar.change_pp]
    axes[1].errorbar(list(x), cifar.change_pp, yerr=err, fmt="o", color="black", capsize=4)
    axes[1].axhline(0, color="grey", ls="--", lw=1)
    axes[1].set_xticks(list(x), [f"{int(f)}x" for f in cifar.factor])
    figures.label(axes[1], "upscale factor", "reduced - full, top-1 (pp, 95% CI)", "accuracy change")
    photos = summary[summary.factor.isna()]
    if len(photos):
        from .reduced_accuracy import exact_lower_bound

        r = photos.iloc[0]
        lo = 100 * exact_lower_bound(round(r.agreement / 100 * r.n), int(r.n))
        axes[1].text(0.03, 0.08, f"photos, MobileNetV2 (n = {int(r.n)}):\ntop-1 agreement {r.agreement:.0f}%, "
                     f"exact 95% lower bound {lo:.0f}%", transform=axes[1].transAxes, fontsize="x-small")
    fig.tight_layout()
    return fig


def loaded_breakdown(bd: pd.DataFrame, where: str) -> plt.Figure:
    """The breakdown under load (``loaded.run``): stacked stage medians per decoder, one panel per image size,
    with each bar labelled by the throughput it served."""
    sizes = [s for s in SIZES if s in set(bd["size"])]
    decoders = list(dict.fromkeys(bd.decoder))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes) + 2.5, 0.5 * len(decoders) + 1.8),
                             sharey=True, squeeze=False)
    for ax, size in zip(axes[0], sizes):
        rows = bd[bd["size"] == size].set_index("decoder").loc[[d for d in decoders if d in set(bd.decoder)]]
        left = pd.Series(0.0, index=rows.index)
        for color, stage in zip(sns.color_palette("tab10", len(profiler.STAGES)), profiler.STAGES):
            ax.barh(rows.index, rows[f"{stage}_ms"], left=left, color=color, label=stage)
            left += rows[f"{stage}_ms"]
        for i, (d, r) in enumerate(rows.iterrows()):
            ax.annotate(f"{r.throughput_rps:.0f} req/s", (left[d], i), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize="small")
        figures.label(ax, "median latency per stage (ms)", "decoder", f"{size} photos under load: {where}")
    axes[0][0].legend(ncol=5, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.35))
    fig.tight_layout()
    return fig
