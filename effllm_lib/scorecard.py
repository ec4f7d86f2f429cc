"""The scorecard: every headline claim of the five papers next to our measurement and a verdict.

Claims live in ``data/paper/<chapter>.csv`` (one row per claim, columns ``PAPER_COLUMNS``). Our numbers live
in the chapter's results files (``data/results/<chapter>/*.csv``, written by ``results.save``) that have the
columns ``claim_id`` and ``ours``, optionally ``ours_lo`` and ``ours_hi`` (the 95% interval), ``status``,
``reason`` and ``stand_in`` (what was measured instead of the paper's setting, e.g. "SmolLM2-135M +
Qwen2.5-1.5B on gsm_symbolic").

The claim's columns that the rule reads:

* ``kind``: ``empirical`` (a measurement of hardware or accuracy) or ``model`` (our re-implementation of a
  formula, simulator or public model, run to see whether it gives the paper's numbers).
* ``tolerance``: relative tolerance on the claim's *effect*; ``effect_baseline`` (empty = 0) is the value of
  "no effect": 1 for a ratio such as ANT/BitMoD perplexity, so 1.029 against the paper's 1.065 is an effect
  of 0.029 / 0.065 = 0.45x and differs, although the ratios are within 4%.
* ``trend``: the claim's direction as a condition on our value (``>1``, ``<=0.5``); where it is empty and the
  paper value is known, the direction is the side of ``effect_baseline`` the paper's value lies on.
* ``needs_interval``: ``yes`` for accuracy claims, whose verdict must rest on an interval.
* ``measured_in``: the results file(s) (``;``-separated stems) holding the raw measurement behind the claim;
  the scorecard names their machine, commit and tree state. A claim with ``measured_in`` must be measured.

The rule, for one claim:

1. ``status == "not_reproducible"`` -> **not reproducible here** (the reason says why).
2. No value -> **not yet measured**. A value whose results file (or a ``measured_in`` file) came from a
   dirty or unknown tree -> **withdrawn** (rerun it from a clean commit).
3. The verdict of a value ``x`` is: **differs** if the direction fails at ``x``; else **reproduced** if the
   paper value is known and ``|(x - b) / (paper - b) - 1| <= tolerance`` (absolute ``|x - b| <= tolerance``
   when ``paper == b``); else **trend reproduced** if the claim has a direction; else **differs**.
4. With an interval ``[lo, hi]``, the verdicts at ``lo``, ``ours`` and ``hi`` are compared: all equal -> that
   verdict; {reproduced, trend reproduced} -> **trend reproduced** (the direction is decided, the size is
   not); any other mix -> **inconclusive** (the interval spans the threshold that decides the claim). A claim
   with ``needs_interval`` and no interval -> **inconclusive** (a point estimate decides nothing).
5. ``kind == "model"``: reproduced -> **model check**, anything else measured -> **model differs**; model rows
   never count as reproduced.
6. A row with ``stand_in`` is scored the same way and shown as ``stand-in: <verdict>``.

Run ``python -m effllm_lib.scorecard [chapter] [--csv]`` to print it.
"""

from __future__ import annotations

import argparse
import math
import operator
import re
import sys

import pandas as pd

from . import CHAPTERS
from . import results as _results
from .paths import data_dir

PAPER_COLUMNS = ("claim_id", "description", "quantity", "paper_value", "unit", "source", "tolerance", "trend",
                 "notes", "kind", "effect_baseline", "needs_interval", "measured_in")
KINDS = ("empirical", "model")
BASE_VERDICTS = ("reproduced", "trend reproduced", "inconclusive", "differs")
VERDICTS = ("reproduced", "trend reproduced", "inconclusive", "differs", "model check", "model differs",
            *(f"stand-in: {v}" for v in BASE_VERDICTS + ("model check", "model differs")),
            "withdrawn", "not reproducible here", "not yet measured")
# The summary's columns: stand-in verdicts are counted together, apart from the paper-setting ones.
SUMMARY_COLUMNS = ("reproduced", "trend reproduced", "inconclusive", "differs", "model check", "model differs",
                   "stand-in", "withdrawn", "not reproducible here", "not yet measured")
CHAPTER_TITLES = {
    "splitreason": "SplitReason",
    "sparamx": "SparAMX",
    "bitmod": "BitMoD",
    "serving": "Beyond Inference",
    "pqa": "PQA",
}
_TREND = re.compile(r"^\s*(>=|<=|>|<|==)\s*(-?[0-9.eE+-]+)\s*$")
_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq}


