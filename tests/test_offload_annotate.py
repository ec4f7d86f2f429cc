"""Annotators: fuzzy snippet location, merging, tag insertion, likelihood-gap spans (no annotator model needed)."""

import difflib

import numpy as np
import pytest
import torch

from effllm_lib.offload import annotate as A
from effllm_lib.offload.rewards import coverage

TRACE = ("First find how long it takes Emily to peel the onion: 36 onion / 4 onion/minute = 9 minutes\n"
         "Then find how many batches she needs to cook: 36 onion / 12 onion/batch = 3 batches\n"
         "Then multiply the number of batches by the time per batch: 3 batches * 7 minutes/batch = 21 minutes\n"
         "Then add the peeling time: 21 minutes + 9 minutes = 30 minutes")


def brute_best_window(snippet, text):
    """Every window of the snippet's length, the plain difflib ratio, first best: the reference."""
    m = len(snippet)
    ratios = [difflib.SequenceMatcher(None, snippet.lower(), text[i:i + m].lower()).ratio()
              for i in range(len(text) - m + 1)]
    i = int(np.argmax(ratios))
    return i, ratios[i]


def test_locate_exact_and_case_insensitive():
    s = "3 batches * 7 minutes/batch = 21 minutes"
    i = TRACE.index(s)
    assert A.locate(s, TRACE) == (i, i + len(s), 1.0)
    assert A.locate(s.upper(), TRACE) == (i, i + len(s), 1.0)


def test_locate_fuzzy_matches_brute_force_and_refines_boundaries():
    true = "36 onion / 12 onion/batch = 3 batches"
    sloppy = "36 onions / 12 onion per batch = 3 batches"  # what a model copies: not verbatim
    start, end, ratio = A.locate(sloppy, TRACE)
    i, r = brute_best_window(sloppy, TRACE)
    assert ratio == pytest.approx(r) and 0.5 <= ratio < 0.95
    # refinement moves the ends onto the snippet's first / last characters in the text
    assert TRACE[start:end] == true


def test_locate_rejects_unrelated_text():
    assert A.locate("the derivative of sin is cos, so integrate by parts", TRACE) is None
    assert A.locate("", TRACE) is None
    assert A.locate(TRACE + "x", TRACE) is None


def test_merge_and_insert():
    assert A.merge_spans([(30, 40), (0, 5), (45, 50), (61, 70), (3, 8)]) == [(0, 8), (30, 50), (61, 70)]
    assert A.merge_spans([(0, 5), (16, 20)], max_gap=10) == [(0, 5), (16, 20)]
    assert A.merge_spans([(0, 5), (15, 20)], max_gap=10) == [(0, 20)]
    with pytest.raises(ValueError, match="bad span"):
        A.merge_spans([(5, 5)])
    text = "abcdefghij"
    tagged = A.insert_tags(text, [(1, 3), (6, 9)])
    assert tagged == "a<bigmodel>bc</bigmodel>def<bigmodel>ghi</bigmodel>j"
    assert tagged.replace("<bigmodel>", "").replace("</bigmodel>", "") == text
    with pytest.raises(ValueError, match="sorted"):
        A.insert_tags(text, [(6, 9), (1, 3)])


def test_parse_snippets():
    raw = (f"{A.SNIPPET_START}\n3 batches * 7 = 21\n{A.SNIPPET_END}\nnoise\n"
           f"--- SNIPPET START ---\n  a = b \n---SNIPPET END---")
    assert A.parse_snippets(raw) == ["3 batches * 7 = 21", "a = b"]
    assert A.parse_snippets("line one\n\n line two ") == ["line one", "line two"]


