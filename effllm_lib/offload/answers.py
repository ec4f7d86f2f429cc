"""The strict answer check used for evaluation and for the accuracy reward.

A completion is right only if its *final* answer is a number equal to the gold number:

1. The completion is cut at the first end-of-turn / end-of-sequence marker (``<|im_end|>``, ``<|endoftext|>``,
   ``<|eot_id|>``, ...): nothing a model writes after its turn ended is part of its answer. ``<bigmodel>`` tags are
   removed (they are plain text inside the reasoning).
2. The final answer is the last ``\\boxed{...}``; without one, the last declared answer ("the answer is X",
   "Final answer: X", "Answer: X", the rest of that line, or of the next non-empty line when the declaration
   ends the line).
3. That answer must be a single number once its wrappers are removed: math delimiters, ``\\text{}``, spacing
   commands, a currency sign, a trailing ``%`` or unit words (``18 days``), one pair of outer parentheses.
   Forms of one value are equal: ``1/2``, ``0.5``, ``\\frac{1}{2}``, ``1,000``, ``1000``, ``-3`` and ``−3``.
   ``expr = v`` (or ``v`` after the last ``=`` of a chain) is read as ``v``: "(x - y) = 10" is the claim 10,
   right only if the gold is 10. An expression (``(-9 - 7) * 2``, ``5 \\times 3``), several numbers
   (``3, 42``), words with a number inside (``10 or 12``) are not a number and score 0, whatever they evaluate to.

Why not math_verify alone (the published reward): it evaluates what it extracts, so ``\\boxed{(2 - -4)}`` or
"the final answer is \\((2 - -4)\\) = 2" matches a gold of 6 although the model never computed 6 (it wrote 2);
restating the question is then rewarded. math_verify stays the reference the tests compare with on
equivalent forms of one value, where it is right. This check needs nothing outside the standard library, so the
GPU machine (no math_verify) scores completions exactly as ``merge`` does.

Gold answers are read leniently (they are data, not model output): BIG-bench MathQA writes ``'$ 375'``,
``18 days``, ``240 %`` (read as 240, as the question asks for the percentage), ``3 : 10`` (a ratio, read as
3/10; a model may answer ``3:10``, ``3/10`` or ``0.3``).
"""

from __future__ import annotations

import re
from fractions import Fraction

END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>",
               "<|end▁of▁sentence|>", "</s>")
_TAGS = ("<bigmodel>", "</bigmodel>", "<\\bigmodel>")

# a declaration: "final answer is", "the answer is:", "Answer:", "answer ="
_DECLARED = re.compile(r"\banswer\s*(?:(?:is|will\s+be|would\s+be|should\s+be)\b\s*[:=]?|[:=])[ \t]*",
                       re.IGNORECASE)
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_INT = r"[+-]?\d+"
_NUMBER_RE = re.compile(
    rf"^(?P<sign>[+-]?)\s*(?:"
    rf"\\frac\{{\s*(?P<fn>{_INT})\s*\}}\{{\s*(?P<fd>{_INT})\s*\}}"      # \frac{1}{2}
    rf"|(?P<sn>\d+)\s*/\s*(?P<sd>\d+)"                                  # 1/2
    rf"|(?P<rn>\d+)\s*:\s*(?P<rd>\d+)"                                  # 3 : 10 (a ratio)
    rf"|(?P<dec>{_UNSIGNED})"                                           # 1,000.5
    rf")$")
# unit words after the number: two letters or more, or one of the one-letter units (m, s, h, l, g), °, %, "/"
_UNITS = re.compile(r"(?:\s*(?:%|/|°\s*[A-Za-z]?|[A-Za-z][A-Za-z'.²³]+|[mshlgL]\b\.?))+\s*$")
_WRAPPERS = [(re.compile(r"^\$+(.*?)\$+$", re.S), r"\1"), (re.compile(r"^\\\((.*)\\\)$", re.S), r"\1"),
             (re.compile(r"^\\\[(.*)\\\]$", re.S), r"\1"), (re.compile(r"^\\boxed\{(.*)\}$", re.S), r"\1")]
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")


def cut_at_end_of_turn(text: str) -> str:
    """The text before the first end-of-turn or end-of-sequence marker."""
    cut = len(text)
    for marker in END_MARKERS:
        i = text.find(marker)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        i, depth = start + len("\\boxed{"), 1
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j].strip()
        start = text.rfind("\\boxed{", 0, start)  # unclosed: an earlier, closed one may still be there
    return None