class ScorecardError(ValueError):
    """A claims or results file breaks the scorecard's schema; the message names the file."""


def _number(value) -> float | None:
    """A float, or None for unknown / empty."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if value == "" or value.lower() == "unknown":
            return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


# ------------------------------------------------------------------------------------------------ the rule
def verdict(paper_value, ours, tolerance="", trend="", status: str = "measured", *, lo=None, hi=None,
            effect_baseline="", kind: str = "empirical", needs_interval: bool = False) -> tuple[str, float | None]:
    """(verdict, ratio ours/paper) for one claim; the module docstring states the rule."""
    if status == "not_reproducible":
        return "not reproducible here", None
    x = _number(ours)
    if x is None:
        return "not yet measured", None
    paper = _number(paper_value)
    ratio = x / paper if paper not in (None, 0.0) else None
    lo_f, hi_f = _number(lo), _number(hi)
    if (lo_f is None) != (hi_f is None):
        raise ScorecardError("an interval needs both ours_lo and ours_hi")
    if lo_f is not None and not lo_f <= x <= hi_f:
        raise ScorecardError(f"the interval [{lo_f}, {hi_f}] does not contain ours = {x}")
    if lo_f is None and needs_interval:
        return _kinded("inconclusive", kind), ratio
    points = [x] if lo_f is None else [lo_f, x, hi_f]
    base = _number(effect_baseline)
    found = {_point_verdict(v, paper, _number(tolerance), trend, base) for v in points}
    if len(found) == 1:
        out = found.pop()
    elif found == {"reproduced", "trend reproduced"}:
        out = "trend reproduced"
    else:
        out = "inconclusive"
    return _kinded(out, kind), ratio


def _point_verdict(x: float, paper: float | None, tol: float | None, trend: str, base: float | None) -> str:
    match = _TREND.match(trend or "")
    if match:
        direction_holds = _OPS[match.group(1)](x, float(match.group(2)))
        has_direction = True
    elif paper is not None and base is not None and paper != base:
        # no stated trend: the direction is the side of "no effect" that the paper's value lies on
        direction_holds = (x - base) * (paper - base) > 0
        has_direction = True
    else:
        direction_holds, has_direction = True, False
    if not direction_holds:
        return "differs"
    if paper is not None and tol is not None:
        base = base or 0.0
        effect = paper - base
        close = abs(x - base) <= tol if effect == 0 else abs((x - base) / effect - 1) <= tol
        if close:
            return "reproduced"
    return "trend reproduced" if has_direction else "differs"


def _kinded(v: str, kind: str) -> str:
    if kind != "model":
        return v
    return "model check" if v == "reproduced" else "model differs"


# ------------------------------------------------------------------------------------------------ the files
def paper_claims(chapter: str) -> pd.DataFrame:
    """The claims table of one chapter, validated."""
    path = data_dir() / "paper" / f"{chapter}.csv"
    if not path.is_file():
        raise ScorecardError(f"{path}: claims file not found")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in PAPER_COLUMNS if c not in df.columns]
    if missing:
        raise ScorecardError(f"{path}: missing columns {', '.join(missing)}")
    if df["claim_id"].duplicated().any():
        raise ScorecardError(f"{path}: duplicate claim ids {sorted(set(df.claim_id[df.claim_id.duplicated()]))}")
    for row in df.itertuples():
        where = f"{path}: claim {row.claim_id}"
        if row.paper_value.strip().lower() != "unknown" and _number(row.paper_value) is None:
            raise ScorecardError(f"{where}: paper_value {row.paper_value!r} is neither a number nor 'unknown'")
        if row.trend.strip() and not _TREND.match(row.trend):
            raise ScorecardError(f"{where}: trend {row.trend!r} is not like '>1' or '<=0.5'")
        for col in ("tolerance", "effect_baseline"):
            value = getattr(row, col)
            if value.strip() and _number(value) is None:
                raise ScorecardError(f"{where}: {col} {value!r} is not a number")
        if row.kind not in KINDS:
            raise ScorecardError(f"{where}: kind {row.kind!r} is not one of {', '.join(KINDS)}")
        if row.needs_interval not in ("yes", ""):
            raise ScorecardError(f"{where}: needs_interval {row.needs_interval!r} is neither 'yes' nor empty")
    df.insert(0, "chapter", chapter)
    return df


def _provenance(chapter: str, stem: str) -> dict:
    """Machine, commit and tree state of one results file, for the scorecard's traceability columns."""
    meta = _results.load(chapter, stem).attrs["provenance"]
    return {"file": f"{chapter}/{stem}.csv", "machine": _results.machine_name(meta.get("hardware") or {}),
            "commit": str(meta.get("commit", "unknown"))[:8], "dirty": meta.get("dirty"),
            "scale": meta.get("scale")}