def test_llm_spans_pipeline_with_a_scripted_annotator():
    seen = []

    def annotator(messages):
        seen.append(messages)
        return (f"{A.SNIPPET_START}\n36 onions / 12 onion per batch = 3 batches\n{A.SNIPPET_END}\n"
                f"{A.SNIPPET_START}\n21 minutes + 9 minutes = 30 minutes\n{A.SNIPPET_END}\n"
                f"{A.SNIPPET_START}\nthis sentence is not in the trace at all, nothing like it\n{A.SNIPPET_END}")

    spans = A.llm_spans(TRACE, annotator, fraction=0.2)
    assert [TRACE[s:e] for s, e in spans] == ["36 onion / 12 onion/batch = 3 batches",
                                              "21 minutes + 9 minutes = 30 minutes"]
    assert str(int(len(TRACE) * 0.2)) in seen[0][0]["content"]  # the character budget is in the request
    tagged = A.insert_tags(TRACE, spans)
    rep = A.span_report(TRACE, spans)
    assert rep["coverage"] == pytest.approx(sum(e - s for s, e in spans) / len(TRACE))
    # the reward's coverage counts the tags in the length: a little lower
    assert coverage(tagged) == pytest.approx(sum(e - s for s, e in spans) / len(tagged))
    assert rep["spans"] == 2 and rep["math_share_tagged"] > rep["math_share_all"]
    with pytest.raises(TypeError, match="str"):
        A.llm_spans(TRACE, lambda m: None)


def test_select_windows_by_hand():
    # 10 one-character tokens; the gap is high on tokens 6-8 and 1-2
    gap = np.array([0, 3, 3, 0, 0, 0, 5, 5, 5, 0], dtype=float)
    toks = [(i, i + 1) for i in range(10)]
    assert A.select_windows(gap, toks, coverage=0.25, window=3, max_gap=0) == [(6, 9)]
    # more budget: windows at tokens 5 and 7 overlap the first; then tokens 0-2 and 1-3 both sum 6 and the
    # stable sort takes the first
    assert A.select_windows(gap, toks, coverage=0.5, window=3, max_gap=0) == [(0, 3), (6, 9)]
    # no positive gap: the budget is still met, at the least negative windows
    neg = -np.array([5, 5, 1, 1, 5, 5, 5, 5, 5, 5], dtype=float)
    assert A.select_windows(neg, toks, coverage=0.2, window=2, max_gap=0) == [(2, 4)]
    with pytest.raises(ValueError, match="coverage"):
        A.select_windows(gap, toks, coverage=1.5)


def test_char_losses_match_a_token_by_token_reference():
    from test_offload_controller import make_tokenizer
    from test_offload_tags import tiny_llama

    tok = make_tokenizer(300, tags=False)
    model = tiny_llama(len(tok), tied=True, seed=1)
    prompt, text = "question: add 12 and 30.\n", "add 12 and 30 to get 42"
    per_char, spans = A.char_losses(model, tok, prompt, text)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    t_ids = tok(text, add_special_tokens=False)["input_ids"]
    expected = []
    for k, t in enumerate(t_ids):  # reference: one forward per token, no batching
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p_ids + t_ids[:k]])).logits[0, -1]
        expected.append(float(-torch.log_softmax(logits, -1)[t]))
    assert [text[a:b] for a, b in spans] == [tok.decode([t]) for t in t_ids]
    got = [per_char[a:b].sum() for a, b in spans]
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert per_char.sum() == pytest.approx(sum(expected), rel=1e-4)


def test_gap_spans_reach_the_budget_with_two_tokenizers():
    from test_offload_controller import make_tokenizer
    from test_offload_tags import tiny_llama

    tok_s, tok_b = make_tokenizer(300, tags=False), make_tokenizer(280, tags=False)
    small, big = tiny_llama(len(tok_s), True, seed=1), tiny_llama(len(tok_b), True, seed=2)
    text = TRACE[:200]
    spans = A.gap_spans((small, tok_s, "q:\n"), (big, tok_b, "q:\n"), text, coverage=0.2, window=4)
    cov = A.span_report(text, spans)["coverage"]
    assert spans and cov >= 0.2 and cov < 0.6
