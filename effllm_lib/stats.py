"""Intervals for the numbers the scorecard decides on: percentile bootstrap, paired where the methods saw
the same inputs.

A paired design (two quantizers scored on the same questions, two controller modes on the same problems)
resamples the *items* and recomputes both sides on each resample, so the interval of a difference reflects
only how the methods disagree, not how hard the items are. A design whose items fall into groups of unequal
size (questions within tasks, windows within corpora) can resample within each group (``groups=``) and keep
the statistic's weighting intact.

We use numpy rather than scipy.stats.bootstrap: the paired, grouped resampling with an arbitrary statistic of
several aligned arrays is a few lines here, and scipy's vectorised API does not take the grouping.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

LEVEL = 0.95


def bootstrap_ci(statistic: Callable[..., float], *arrays: Sequence[float], groups: Sequence | None = None,
                 n_boot: int = 10_000, level: float = LEVEL, seed: int = 0) -> tuple[float, float, float]:
    """(estimate, lo, hi): ``statistic(*arrays)`` and its percentile bootstrap interval.

    All arrays are indexed by the same items and resampled together (paired). With ``groups``, items are
    resampled within each group, so every resample keeps each group's size.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    data = [np.asarray(a, dtype=float) for a in arrays]
    n = len(data[0])
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one item")
    if any(len(a) != n for a in data):
        raise ValueError(f"paired arrays must have the same length, got {[len(a) for a in data]}")
    if any(not np.isfinite(a).all() for a in data):
        raise ValueError("bootstrap_ci got a NaN or infinite value")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 100:
        raise ValueError(f"n_boot must be at least 100, got {n_boot}")
    rng = np.random.default_rng(seed)
    if groups is None:
        idx = rng.integers(0, n, size=(n_boot, n))
    else:
        g = np.asarray(groups)
        if len(g) != n:
            raise ValueError(f"groups has {len(g)} entries for {n} items")
        idx = np.empty((n_boot, n), dtype=np.int64)
        col = 0
        for label in dict.fromkeys(g.tolist()):
            members = np.flatnonzero(g == label)
            idx[:, col:col + len(members)] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
            col += len(members)
    estimate = float(statistic(*data))
    boots = np.array([statistic(*(a[i] for a in data)) for i in idx], dtype=float)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(boots, [tail, 100 - tail])
    # a percentile interval can miss a skewed estimate by a hair; the scorecard needs lo <= estimate <= hi
    return estimate, float(min(lo, estimate)), float(max(hi, estimate))


def mean_ci(values: Sequence[float], **kw) -> tuple[float, float, float]:
    """Mean and its bootstrap interval."""
    return bootstrap_ci(np.mean, values, **kw)


def paired_difference_ci(a: Sequence[float], b: Sequence[float], **kw) -> tuple[float, float, float]:
    """mean(a) - mean(b) over the same items, with a paired bootstrap interval."""
    return bootstrap_ci(lambda x, y: np.mean(x) - np.mean(y), a, b, **kw)


def group_mean_difference_ci(a: Sequence[float], b: Sequence[float], groups: Sequence, **kw) -> tuple[float, float, float]:
    """The mean over groups of (mean(a) - mean(b) within the group), paired and resampled within groups: e.g.
    the average accuracy loss over tasks of different sizes, each task weighted equally."""
    g = np.asarray(groups)
    labels = list(dict.fromkeys(g.tolist()))
    masks = [g == label for label in labels]

    def stat(x, y, masks=masks):
        return float(np.mean([x[m].mean() - y[m].mean() for m in masks]))

    # the statistic sees resampled arrays whose group positions are unchanged, since resampling is within groups
    order = np.concatenate([np.flatnonzero(m) for m in masks])
    a_sorted, b_sorted, g_sorted = np.asarray(a, float)[order], np.asarray(b, float)[order], g[order]
    masks_sorted = [g_sorted == label for label in labels]
    return bootstrap_ci(lambda x, y: stat(x, y, masks_sorted), a_sorted, b_sorted, groups=g_sorted, **kw)