def measured_claims(chapter: str) -> pd.DataFrame:
    """Our values for the chapter's claims, gathered from every results file that has claim_id and ours."""
    rows = []
    for name in _results.available(chapter):
        df = _results.load(chapter, name)
        if not {"claim_id", "ours"} <= set(df.columns):
            continue
        for rec in df.to_dict("records"):
            ours = rec["ours"]
            status = "measured" if _blank(rec.get("status")) else str(rec["status"])
            if status not in ("measured", "not_reproducible"):
                raise ScorecardError(f"{chapter}/{name}.csv: claim {rec['claim_id']}: status {status!r} is "
                                     "neither 'measured' nor 'not_reproducible'")
            if status == "measured" and _number(ours) is None:
                raise ScorecardError(f"{chapter}/{name}.csv: claim {rec['claim_id']}: ours {ours!r} is not a "
                                     "number (a claim that can't be measured here has status not_reproducible)")
            rows.append({
                "claim_id": str(rec["claim_id"]),
                "ours": ours,
                "ours_lo": rec.get("ours_lo"),
                "ours_hi": rec.get("ours_hi"),
                "status": status,
                "reason": "" if _blank(rec.get("reason")) else str(rec["reason"]),
                "stand_in": "" if _blank(rec.get("stand_in")) else str(rec["stand_in"]),
                "results_file": f"{chapter}/{name}.csv",
            })
    out = pd.DataFrame(rows, columns=["claim_id", "ours", "ours_lo", "ours_hi", "status", "reason", "stand_in",
                                      "results_file"])
    dup = out["claim_id"][out["claim_id"].duplicated()]
    if len(dup):
        files = out[out.claim_id.isin(dup)].results_file.unique()
        raise ScorecardError(f"claims {sorted(set(dup))} of chapter {chapter} are measured in more than one "
                             f"results file ({', '.join(files)})")
    return out


def table(chapter: str | None = None) -> pd.DataFrame:
    """Claim, paper value, ours, interval, ratio, verdict, reason and provenance for one chapter (or all)."""
    chapters = [chapter] if chapter else list(CHAPTERS)
    for ch in chapters:
        if ch not in CHAPTERS:
            raise ValueError(f"unknown chapter {ch!r}; expected one of {', '.join(CHAPTERS)}")
    frames = []
    for ch in chapters:
        claims = paper_claims(ch)
        ours = measured_claims(ch)
        unknown_ids = set(ours.claim_id) - set(claims.claim_id)
        if unknown_ids:
            raise ScorecardError(f"results of chapter {ch} name claims that data/paper/{ch}.csv lacks: "
                                 f"{sorted(unknown_ids)}")
        merged = claims.merge(ours, on="claim_id", how="left")
        out_rows = []
        for row in merged.to_dict("records"):
            out_rows.append(_score_row(ch, row))
        frames.append(pd.DataFrame(out_rows))
    out = pd.concat(frames, ignore_index=True)
    out["paper"] = out["chapter"].map(CHAPTER_TITLES)
    return out


