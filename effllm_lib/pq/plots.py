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


def layer_mse(grid: pd.DataFrame, column: str = "layer_mse", ax=None) -> plt.Figure:
    """Mean layer-output MSE of k-means tables against N_p (log-log), by L_s and network. ``column``:
    ``layer_mse`` (inputs from the already-quantized prefix) or ``layer_mse_float`` (the float network's)."""
    if column not in ("layer_mse", "layer_mse_float"):
        raise ValueError(f"column must be layer_mse or layer_mse_float, got {column!r}")
    mse = grid[grid["mode"] == "kmeans"]
    fig, ax = plt.subplots() if ax is None else (ax.figure, ax)
    sns.lineplot(mse, x="n_prototypes", y=column, hue="subvec_len", style="network", marker="o",
                 palette="viridis", ax=ax)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    inputs = "float inputs" if column == "layer_mse_float" else "inputs from the PQ prefix"
    figures.label(ax, "prototypes per subspace N_p", "mean layer-output MSE (activation units²)",
                  f"PQ layer error vs N_p and L_s ({inputs})")
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


# ------------------------------------------------------------------------------------- how PQ layers work
def encoding_cells(pairs, protos, extent=(-1.0, 3.0), resolution: int = 300) -> plt.Figure:
    """2-D sub-vectors (grey), their prototypes (stars) and each prototype's nearest-neighbour cell."""
    import torch

    lo, hi = extent
    axis = torch.linspace(lo, hi, resolution)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1)
    pairs, protos = torch.as_tensor(pairs), torch.as_tensor(protos)
    cells = torch.cdist(grid.reshape(-1, 2), protos).argmin(1).reshape(resolution, resolution).numpy()
    pairs, protos = pairs.numpy(), protos.numpy()  # matplotlib gets numpy arrays (no torch __array__ warnings)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(cells, origin="lower", extent=(lo, hi, lo, hi), cmap="tab10", alpha=0.25, interpolation="nearest")
    ax.scatter(pairs[:, 0], pairs[:, 1], s=3, c="grey", alpha=0.3, label="pixel pairs (sub-vectors)")
    ax.scatter(protos[:, 0], protos[:, 1], s=120, c="black", marker="*", label=f"{len(protos)} prototypes")
    figures.label(ax, "pixel 1 (normalized intensity, a.u.)", "pixel 2 (normalized intensity, a.u.)",
                  "Nearest-prototype encoding, L_s = 2")
    ax.legend(loc="upper left")
    return fig


def prototypes_and_lut(layer) -> plt.Figure:
    """A one-subspace 3x3 PQ conv: its prototype patches (grid) and its lookup table (prototype x channel)."""
    import torch

    tiles = layer.prototypes.detach()[0].reshape(-1, 3, 3)
    n = len(tiles)
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"expected a square number of prototypes to tile, got {n}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [1, 1.4]})
    mosaic = torch.cat([torch.cat(list(tiles[r * side:(r + 1) * side]), 1) for r in range(side)], 0)
    axes[0].imshow(mosaic.numpy(), cmap="gray")
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    figures.label(axes[0], f"prototype patches ({side} x {side} grid of 3x3)", "", f"{n} prototypes of 3x3 patches")
    im = axes[1].imshow(layer.lut.detach()[0].numpy(), aspect="auto", cmap="coolwarm")
    figures.label(axes[1], "output channel c", "prototype p", "LUT[p, c] = prototype · filter")
    fig.colorbar(im, ax=axes[1], label="table entry (activation units)")
    return fig


def pq_error(err: pd.DataFrame, inputs: int) -> plt.Figure:
    """Relative output MSE of a PQ conv against N_p, one line per L_s (log-log)."""
    fig, ax = plt.subplots()
    for l_s, g in err.groupby("L_s"):
        ax.plot(g["N_p"], g["relative MSE"], "o-", label=f"L_s = {l_s}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    figures.label(ax, "prototypes per subspace N_p", "relative output MSE (unitless)",
                  f"PQ error of a 3x3 conv ({inputs} inputs) on real activations")
    ax.legend()
    return fig


