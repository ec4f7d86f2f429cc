"""The BitMoD chapter's figures, one function per figure; each returns the matplotlib Figure it drew."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .. import figures
from . import datatypes as dt

VALUE_SET_NAMES = ("int3", "fp3", "fp3_er_pos", "fp3_er_neg", "fp3_ea_pos", "fp3_ea_neg",
                   "int4", "fp4", "flint4", "fp4_er_pos", "fp4_er_neg", "fp4_ea_pos", "fp4_ea_neg")
MSE_ORDER = ("int", "fp", "ant", "er", "ea", "olive", "mxfp", "nvfp", "bitmod")


def value_sets(names=VALUE_SET_NAMES) -> plt.Figure:
    """One row per data type: its representable values; BitMoD's special value (in the -0 code) in red."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for row, name in enumerate(names):
        g = dt.grid(name)
        base = set(dt.fp_grid(g.bits).values) if name.startswith("fp") else set(g.values)
        extra = [v for v in g.values if v not in base]
        ax.scatter(g.values, [row] * len(g.values), s=18, color="0.3")
        ax.scatter(extra, [row] * len(extra), s=40, color="tab:red")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    figures.label(ax, "representable value (grid units; FP4 = 2 x OCP E2M1)", "data type",
                  "Value sets (red: BitMoD's special value in the -0 code)")
    return fig


def synthetic_mse(synthetic: pd.DataFrame, bits=(3, 4), order=MSE_ORDER) -> plt.Figure:
    """Relative MSE (vs INT-asym) of each method per distribution, one panel per bit width."""
    fig, axes = plt.subplots(1, len(bits), figsize=(10, 4), sharey=True, squeeze=False)
    for ax, b in zip(axes[0], bits):
        d = synthetic[(synthetic.bits == b) & (synthetic.dtype.isin(order))]
        sns.barplot(d, x="dtype", y="relative_mse", hue="distribution", order=list(order), ax=ax)
        ax.axhline(1.0, color="0.4", lw=1, ls="--")
        figures.label(ax, "method", "MSE / MSE of INT-asym (ratio)", f"{b}-bit, groups of 128")
        ax.tick_params(axis="x", rotation=45)
    return fig


def real_weights(real: pd.DataFrame, types: pd.DataFrame, n_layers: int) -> plt.Figure:
    """Left: relative MSE per method on real weights (log); right: share of groups per chosen BitMoD type."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sns.barplot(real, x="dtype", y="relative_mse", hue="bits", ax=axes[0], errorbar=None)
    axes[0].set_yscale("log")
    figures.label(axes[0], "method", "relative MSE (MSE / mean w², log)", f"{n_layers} SmolLM2 layers")
    axes[0].tick_params(axis="x", rotation=45)
    share = types.groupby(["bits", "type"])["count"].sum().reset_index()
    share["share"] = share["count"] / share.groupby("bits")["count"].transform("sum")
    sns.barplot(share, x="type", y="share", hue="bits", ax=axes[1])
    figures.label(axes[1], "BitMoD type chosen", "share of groups (fraction)", "Which special value wins")
    return fig
