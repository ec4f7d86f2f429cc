"""Two ways to mark the spans of a reasoning trace that the big model should write, at the same budget.

``llm_spans`` (the paper's annotator, driven by a local model): an instruction model is asked to copy verbatim the
hardest snippets of the trace, about ``fraction`` (20%) of its characters, each between delimiter lines. Models
do not copy exactly, so each snippet is located by fuzzy matching: the window of the snippet's length with the
highest ``difflib`` ratio (case-insensitive), kept if the ratio is >= 0.5; when the match is not near-exact
(ratio < 0.95) its start and end are moved to where the snippet's first / last few characters occur within 50
characters. Located spans are sorted and merged when at most 10 characters apart. (Same procedure as the paper's
data generator; written here from its description.)

``gap_spans`` (likelihood gap): the small and the big model each score the trace; a character's gap is the small
model's loss minus the big model's, each token's loss spread evenly over its characters (the two tokenizers
differ, characters are common ground). Windows of ``window`` small-model tokens are taken greedily by total gap,
never overlapping, whatever the gap's sign, until the spans hold ``coverage`` of the characters; then merged like the LLM's spans. The
big model writes where it is most surprised less than the small one: where offloading should help most.

``insert_tags`` writes ``<bigmodel>...</bigmodel>`` (the correct closing tag, not the original's ``<\\bigmodel>``)
around the spans; ``span_report`` says how much is covered and where the spans fall.
"""

from __future__ import annotations

import difflib
import re
from typing import Callable

import numpy as np
import torch

from .rewards import BIG_CLOSE, BIG_OPEN

SNIPPET_START = "-----SNIPPET START-----"
SNIPPET_END = "-----SNIPPET END-----"
_SNIPPET = re.compile(r"-{3,}\s*SNIPPET\s+START\s*-{3,}\s*(.*?)\s*-{3,}\s*SNIPPET\s+END\s*-{3,}", re.DOTALL)
Span = tuple[int, int]


# ------------------------------------------------------------------------------------------ span utilities
def merge_spans(spans: list[Span], max_gap: int = 10) -> list[Span]:
    """Sorted spans with overlaps and gaps of at most ``max_gap`` characters joined."""
    out: list[Span] = []
    for s, e in sorted(spans):
        if not (0 <= s < e):
            raise ValueError(f"bad span {(s, e)}: need 0 <= start < end")
        if out and s <= out[-1][1] + max_gap:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def insert_tags(text: str, spans: list[Span]) -> str:
    """``text`` with each (merged, non-overlapping) span wrapped in ``<bigmodel>`` ... ``</bigmodel>``."""
    parts, last = [], 0
    for s, e in spans:
        if s < last or e > len(text):
            raise ValueError(f"spans must be sorted, disjoint and inside the text; got {(s, e)} after {last}")
        parts += [text[last:s], BIG_OPEN, text[s:e], BIG_CLOSE]
        last = e
    parts.append(text[last:])
    return "".join(parts)


def span_report(text: str, spans: list[Span]) -> dict:
    """Coverage (fraction of characters inside spans), span count and mean length, mean relative position of
    the spans' centres (0 = start of the trace, 1 = end), and the share of tagged characters that are digits or
    arithmetic signs against that share in the whole trace (do spans fall on the computations?)."""
    n = len(text)
    if n == 0:
        raise ValueError("empty text")
    covered = sum(e - s for s, e in spans)
    math = re.compile(r"[0-9+\-*/=×÷.%$£€]")
    tagged = "".join(text[s:e] for s, e in spans)
    return {"chars": n, "coverage": covered / n, "spans": len(spans),
            "mean_span_chars": covered / len(spans) if spans else 0.0,
            "mean_position": float(np.mean([(s + e) / 2 / n for s, e in spans])) if spans else float("nan"),
            "math_share_tagged": len(math.findall(tagged)) / len(tagged) if tagged else float("nan"),
            "math_share_all": len(math.findall(text)) / n}