def _score_row(chapter: str, row: dict) -> dict:
    status = row["status"] if isinstance(row.get("status"), str) else "measured"
    sources = [s.strip() for s in row["measured_in"].split(";") if s.strip()]
    available = set(_results.available(chapter))
    for stem in sources:
        if stem not in available:
            raise ScorecardError(f"data/paper/{chapter}.csv: claim {row['claim_id']}: measured_in names "
                                 f"{chapter}/{stem}.csv, which does not exist")
    measured = isinstance(row.get("results_file"), str)
    if sources and not measured:
        raise ScorecardError(f"data/paper/{chapter}.csv: claim {row['claim_id']} says it is measured in "
                             f"{', '.join(sources)}, but no results file gives it a value (claim_id, ours)")
    prov = [_provenance(chapter, s) for s in sources]
    if measured:
        own = _provenance(chapter, row["results_file"].split("/", 1)[1].removesuffix(".csv"))
        prov = prov or [own]
        unclean = [p["file"] for p in prov + [own] if p["dirty"] is not False]
    else:
        unclean = []
    v, ratio = verdict(row["paper_value"], row.get("ours"), row["tolerance"], row["trend"], status,
                       lo=row.get("ours_lo"), hi=row.get("ours_hi"), effect_baseline=row["effect_baseline"],
                       kind=row["kind"], needs_interval=row["needs_interval"] == "yes")
    reason = row["reason"] if isinstance(row.get("reason"), str) else ""
    if v == "not yet measured" and not reason:
        reason = "no measurement committed yet"
    if unclean and v not in ("not reproducible here", "not yet measured"):
        v = "withdrawn"
        reason = (f"measured from a dirty or unknown tree ({', '.join(sorted(set(unclean)))}): rerun from a clean "
                  "commit. " + reason).strip()
    elif status == "measured" and row["needs_interval"] == "yes" and _number(row.get("ours_lo")) is None \
            and v.endswith("inconclusive"):
        reason = ("no interval recorded: a point estimate cannot decide an accuracy claim. " + reason).strip()
    stand_in = row["stand_in"] if isinstance(row.get("stand_in"), str) else ""
    if stand_in and v not in ("not reproducible here", "not yet measured", "withdrawn"):
        v = f"stand-in: {v}"
    out = {k: row.get(k) for k in ("chapter",) + PAPER_COLUMNS}
    out.update({
        "ours": row.get("ours"), "ours_lo": row.get("ours_lo"), "ours_hi": row.get("ours_hi"), "status": status,
        "verdict": v, "ratio": ratio, "reason": reason, "stand_in": stand_in,
        "results_file": row.get("results_file") if measured else "",
        "measured_in": "; ".join(p["file"] for p in prov),
        "machine": "; ".join(dict.fromkeys(p["machine"] for p in prov)),
        "commit": "; ".join(dict.fromkeys(p["commit"] + ("+dirty" if p["dirty"] else "" if p["dirty"] is False
                                                           else "?") for p in prov)),
        "dirty": any(p["dirty"] is not False for p in prov) if prov else None,
    })
    return out


# --------------------------------------------------------------------------------------------------- views
def render(chapter: str | None = None, *, columns=("claim_id", "description", "kind", "paper_value", "ours",
                                                   "interval", "unit", "ratio", "verdict", "reason", "machine",
                                                   "measured_in", "commit")) -> pd.DataFrame:
    """A readable view of ``table``: rounded numbers, 'unknown' / '-' where there is none."""
    df = table(chapter)
    view = df.copy()
    view["interval"] = [f"[{_fmt(a)}, {_fmt(b)}]" if _number(a) is not None else "-"
                        for a, b in zip(view["ours_lo"], view["ours_hi"])]
    view["ours"] = [_fmt(v) for v in view["ours"]]
    view["paper_value"] = [("unknown" if _number(v) is None else _fmt(v)) for v in view["paper_value"]]
    view["ratio"] = [_fmt(v) for v in view["ratio"]]
    if chapter is None:
        columns = ("paper",) + tuple(columns)
    return view[list(columns)].rename(columns={"claim_id": "claim", "paper_value": "paper value",
                                               "interval": "95% interval", "measured_in": "results file"})


def summary() -> pd.DataFrame:
    """Verdict counts per paper; stand-in verdicts are counted in their own column."""
    df = table()
    grouped = df["verdict"].where(~df["verdict"].str.startswith("stand-in"), "stand-in")
    counts = df.assign(verdict=grouped).groupby(["paper", "verdict"]).size().unstack(fill_value=0)
    return counts.reindex(columns=list(SUMMARY_COLUMNS), fill_value=0)


def _fmt(value) -> str:
    f = _number(value)
    if f is None:
        return "-"
    if f != 0 and (abs(f) >= 1e5 or abs(f) < 1e-3):
        return f"{f:.3g}"
    return f"{f:.4g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="effllm scorecard",
        description="Print every claim of the papers with the paper's value, ours, the verdict and where it "
                    "was measured. The rule is in effllm_lib.scorecard's docstring and on the book's "
                    "scorecard page.")
    parser.add_argument("chapter", nargs="?", choices=CHAPTERS, help="one chapter (default: all)")
    parser.add_argument("--csv", action="store_true", help="print the full table as CSV, for scripts")
    parser.add_argument("--summary", action="store_true", help="print the verdict counts per paper")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.summary:
            out = summary()
            print(out.to_csv() if args.csv else out.to_string())
            return 0
        if args.csv:
            print(table(args.chapter).to_csv(index=False), end="")
            return 0
        view = render(args.chapter)
    except (ScorecardError, _results.ResultsError) as exc:
        print(f"scorecard: {exc}", file=sys.stderr)
        return 1
    with pd.option_context("display.max_colwidth", 60, "display.width", 250):
        print(view.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
