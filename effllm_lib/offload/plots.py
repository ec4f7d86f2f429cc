"""The SplitReason chapter's figures, one function per figure; each returns the matplotlib Figure it drew."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .. import figures
from . import rewards


def speedup_vs_offload(table: pd.DataFrame, title: str, marks=()) -> plt.Figure:
    """Simulated speed-up over the big model alone against the offloaded share, one line per model pair.

    ``table`` is ``simulator.speedup_table(...)`` (columns pair, coverage, speedup); ``marks`` are offload
    percentages drawn as dashed lines (the paper's table columns)."""
    fig, ax = plt.subplots()
    for pair, grp in table.groupby("pair", sort=False):
        ax.plot(100 * grp.coverage, grp.speedup, label=pair, color=figures.color(pair))
    for x in marks:
        ax.axvline(x, ls="--", lw=0.8, color="grey")
    figures.label(ax, "tokens decoded by the big model (%)", "speed-up over the big model alone (x)", title)
    if table.pair.nunique() > 1:
        ax.legend()
    return fig


def coverage_reward_curve(peak: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """The published coverage reward as a function of the share of characters inside tags (before the x2)."""
    r = np.linspace(0, 1, 201)
    return r, np.where(r <= 0, 0.0, np.where(r < peak, r / peak, np.clip(1 - (2 / (1 - peak)) * (r - peak), -1, 1)))


def reward_shapes(max_tags: int = 20) -> plt.Figure:
    """Left: the coverage reward against the tagged share (%); right: the tag-count term against the tag count."""
    r, cov_reward = coverage_reward_curve()
    counts = np.arange(0, max_tags + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(100 * r, cov_reward, color=figures.color("coverage"))
    ax1.axvline(40, ls="--", lw=0.8, color="grey")
    figures.label(ax1, "characters inside <bigmodel> tags (%)", "coverage reward (before the x2)", "Coverage")
    ax2.step(counts, [rewards.bigmodel_count_term(int(n)) for n in counts], where="mid", color=figures.color("count"))
    figures.label(ax2, "number of <bigmodel> tags", "tag-count term", "Tag count (floor division)")
    fig.tight_layout()
    return fig


def accuracy_vs_offload(summary: pd.DataFrame, title: str = "") -> plt.Figure:
    """pass@1 (with its bootstrap interval) against the share of tokens the big model wrote, one series per
    method: each trigger and random switching as lines over their budgets, the single models, step-level
    speculation and assisted generation as points (assisted at the share of tokens not drafted by the small
    model: the big model verified them all). ``summary`` is ``trigger_eval.summarize(...)``."""
    need = {"mode", "kind", "pass@1", "ci_lo", "ci_hi", "big_token_pct"}
    if not isinstance(summary, pd.DataFrame) or summary.empty or not need <= set(summary.columns):
        raise ValueError(f"summary needs columns {sorted(need)} (trigger_eval.summarize)")
    fig, ax = plt.subplots(figsize=(7, 4))
    markers = {"small": "s", "big": "D", "assisted": "P", "step": "^", "random": "x"}
    for kind, grp in summary.groupby("kind", sort=False):
        grp = grp.sort_values("big_token_pct")
        x = grp.big_token_pct
        if kind == "assisted" and "drafted_pct" in grp:  # the big model verified every token; it wrote the rest
            x = 100 - grp.drafted_pct
        y = 100 * grp["pass@1"]
        err = [100 * (grp["pass@1"] - grp.ci_lo), 100 * (grp.ci_hi - grp["pass@1"])]
        label = {"small": "small only", "big": "big only", "assisted": "assisted (x: tokens not from drafts)",
                 "step": "step-level speculative", "random": "random switching"}.get(kind, f"{kind} trigger")
        ax.errorbar(x, y, yerr=err, marker=markers.get(kind, "o"), capsize=3,
                    ls="-" if len(grp) > 1 else "none", label=label, color=figures.color(label))
    figures.label(ax, "tokens written by the big model (%)", "pass@1 (%)", title)
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=7)
    return fig
