"""SplitReason's GRPO rewards, as published (training/open-r1/src/open_r1/rewards.py, final version).

Three rewards, summed with equal weight in training:

* ``accuracy_reward``: 1 if the completion's final answer is a number equal to the gold (the strict check of
  ``answers.py``, the same one evaluation uses), else 0; ``None`` if the gold holds no number (the original skips
  such examples). ``published=True`` gives the original's math_verify check instead (kept to reproduce the
  published signal, quirk 1 included): it evaluates what it extracts, so a completion that restates the
  question, ``\\boxed{(2 - -4)}``, earns the reward of the answer 6 it never wrote. A task's own scorer can be
  passed instead.
* ``format_reward``: +1 for the ``<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`` scaffold, +1 if the
  ``<bigmodel>`` tags pair up and do not overlap.
* ``tag_count_reward``: scaffold partial credit (0.5 / 0.5 / 0.25 / 0.25, +0.5 for ``\\boxed{``), a tag-count
  term, 2 x the coverage reward (rises linearly to +1 at 40% of the characters inside tags, falls linearly to
  -1 at 100%), and -2 when the number of opening and closing tags differ.

The original's quirks are reproduced on purpose (the accuracy quirk only with ``published=True``) (a reproduction of the published training signal), each one
tested in tests/test_offload_rewards.py:

1. ``boxed="all"``: every ``\\boxed{}`` in the completion is extracted into one set, so a completion that boxes
   an intermediate result next to the right final answer scores 0 ({3, 42} != 42).
2. The scaffold regex runs with ``re.MULTILINE``, so ``$`` also matches before any newline: text after
   ``</answer>`` on a later line still earns the format point.
3. The nesting check returns True when there are no tags at all (+1 for every tag-free completion), and it
   ignores stray closing tags (``"a</bigmodel>b"`` passes) because it only scans from each opening tag.
4. The tag-count term is ``(0.5 n if n <= 8 else 4 - 0.5 (n - 8)) // 2`` with Python's floor division on a
   float: 0 for 0-3 opening tags, 1 for 4-7, 2 for exactly 8, then back to 1, 0 and negative values.
   (The docstring in the original still describes an older +0.25-per-tag rule.)
5. Coverage counts characters between *paired* tags (non-greedy regex) over the length of the whole
   completion, tags included; an unclosed ``<bigmodel>`` contributes nothing, and no tags gives 0 (not the -1
   one might expect from "zero offload"), so the coverage term only rewards offloading.
6. Tags are plain text, never vocabulary tokens, and the SFT data wrote the closing tag as ``<\\bigmodel>``
   while these rewards (and the controller) look for ``</bigmodel>``: a model that copies the data's closing
   tag earns the unbalanced-tag penalty. ``normalize_close_tags`` maps the typo to ``</bigmodel>`` (our fix for
   data, not applied inside the rewards).

The original also passed ``equations=True`` to math_verify's NormalizationConfig; current math_verify deprecates
it (equations are handled by the parser), so it is left out here with no change in behaviour.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

from .answers import gold_number, strict_score

BIG_OPEN = "<bigmodel>"
BIG_CLOSE = "</bigmodel>"
BIG_CLOSE_TYPO = "<\\bigmodel>"  # what the annotator wrote in the SFT data
COVERAGE_PEAK = 0.4  # the final version (an earlier one peaked at 0.2)

_SCAFFOLD = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", flags=re.DOTALL | re.MULTILINE)
_TAGGED = re.compile(re.escape(BIG_OPEN) + r"(.*?)" + re.escape(BIG_CLOSE), flags=re.DOTALL)


def _check_text(text, name="completion") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    return text


# ------------------------------------------------------------------------------------------------ accuracy
def _answer_extraction():
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig

    return [LatexExtractionConfig(
        normalization_config=NormalizationConfig(nits=False, malformed_operators=False, basic_latex=True,
                                                 boxed="all", units=True),
        boxed_match_priority=0,  # boxed answers first
        try_extract_without_anchor=False,
    )]


def accuracy_reward(completion: str, solution: str, scorer: Callable[[str, str], float] | None = None, *,
                    published: bool = False) -> Optional[float]:
    """1.0 if the completion's final answer is a number equal to ``solution`` (``answers.strict_score``), else
    0.0; None if the gold holds no number. ``published=True``: the original's math_verify check. With
    ``scorer(completion, solution)`` the task's own scorer decides instead."""
    _check_text(completion)
    _check_text(solution, "solution")
    if scorer is not None:
        return float(scorer(completion, solution))
    if not published:
        if gold_number(solution) is None:
            return None
        return strict_score(completion, solution)
    from math_verify import parse, verify

    gold = parse(solution, extraction_mode="first_match")
    if len(gold) == 0:
        return None
    answer = parse(completion, extraction_config=_answer_extraction(), extraction_mode="first_match")
    try:
        return float(verify(gold, answer))
    except Exception:  # noqa: BLE001 - math_verify raises on odd expressions; the original skips them too
        return None


