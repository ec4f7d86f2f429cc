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


# ------------------------------------------------------------------------------ the accelerator model (part 3)
def cycle_ratios(cycles: pd.DataFrame) -> plt.Figure:
    """Modelled / published cycle counts per design and stage, for both attention accountings (1 = exact)."""
    long = cycles.melt(id_vars=["model", "design", "stage"], value_vars=["ratio_heads_times", "ratio_per_kv_head"],
                       var_name="attention", value_name="ratio")
    long["attention"] = long.attention.str.replace("ratio_", "")
    grid = sns.catplot(data=long, x="design", y="ratio", hue="attention", col="stage", kind="strip", dodge=True,
                       height=3.6, aspect=1.4)
    for ax in grid.axes.flat:
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.tick_params(axis="x", rotation=20)
        figures.label(ax, "design", "modelled / published cycles (ratio)")
    grid.figure.suptitle("Modelled vs published cycle counts, six LLMs", y=1.03)
    return grid.figure


def _stage_bars(table: pd.DataFrame, suffix: str, ylabel: str, title: str) -> plt.Figure:
    plot = table.melt(id_vars=["model", "design"], value_vars=[f"prefill{suffix}", f"generation{suffix}"],
                      var_name="stage", value_name="value")
    plot["stage"] = plot.stage.str.replace(suffix, "")
    grid = sns.catplot(data=plot, x="model", y="value", hue="design", col="stage", kind="bar", height=3.6,
                       aspect=1.5, palette=[figures.color(d) for d in plot.design.unique()])
    for ax in grid.axes.flat:
        ax.tick_params(axis="x", rotation=30)
        figures.label(ax, "model", ylabel)
    grid.figure.suptitle(title, y=1.03)
    return grid.figure


def speedups(speedup_table: pd.DataFrame, context: int, decode_steps: int) -> plt.Figure:
    """Prefill and generation speed-up of each design over the FP16 accelerator, per model."""
    return _stage_bars(speedup_table, "_speedup", "speed-up over the FP16 accelerator (x)",
                       f"Speed-up over FP16 (heads-times accounting, {context}-token prefill, + {decode_steps} decode steps)")


def energies(energy_table: pd.DataFrame) -> plt.Figure:
    """Prefill and generation energy of each design normalized to the FP16 accelerator, per model."""
    return _stage_bars(energy_table, "_energy_vs_fp16", "energy / FP16 energy (ratio)",
                       "Total energy normalized to the FP16 accelerator (heads-times accounting)")


SENSITIVITY_LABELS = {"dram_bits_per_cycle": "DRAM bandwidth (bits per cycle)", "array_scale": "array side scale (x)",
                      "context": "context length (tokens)", "batch": "batch size (sequences)"}


def sensitivity(sweeps: pd.DataFrame) -> plt.Figure:
    """BitMoD-lossy's mean speed-up over ANT and OliVe as one knob changes, one panel per knob."""
    knobs = list(dict.fromkeys(sweeps.knob))
    fig, axes = plt.subplots(1, len(knobs), figsize=(3.75 * len(knobs), 3.6), sharey=True, squeeze=False)
    for ax, (knob, part) in zip(axes[0], sweeps.groupby("knob", sort=False)):
        for over, g in part.groupby("over"):
            for stage, style in (("prefill", "--"), ("generation", "-")):
                ax.plot(g.value, g[stage], style, marker="o", color=figures.color(over), label=f"vs {over}, {stage}")
        ax.set_xscale("log", base=2)
        figures.label(ax, SENSITIVITY_LABELS.get(knob, knob), "BitMoD-lossy speed-up (x)")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Sensitivity of BitMoD's advantage (per-KV-head attention, mean of six LLMs)")
    fig.tight_layout()
    return fig


def small_models(small: pd.DataFrame) -> plt.Figure:
    """Generation speed-up over FP16 of each design on small current models."""
    fig, ax = plt.subplots()
    rest = small[small.design != "FP16"]
    sns.barplot(data=rest, x="model", y="generation_speedup", hue="design", ax=ax,
                palette=[figures.color(d) for d in rest.design.unique()])
    figures.label(ax, "model", "generation speed-up over FP16 (x)", "Small current models, per-KV-head attention")
    return fig


