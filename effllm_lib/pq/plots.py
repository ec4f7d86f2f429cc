"""The PQA chapter's figures, one function per figure; each returns the matplotlib Figure it drew."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .. import figures


def accuracy_vs_shape(grid: pd.DataFrame) -> plt.Figure:
    """Top-1 accuracy against N_p, one line per (L_s, k-means or fine-tuned), one panel per network."""
    nets = grid.network.nunique()
    fig, axes = plt.subplots(1, nets, figsize=(5 * nets, 4), squeeze=False)
    for ax, (net, g) in zip(axes[0], grid.groupby("network", sort=False)):
        for (l_s, mode), h in g.groupby(["subvec_len", "mode"]):
            ax.plot(h.n_prototypes, h.accuracy, "o-" if mode == "both" else "x--", color=figures.color(f"L_s {l_s}"),
                    label=f"L_s {l_s:g}, {'fine-tuned' if mode == 'both' else 'k-means'}")
        ax.axhline(g.float_accuracy.iloc[0], color="black", ls=":", label="float")
        ax.set_xscale("log", base=2)
        figures.label(ax, "prototypes per subspace N_p", "top-1 accuracy (%)", net)
        ax.legend(fontsize="x-small", loc="lower right")
    return fig


def layer_mse(grid: pd.DataFrame) -> plt.Figure:
    """Mean layer-output MSE of k-means tables against N_p (log-log), by L_s and network."""
    mse = grid[grid["mode"] == "kmeans"]
    fig, ax = plt.subplots()
    sns.lineplot(mse, x="n_prototypes", y="layer_mse", hue="subvec_len", style="network", marker="o",
                 palette="viridis", ax=ax)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    figures.label(ax, "prototypes per subspace N_p", "mean layer-output MSE (activation units²)",
                  "PQ error falls with N_p and rises with L_s")
    return fig


def training_modes(modes: pd.DataFrame) -> plt.Figure:
    """Accuracy per training mode and temperature, one panel per network; dotted: the float network."""
    modes = modes.assign(tau=modes.tau.fillna(0).map(lambda t: "-" if t == 0 else f"{t:g}"))
    g = sns.catplot(modes, x="mode", y="accuracy", hue="tau", col="network", kind="bar", sharey=False,
                    height=3.6, aspect=1.1, palette="crest")
    for ax, net in zip(g.axes.flat, modes.network.unique()):
        ax.axhline(modes[modes.network == net].float_accuracy.iloc[0], color="black", ls=":")
        figures.label(ax, "tables trained", "top-1 accuracy (%)", net)
    return g.figure


def bit_width_drops(bits: pd.DataFrame, reference: pd.Series) -> plt.Figure:
    """Accuracy drop (points) of rounded tables vs the float tables, prototype bits x LUT bits, per network."""
    nets = list(bits.network.unique())
    fig, axes = plt.subplots(1, len(nets), figsize=(4.6 * len(nets), 4), squeeze=False)
    for ax, net in zip(axes[0], nets):
        b = bits[bits.network == net]
        drop = (reference[net] - b.pivot(index="proto_bits", columns="lut_bits", values="accuracy")).round(1)
        sns.heatmap(drop, annot=True, fmt=".1f", cmap="rocket_r", vmin=0, vmax=10, ax=ax,
                    cbar_kws={"label": "accuracy drop (points)"})
        figures.label(ax, "LUT entry bits", "prototype bits", net)
    return fig