# ----------------------------------------------------------------------------------------- LLM annotator
def snippet_messages(trace: str, fraction: float = 0.2) -> list[dict]:
    """Chat messages asking a model to copy the hardest snippets of ``trace`` verbatim, ~``fraction`` of it."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    target = int(len(trace) * fraction)
    system = (
        "You read a worked solution and pick out its hardest parts. Copy those parts exactly as written (same "
        "characters, spacing and punctuation), as short snippets: a step, an equation, a few words. Together they "
        f"should be about {round(fraction * 100)}% of the solution, roughly {target} characters. Put each snippet "
        f"on its own lines between {SNIPPET_START} and {SNIPPET_END}. Write nothing else.")
    user = (f"Solution:\n{trace}\n\nCopy the hardest snippets, about {target} characters in total, each between "
            f"{SNIPPET_START} and {SNIPPET_END}.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_snippets(raw: str) -> list[str]:
    """The snippets between delimiter lines; without any delimiters, the non-empty lines of the answer."""
    found = [m.strip() for m in _SNIPPET.findall(raw)]
    if found:
        return [s for s in found if s]
    return [ln.strip() for ln in raw.splitlines() if ln.strip()]


def locate(snippet: str, text: str, min_ratio: float = 0.5, refine_below: float = 0.95, search: int = 50,
           anchor: int = 5) -> tuple[int, int, float] | None:
    """(start, end, ratio) of the window of ``text`` most like ``snippet`` (difflib ratio, case-insensitive), or
    None below ``min_ratio``. Below ``refine_below`` the ends move to where the snippet's first / last
    ``anchor`` characters occur within ``search`` characters of them."""
    m, n = len(snippet), len(text)
    if m == 0 or m > n:
        return None
    s_low, t_low = snippet.lower(), text.lower()
    exact = t_low.find(s_low)
    if exact != -1:
        return exact, exact + m, 1.0
    matcher = difflib.SequenceMatcher(None, autojunk=False)
    matcher.set_seq2(s_low)  # seq2 is the one difflib indexes: set it once
    best, best_i = 0.0, None
    for i in range(n - m + 1):
        matcher.set_seq1(t_low[i:i + m])
        if matcher.real_quick_ratio() <= best or matcher.quick_ratio() <= best:
            continue
        r = matcher.ratio()
        if r > best:
            best, best_i = r, i
    if best_i is None or best < min_ratio:
        return None
    start, end = best_i, best_i + m
    if best < refine_below:
        head, tail = s_low[:anchor], s_low[-anchor:]
        lo = max(0, start - search)
        k = t_low.find(head, lo, min(n, start + search))
        if k != -1:
            start = k
        lo = max(0, end - search - anchor)
        k = t_low.find(tail, lo, min(n, end + search))
        if k != -1:
            end = k + anchor
        if end <= start:  # the anchors crossed: keep the unrefined window
            start, end = best_i, best_i + m
    return start, end, best


def spans_from_snippets(text: str, snippets: list[str], max_gap: int = 10, **locate_kw) -> list[Span]:
    found = [locate(s, text, **locate_kw) for s in snippets]
    return merge_spans([(s, e) for s, e, _ in filter(None, found)], max_gap)


def llm_spans(trace: str, generate: Callable[[list[dict]], str], fraction: float = 0.2,
              max_gap: int = 10) -> list[Span]:
    """The paper's procedure: ``generate(messages) -> str`` is the annotator model."""
    raw = generate(snippet_messages(trace, fraction))
    if not isinstance(raw, str):
        raise TypeError(f"generate must return a str, got {type(raw).__name__}")
    return spans_from_snippets(trace, parse_snippets(raw), max_gap)


def local_generator(model, tokenizer, max_new_tokens: int = 256) -> Callable[[list[dict]], str]:
    """``generate(messages)`` with a local chat model, greedy (the annotation is then reproducible)."""
    def generate(messages: list[dict]) -> str:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        ids = {k: v.to(model.device) for k, v in ids.items()}
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    return generate


# ----------------------------------------------------------------------------------- likelihood-gap annotator
@torch.inference_mode()
def char_losses(model, tokenizer, prompt: str, text: str) -> tuple[np.ndarray, list[Span]]:
    """Per-character loss of ``text`` after ``prompt`` (each token's negative log-likelihood spread evenly over
    its characters) and the character span of each of ``text``'s tokens."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    p_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not p_ids:
        raise ValueError("the prompt must not be empty (the first token needs a context)")
    dev = next(model.parameters()).device
    full = torch.tensor([p_ids + ids], device=dev)
    logits = model(input_ids=full).logits[0, len(p_ids) - 1:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, full[0, len(p_ids):], reduction="none").cpu().numpy()
    per_char = np.zeros(len(text))
    for loss, (a, b) in zip(nll, offsets):
        if b > a:
            per_char[a:b] += loss / (b - a)
    return per_char, offsets


def select_windows(char_gap: np.ndarray, token_spans: list[Span], coverage: float, window: int = 6,
                   max_gap: int = 10) -> list[Span]:
    """Greedy non-overlapping windows of ``window`` tokens with the largest total gap, until the merged spans
    cover ``coverage`` of the characters (or no window fits). The budget is met even where the small model is
    nowhere worse than the big one (all gaps negative): the spans are then where it is least better, so the two
    annotators are always compared at the same coverage."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1), got {coverage!r}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    tok_spans = [(a, b) for a, b in token_spans if b > a]
    n_tok, n_char = len(tok_spans), len(char_gap)
    if n_tok == 0:
        return []
    w = min(window, n_tok)
    tok_gap = np.array([char_gap[a:b].sum() for a, b in tok_spans])
    sums = np.convolve(tok_gap, np.ones(w), mode="valid")  # sums[i] = gap of tokens i .. i+w-1
    taken = np.zeros(n_tok, dtype=bool)
    chosen: list[Span] = []
    for i in np.argsort(-sums, kind="stable"):
        if taken[i:i + w].any():
            continue
        taken[i:i + w] = True
        chosen.append((tok_spans[i][0], tok_spans[i + w - 1][1]))
        merged = merge_spans(chosen, max_gap)
        if sum(e - s for s, e in merged) >= coverage * n_char:
            return merged
    return merge_spans(chosen, max_gap)


def gap_spans(small, big, text: str, coverage: float, *, window: int = 6, max_gap: int = 10) -> list[Span]:
    """Likelihood-gap spans of ``text``; ``small`` / ``big`` are (model, tokenizer, prompt) triples (each model
    reads the trace after its own prompt). Token windows are the small model's."""
    gap_s, spans_s = char_losses(*small[:2], small[2], text)
    gap_b, _ = char_losses(*big[:2], big[2], text)
    return select_windows(gap_s - gap_b, spans_s, coverage, window, max_gap)