# ------------------------------------------------------------------ KL and perplexity with intervals (part 2)
PAPER_COMPARISONS = ("ant vs bitmod", "olive vs ant", "olive vs bitmod", "int_asym vs bitmod", "nf4 vs bitmod",
                     "iq4_nl vs bitmod", "bitmod vs float")


def kl_by_config(summary: pd.DataFrame, bits=(3, 4)) -> plt.Figure:
    """Mean per-token KL divergence from the float model (nats, log scale) of every configuration, with its
    95% bootstrap interval over windows; one panel per bit width, round to nearest (open) vs clipped (filled)
    and calibrated configurations (squares) side by side per method."""
    d = summary[summary.config != "float"]
    fig, axes = plt.subplots(1, len(bits), figsize=(7 * len(bits), 4.5), squeeze=False)
    for ax, b in zip(axes[0], bits):
        s = d[d.bits == b].copy()
        if s.empty:
            raise ValueError(f"the summary has no {b}-bit configurations")
        methods = list(dict.fromkeys(s.dtype))
        for i, m in enumerate(methods):
            rows = s[s.dtype == m].sort_values(["calibration", "clip"])
            for j, r in enumerate(rows.itertuples()):
                x = i + (j - (len(rows) - 1) / 2) * 0.18
                marker = "o" if r.calibration == "none" else "s"
                ax.errorbar([x], [r.kl], yerr=[[r.kl - r.kl_lo], [r.kl_hi - r.kl]], fmt=marker, capsize=3,
                            color=figures.color(m), mfc=figures.color(m) if r.clip else "white")
                if r.calibration != "none":
                    ax.annotate(r.calibration, (x, r.kl_hi), fontsize=7, ha="center", va="bottom")
        ax.set_xticks(range(len(methods)), methods, rotation=30)
        ax.set_yscale("log")
        figures.label(ax, "method", "KL(float || quantized) per token (nats, log)",
                      f"{b}-bit weights (open: round to nearest, filled: clipped, square: calibrated)")
    fig.tight_layout()
    return fig


def paired_ratios(orderings: pd.DataFrame, comparisons=PAPER_COMPARISONS, calibration: str = "none") -> plt.Figure:
    """The paper's orderings as perplexity ratios a / b with their PAIRED 95% bootstrap intervals (both
    configurations scored on the same windows), one panel per bit width, without and with the clipping
    search. A ratio whose interval lies above 1 says a is worse than b."""
    d = orderings[(orderings.calibration == calibration) & orderings.comparison.isin(comparisons)]
    if d.empty:
        raise ValueError(f"no orderings among {comparisons} with calibration {calibration!r}")
    bits = sorted(d.bits.unique())
    fig, axes = plt.subplots(1, len(bits), figsize=(7 * len(bits), 4), squeeze=False)
    for ax, b in zip(axes[0], bits):
        s = d[d.bits == b]
        names = [c for c in comparisons if c in set(s.comparison)]
        for clip, dy, color in ((False, -0.15, "0.35"), (True, 0.15, "tab:red")):
            r = s[s["clip"] == clip].set_index("comparison").reindex(names).dropna(subset=["ppl_ratio"])
            y = [names.index(c) + dy for c in r.index]
            ax.errorbar(r.ppl_ratio, y, xerr=[r.ppl_ratio - r.ppl_ratio_lo, r.ppl_ratio_hi - r.ppl_ratio],
                        fmt="o", capsize=3, color=color, label="clipping search" if clip else "round to nearest")
        ax.axvline(1.0, color="0.5", ls="--", lw=1)
        ax.set_yticks(range(len(names)), [c.replace(" vs ", " / ") for c in names])
        ax.invert_yaxis()
        ax.set_xscale("log")
        figures.label(ax, "perplexity ratio a / b (paired 95% interval, log)", "comparison a / b",
                      f"{b}-bit weights")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
