"""The SparAMX chapter's figures, one function per figure; each returns the matplotlib Figure it drew."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from .. import figures
from .bench import decoder_layer_summary


def tile(w_tile: torch.Tensor, packed) -> plt.Figure:
    """A dense 16 x 32 weight next to its VNNI tile: bitmap bits set, numbered in packed order."""
    bits = ((packed.bitmaps[0, 0].long().unsqueeze(1) & 0xFFFFFFFF) >> torch.arange(32)) & 1  # [16 rows, 32]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    # left: the dense weight, nonzeros coloured by which tile row (input pair) they land in
    row_of_input = (torch.arange(32) // 2).repeat(16, 1).float()
    axes[0].imshow(np.where(w_tile.float() != 0, row_of_input, np.nan), cmap="viridis", aspect="auto")
    figures.label(axes[0], "input index k (0-31)", "output index n (0-15)", "Dense W[16, 32]: nonzeros by tile row")
    # right: the tile, row r = input pair r; columns alternate (n, k even), (n, k odd)
    axes[1].imshow(np.where(bits.numpy() == 1, np.arange(16)[:, None] * np.ones(32), np.nan), cmap="viridis",
                   aspect="auto")
    order = 0
    for r in range(16):
        for c in range(32):
            if bits[r, c]:
                axes[1].text(c, r, str(order), ha="center", va="center", fontsize=5, color="white")
                order += 1
    figures.label(axes[1], "element c of the row (output c // 2, input 2r + c % 2)", "tile row r (input pair)",
                  "The VNNI tile: bitmap bits set, numbered in packed order")
    fig.tight_layout()
    return fig


def compression(comp: pd.DataFrame, shape: tuple[int, int]) -> plt.Figure:
    """Measured compression of packed weights (dots) against the formula (line), per sparsity."""
    ax = comp.plot(x="sparsity", y=["measured", "formula"], style=["o", "-"])
    figures.label(ax, "sparsity (fraction of zero weights)", "dense bf16 bytes / compressed bytes (x)",
                  f"Compression of a {shape[0]}x{shape[1]} layer")
    return ax.figure


def live_latency(live: pd.DataFrame, bound_impl: str, title: str) -> plt.Figure:
    """Latency per call of each implementation against sparsity, with the bandwidth bound of ``bound_impl``."""
    fig, ax = plt.subplots()
    for impl, d in live.groupby("impl"):
        ax.plot(d.sparsity * 100, d.latency_us, "o-", label=impl, color=figures.color(impl))
    d = live[live.impl == bound_impl]
    ax.plot(d.sparsity * 100, d.bound_us, "k--", label="bandwidth bound (sparse)")
    ax.legend()
    figures.label(ax, "sparsity (%)", "latency per call (µs)", title)
    return fig


def decoder_layer(machines: dict[str, pd.DataFrame]) -> plt.Figure:
    """Summed latency of a decoder layer's linears per implementation and sparsity, one panel per machine,
    with the bandwidth bounds of the sparse (dashed) and dense (dotted) weight."""
    fig, axes = plt.subplots(1, len(machines), figsize=(6.5 * len(machines), 4.5), squeeze=False)
    for ax, (where, lat) in zip(axes[0], machines.items()):
        summ = decoder_layer_summary(lat)
        for impl, d in summ.groupby("impl"):
            ax.plot(d.sparsity * 100, d.total_us / 1e3, "o-", label=impl, color=figures.color(impl))
        sp = summ[summ.impl == [i for i in summ.impl.unique() if i.startswith("sparse_")][0]]
        ax.plot(sp.sparsity * 100, sp.bound_total_us / 1e3, "k--", label="bound, sparse weight")
        dn = summ[summ.impl == "torch_bf16"]
        ax.plot(dn.sparsity * 100, dn.bound_total_us / 1e3, "k:", label="bound, dense bf16 weight")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        figures.label(ax, "sparsity (%)", "decoder-layer linears, latency (ms)", where)
    fig.tight_layout()
    return fig


def limits(limits_table: pd.DataFrame) -> plt.Figure:
    """Per layer and kernel: measured time, torch's, one-thread decode time and the bandwidth bound (ms)."""
    machines = list(limits_table.machine.unique())
    fig, axes = plt.subplots(1, len(machines), figsize=(6.5 * len(machines), 4.2), squeeze=False)
    for ax, (where, d) in zip(axes[0], limits_table.groupby("machine", sort=False)):
        labels = [f"{r.layer}\n{r.kernel}" for r in d.itertuples()]
        xpos = np.arange(len(d))
        ax.bar(xpos - 0.3, d.measured_us / 1e3, 0.2, label="measured (ours)")
        ax.bar(xpos - 0.1, d.torch_bf16_us / 1e3, 0.2, label="torch bf16 F.linear")
        ax.bar(xpos + 0.1, d.decode_1thread_us / 1e3, 0.2, label="decode, 1 thread")
        ax.bar(xpos + 0.3, d.bandwidth_bound_us / 1e3, 0.2, label="bandwidth bound")
        ax.set_xticks(xpos, labels, fontsize=7, rotation=30, ha="right")
        ax.legend(fontsize=7)
        figures.label(ax, "layer and kernel (50 % sparsity, batch 1)", "time per call (ms)", where)
    fig.tight_layout()
    return fig