def accuracy_vs_perf_per_area(points: pd.DataFrame, e2e: pd.DataFrame | None = None) -> plt.Figure:
    """Accuracy against performance per area (over the DLA), one panel per network: every trained (N_p, L_s)
    setting, the Pareto front, the authors' settings starred; ``e2e`` rows (the improved recipe) as diamonds."""
    nets = list(points.network.unique())
    fig, axes = plt.subplots(1, len(nets), figsize=(5 * len(nets), 4.2), squeeze=False)
    for ax, net in zip(axes[0], nets):
        p = points[points.network == net]
        ax.scatter(p.perf_per_area, p.accuracy, c="grey", s=20, label="grid setting (fine-tuned tables)")
        front = p[p.on_front].sort_values("perf_per_area")
        ax.plot(front.perf_per_area, front.accuracy, "-", color=figures.color("pareto"), drawstyle="steps-pre",
                label="Pareto front")
        paper = p[p.paper_setting]
        ax.scatter(paper.perf_per_area, paper.accuracy, marker="*", s=160, c="black", zorder=3,
                   label="authors' settings")
        for r in p.itertuples():
            if r.paper_setting or r.on_front:
                ax.annotate(f"{r.subvec_len},{r.n_prototypes}", (r.perf_per_area, r.accuracy), fontsize="x-small",
                            xytext=(3, 3), textcoords="offset points")
        if e2e is not None and (e2e.network == net).any():
            e = e2e[e2e.network == net]
            ax.scatter(e.perf_per_area, e.accuracy, marker="D", s=45, c=figures.color("e2e"), zorder=3,
                       label="e2e recipe (main setting; float / low-bit tables)")
        ax.axhline(p.float_accuracy.iloc[0], color="black", ls=":", label="float network")
        ax.axvline(1, color="grey", ls="--", lw=0.8)
        figures.label(ax, "performance per area over the DLA (x)", "top-1 accuracy (%)", net)
        ax.legend(fontsize="x-small", loc="lower left")
    return fig


def accuracy_vs_temperature(summary: pd.DataFrame) -> plt.Figure:
    """Held-out accuracy against the softmax temperature tau (log x), one line per (training mode, forward pass),
    with error bars (the 95% interval over seeds, else the test-set bootstrap); dashed: k-means, dotted: float.
    ``summary`` is ``temperature.summary``'s table."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    trained = summary[summary["mode"] != "kmeans"]
    for (mode, forward), g in trained.groupby(["mode", "forward"], sort=False):
        g = g.sort_values("tau")
        acc = g.accuracy.to_numpy(float)
        if g.seed_ci95.notna().all():
            err = [g.seed_ci95.to_numpy(float)] * 2
        else:
            err = [acc - g.boot_lo.to_numpy(float), g.boot_hi.to_numpy(float) - acc]
        ax.errorbar(g.tau.to_numpy(float), acc, yerr=err, marker="o" if forward == "soft" else "s", capsize=3,
                    ls="-" if forward == "soft" else "--", color=figures.color(mode), label=f"{mode}, {forward}")
    km = summary[summary["mode"] == "kmeans"]
    if not km.empty:
        ax.axhline(km.accuracy.iloc[0], color="grey", ls="-.", label="k-means only")
    ax.axhline(summary.float_accuracy.iloc[0], color="black", ls=":", label="float network")
    ax.set_xscale("log")
    figures.label(ax, "softmax temperature tau (distance units)", "top-1 accuracy (%)",
                  "Accuracy vs temperature (hard assignment at inference)")
    ax.legend(fontsize="x-small", loc="lower right")
    return fig


def lut_speedups(bench: pd.DataFrame, subvec_len: int = 4) -> plt.Figure:
    """The LUT kernel's speed-up over dense per layer shape (median time ratio, bars per encoder), with the
    break-even (1x) and the 2x target marked; ``bench`` is a ``benchmarks/pq_lut.py`` table."""
    b = bench[bench.subvec_len == subvec_len]
    if b.empty:
        raise ValueError(f"no rows with subvec_len {subvec_len} in the benchmark table")
    order = list(dict.fromkeys(b["shape"]))
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(order) + 1.5))
    encoders = list(dict.fromkeys(b.encoder))
    height = 0.8 / len(encoders)
    for i, enc in enumerate(encoders):
        e = b[b.encoder == enc].set_index("shape").reindex(order)
        ax.barh([j + (i - (len(encoders) - 1) / 2) * height for j in range(len(order))], e.speedup, height=height,
                label=f"{enc} encoder", color=figures.color(f"encoder {enc}"))
    ax.set_yticks(range(len(order)), order)
    ax.invert_yaxis()
    ax.axvline(1, color="black", ls=":", label="dense (1x)")
    ax.axvline(2, color="black", ls="--", label="2x target")
    figures.label(ax, "speed-up over dense F.conv2d / F.linear (x, median of repeats)", "layer shape",
                  f"int8 LUT kernel, N_p 16, L_s {subvec_len}")
    ax.legend(fontsize="x-small", loc="lower right")
    return fig
