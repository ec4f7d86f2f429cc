"""Numbers in a chapter's prose, read from committed full-scale results (see scripts/check_glue.py).

A notebook states a result in its markdown as ``{glue:text}`name:.1f` `` and computes it in a code cell::

    from effllm_lib import glue
    bd = glue.committed("serving", "breakdown")           # the committed full-scale file, never a CI run
    glue.number("share_medium", bd.loc[..., "preprocess_share"])
    glue.number("rounds", glue.params(bd)["rounds"])      # a setting of the committed run, from its provenance

``number`` turns numpy scalars into Python numbers first: MyST-NB formats the *repr* of a glued value, and
``np.float64(65.2)`` (numpy 2's repr) cannot be formatted with ``:.1f``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import pandas as pd

from . import results


def committed(chapter: str, name: str) -> pd.DataFrame:
    """``results.load(chapter, name)``, refusing anything but a full-scale file (never the CI stand-in)."""
    df = results.load(chapter, name)
    scale = df.attrs["provenance"].get("scale")
    if scale != "full":
        raise results.ResultsError(f"{df.attrs.get('path', name)}: scale {scale!r}, but prose may only quote "
                                   "committed full-scale results")
    return df


def params(df: pd.DataFrame) -> dict[str, Any]:
    """The parameters a results frame was produced with (its provenance), to glue a run's settings."""
    meta = df.attrs.get("provenance")
    if not meta:
        raise ValueError("this frame has no provenance: load it with results.load / glue.committed")
    return meta.get("params", {})


def as_number(value: Any) -> int | float:
    """A Python int or float from a number-like value (numpy scalar, 0-d array, one-element Series)."""
    if isinstance(value, (pd.Series, pd.DataFrame, np.ndarray)):
        if value.size != 1:
            raise ValueError(f"expected one number, got a {type(value).__name__} of {value.size} values")
        value = np.asarray(value).reshape(-1)[0]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"expected a number, got {type(value).__name__} {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"refusing to glue a non-finite number ({value}) into the prose")
    return value


def number(name: str, value: Any) -> int | float:
    """Glue a number under ``name`` without displaying it; returns the Python number glued."""
    from myst_nb import glue as myst_glue

    value = as_number(value)
    myst_glue(name, value, display=False)
    return value


def numbers_(**values: Any) -> None:
    """Glue several numbers at once: ``glue.numbers_(share_medium=..., share_large=...)``."""
    for name, value in values.items():
        number(name, value)


def text(name: str, value: str) -> str:
    """Glue a short text (a machine's name, a commit) read from a results file."""
    from myst_nb import glue as myst_glue

    if not isinstance(value, str):
        raise TypeError(f"expected a str, got {type(value).__name__}")
    myst_glue(name, value, display=False)
    return value