def thread_scaling(scaling: dict[str, pd.DataFrame]) -> plt.Figure:
    """Latency per call against threads (log-log) per layer and implementation; dotted: the sparse bound."""
    fig, axes = plt.subplots(1, len(scaling), figsize=(6.5 * len(scaling), 4.2), squeeze=False)
    for ax, (where, d) in zip(axes[0], scaling.items()):
        for (layer, impl), e in d.groupby(["layer", "impl"]):
            ax.plot(e.threads, e.latency_us / 1e3, marker="o", label=f"{layer} {impl}", color=figures.color(impl),
                    ls="-" if layer.startswith("q") else "--")
        for layer, e in d[d.impl.str.startswith("sparse_")].groupby("layer"):
            ax.plot(e.threads.unique(), e.groupby("threads").bound_us.first() / 1e3, "k:", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=6)
        figures.label(ax, "threads", "latency per call (ms)", f"{where}; dotted: bandwidth bound (sparse)")
    fig.tight_layout()
    return fig


def batch_sweep(sweeps: dict[str, pd.DataFrame]) -> plt.Figure:
    """Left: latency per token against batch; right: AVX-512 sparse time / each implementation's time."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for where, sw in sweeps.items():
        ls = "-" if where == "Xeon" else "--"
        avx = sw[sw.impl == "sparse_avx512"].set_index("tokens").latency_us
        for impl, d in sw.groupby("impl"):
            axes[0].plot(d.tokens, d.latency_us / d.tokens, "o" + ls, label=f"{impl} ({where})",
                         color=figures.color(impl))
            axes[1].plot(d.tokens, avx[d.tokens].values / d.latency_us.values, "o" + ls, label=f"{impl} ({where})",
                         color=figures.color(impl))
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[1].axhline(1.0, color="k", lw=0.8)
    figures.label(axes[0], "tokens per call (batch)", "latency per token (µs)", "4096x4096 at 50 % sparsity")
    figures.label(axes[1], "tokens per call (batch)", "AVX-512 sparse time / this time (x)", "Against the AVX-512 kernel")
    fig.tight_layout()
    return fig


def pruning_cost(ppl: pd.DataFrame) -> plt.Figure:
    """Per model (one panel each): perplexity pruned / dense against sparsity, magnitude and Wanda, with the
    paired bootstrap interval of the ratio (both methods scored on the model's same windows); log scale."""
    models = list(dict.fromkeys(ppl.model))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        d = ppl[ppl.model == model]
        for method in ("magnitude", "wanda"):
            g = pd.concat([d[d.method == "dense"], d[d.method == method]]).sort_values("sparsity")
            if len(g) < 2:
                continue
            ax.errorbar(g.sparsity * 100, g.ppl_ratio, yerr=[g.ppl_ratio - g.ratio_lo, g.ratio_hi - g.ppl_ratio],
                        fmt="o-", capsize=3, label=method, color=figures.color(method))
        ax.axhline(1.0, color="gray", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        dense = d[d.method == "dense"].perplexity
        title = f"{model} (dense {dense.iloc[0]:.1f})" if len(dense) else model
        figures.label(ax, "sparsity (%)", "perplexity / dense (x, log)", title)
    fig.tight_layout()
    return fig