# -------------------------------------------------------------------------------------------------- format
def has_proper_bigmodel_nesting(text: str) -> bool:
    """True iff every ``<bigmodel>`` is closed before the next one opens (quirk 3: no tags -> True, stray
    closing tags are not checked)."""
    pos = 0
    while True:
        open_pos = text.find(BIG_OPEN, pos)
        if open_pos == -1:
            return True
        close_pos = text.find(BIG_CLOSE, open_pos + len(BIG_OPEN))
        if close_pos == -1:
            return False
        next_open = text.find(BIG_OPEN, open_pos + len(BIG_OPEN))
        if next_open != -1 and next_open < close_pos:
            return False
        pos = close_pos + len(BIG_CLOSE)


def format_reward(completion: str) -> float:
    """+1 for the think/answer scaffold, +1 for well-nested bigmodel tags."""
    text = _check_text(completion)
    return float(bool(_SCAFFOLD.match(text))) + float(has_proper_bigmodel_nesting(text))


# ------------------------------------------------------------------------------------------ tags, coverage
def coverage(text: str) -> float:
    """Fraction of the completion's characters inside paired ``<bigmodel>...</bigmodel>`` (tags not counted
    inside, but counted in the total)."""
    text = _check_text(text)
    if not text:
        return 0.0
    return sum(len(seg) for seg in _TAGGED.findall(text)) / len(text)


def coverage_reward(text: str, peak: float = COVERAGE_PEAK) -> float:
    """0 without tagged text; rises linearly to +1 at ``peak``; falls linearly to -1 at ratio 1."""
    if not 0.0 < peak < 1.0:
        raise ValueError(f"peak must be in (0, 1), got {peak!r}")
    r = coverage(text)
    if r <= 0:
        return 0.0
    if r < peak:
        return r / peak
    slope = -2.0 / (1.0 - peak)
    return max(-1.0, min(slope * r + 1.0 - slope * peak, 1.0))


def bigmodel_count_term(n_open: int) -> float:
    """The original's tag-count term, floor division included (quirk 4)."""
    if not isinstance(n_open, int) or n_open < 0:
        raise ValueError(f"n_open must be a non-negative int, got {n_open!r}")
    raw = 0.5 * n_open if n_open <= 8 else 4.0 - 0.5 * (n_open - 8)
    return raw // 2


def tag_count_reward(completion: str, peak: float = COVERAGE_PEAK) -> float:
    """Scaffold partial credit + tag-count term + 2 x coverage reward - 2 if the tag counts differ."""
    text = _check_text(completion)
    r = 0.0
    r += 0.5 if text.count("<think>\n") == 1 else 0.0
    r += 0.5 if text.count("\n</think>\n") == 1 else 0.0
    r += 0.25 if text.count("\n<answer>\n") == 1 else 0.0
    r += 0.25 if text.count("\n</answer>") == 1 else 0.0
    r += 0.5 if "\\boxed{" in text else 0.0
    n_open, n_close = text.count(BIG_OPEN), text.count(BIG_CLOSE)
    r += bigmodel_count_term(n_open)
    r += 2.0 * coverage_reward(text, peak)
    if n_open != n_close:
        r -= 2.0
    return r


def total_reward(completion: str, solution: str, scorer=None, *, published: bool = False
                 ) -> dict[str, Optional[float]]:
    """The three rewards and their equal-weight sum (None if accuracy is None, as GRPO then skips it)."""
    acc = accuracy_reward(completion, solution, scorer, published=published)
    fmt, tags = format_reward(completion), tag_count_reward(completion)
    return {"accuracy": acc, "format": fmt, "tag_count": tags,
            "total": None if acc is None else acc + fmt + tags}


def normalize_close_tags(text: str) -> str:
    """Map the SFT data's ``<\\bigmodel>`` typo to ``</bigmodel>`` (quirk 6)."""
    return _check_text(text).replace(BIG_CLOSE_TYPO, BIG_CLOSE)