def last_declared(text: str) -> str | None:
    """The answer of the last "answer is X" style declaration: a display-math block right after it, else the
    rest of its line (or the next non-empty line when the declaration ends its line), up to a sentence break."""
    matches = list(_DECLARED.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():]
    display = re.match(r"\s*(\\\[.*?\\\]|\$\$.*?\$\$)", rest, re.S)
    if display:
        return display.group(1).strip()
    lines = [ln.strip() for ln in rest.split("\n")]
    line = lines[0] or next((ln for ln in lines[1:] if ln), "")
    # the answer ends at a sentence or clause break ("42. Let me check", "42, since ...")
    return re.split(r"[.;,!?](?:\s|$)", line, maxsplit=1)[0].strip() or None


def final_answer(completion: str) -> str | None:
    """The completion's final answer text (see the module docstring), or None."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    text = cut_at_end_of_turn(completion)
    for tag in _TAGS:
        text = text.replace(tag, "")
    boxed = last_boxed(text)
    return boxed if boxed is not None else last_declared(text)


def _unwrap(s: str) -> str:
    s = s.replace("−", "-").replace("–", "-").replace("{,}", ",").replace("\\%", "%").replace("\\$", "$")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\(?:left|right)\b", "", s)
    s = re.sub(r"\\[!,;: ]|~", " ", s)
    for _ in range(4):  # nested wrappers: $\boxed{\text{5}}$
        before = s
        s = _TEXT_CMD.sub(r"\1", s).strip().rstrip(".;,:").strip()
        for pattern, repl in _WRAPPERS:
            s = pattern.sub(repl, s).strip()
        if s == before:
            break
    return s


def _to_fraction(s: str) -> Fraction | None:
    m = _NUMBER_RE.match(s)
    if not m:
        return None
    sign = -1 if m.group("sign") == "-" else 1
    try:
        if m.group("fn") is not None:
            value = Fraction(int(m.group("fn")), int(m.group("fd")))
        elif m.group("sn") is not None:
            value = Fraction(int(m.group("sn")), int(m.group("sd")))
        elif m.group("rn") is not None:
            value = Fraction(int(m.group("rn")), int(m.group("rd")))
        else:
            value = Fraction(m.group("dec").replace(",", ""))
    except ZeroDivisionError:
        return None
    return sign * value


def parse_number(answer: str | None) -> Fraction | None:
    """The value of an answer that is a single number (wrappers, units and ``expr =`` removed), else None."""
    if answer is None:
        return None
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    s = _unwrap(answer)
    if "=" in s:  # "expr = v": the claim is v
        s = _unwrap(s.rsplit("=", 1)[1])
    s = re.sub(r"^(?:\$|rs\.?|usd)\s*", "", s, flags=re.IGNORECASE)  # a currency before the number
    s = _UNITS.sub("", s).strip()
    m = re.fullmatch(r"\(\s*(.*?)\s*\)", s)  # (-5)
    if m:
        s = m.group(1)
    return _to_fraction(s)


def gold_number(gold: str) -> Fraction | None:
    """The gold answer's value: a strict parse, else (data such as MathQA's ``"' 16 : 1'"``, ``". 3"``,
    ``"$ 1080 million"``) the ratio or first number in it after quotes and brackets are removed."""
    if not isinstance(gold, str):
        raise TypeError(f"gold must be a str, got {type(gold).__name__}")
    value = parse_number(gold)
    if value is not None:
        return value
    m = re.fullmatch(r"\s*(\d+)\s*\[\s*(\d+)\s*/\s*(\d+)\s*\]\s*", gold)  # a mixed number: 1 [ 1 / 5 ]
    if m and int(m.group(3)):
        return int(m.group(1)) + Fraction(int(m.group(2)), int(m.group(3)))
    s = re.sub(r"[\[\]'\"]", " ", gold).replace(",", "")
    m = re.search(r"(-?\d+)\s*:\s*(\d+)", s)
    if m and int(m.group(2)):
        return Fraction(int(m.group(1)), int(m.group(2)))
    m = re.search(r"-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?", s)
    return parse_number(m.group(0)) if m else None


def strict_score(completion: str, gold: str, rel_tol: float = 0.0) -> float:
    """1.0 if the completion's final answer is a number equal to the gold number (within ``rel_tol`` relative to
    max(1, |gold|); default exact), else 0.0."""
    gold_value = gold_number(gold)
    if gold_value is None:
        raise ValueError(f"gold answer {gold!r} holds no number")
    value = parse_number(final_answer(completion))
    if value is None:
        return 0.0
    return float(abs(value - gold_value) <= Fraction(rel_tol) * max(1, abs(gold_value)))


def strict_scorer(gold: str, rel_tol: float = 0.0):
    """``score(completion)`` for one gold answer (checked once, here)."""
    if gold_number(gold) is None:
        raise ValueError(f"gold answer {gold!r} holds no number")
    return lambda completion: strict_score(completion, gold, rel_tol)
