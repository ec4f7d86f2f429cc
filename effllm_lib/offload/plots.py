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
