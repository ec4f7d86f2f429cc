"""SplitReason's published rewards on hand-written completions, quirks included."""

import pytest

from effllm_lib.offload import rewards as R

GOOD = "<think>\nwork <bigmodel>hard</bigmodel> more\n</think>\n<answer>\n\\boxed{42}\n</answer>"


def tagged(inside: int, outside: int) -> str:
    return "<bigmodel>" + "x" * inside + "</bigmodel>" + "y" * outside


@pytest.mark.parametrize("inside,outside,ratio,reward", [
    (20, 59, 0.2, 0.5),    # 20 / (21 + 20 + 59): halfway up the ramp
    (40, 39, 0.4, 1.0),    # the peak
    (70, 9, 0.7, 0.0),     # halfway down: 1 - (2 / 0.6) * 0.3
    (170, 9, 0.85, -0.5),  # 170 / 200
])
def test_coverage_curve(inside, outside, ratio, reward):
    text = tagged(inside, outside)
    assert R.coverage(text) == pytest.approx(ratio)
    assert R.coverage_reward(text) == pytest.approx(reward)


def test_coverage_no_tags_and_unclosed():
    assert R.coverage_reward("plain text") == 0.0              # quirk 5: no offload is 0, not -1
    assert R.coverage("<bigmodel>never closed") == 0.0          # unpaired text does not count
    assert R.coverage("") == 0.0


def test_count_term_floor_division():
    # quirk 4: (0.5 n or 4 - 0.5 (n - 8)) // 2
    table = {0: 0, 1: 0, 3: 0, 4: 1, 7: 1, 8: 2, 9: 1, 12: 1, 13: 0, 16: 0, 17: -1}
    assert {n: R.bigmodel_count_term(n) for n in table} == table


def test_tag_count_well_formed():
    # scaffold 0.5 + 0.5 + 0.25 + 0.25, boxed 0.5, one tag -> count term 0, coverage 4 chars < 40%
    expected = 2.0 + 0.0 + 2 * (4 / len(GOOD)) / 0.4
    assert R.tag_count_reward(GOOD) == pytest.approx(expected)


def test_tag_count_unbalanced_penalty():
    # <think>\n 0.5; one open tag, no close: count term 0, coverage 0, -2
    assert R.tag_count_reward("<think>\n<bigmodel>abc") == pytest.approx(-1.5)
    # four pairs of tags inside the scaffold: count term jumps to 1
    four = "<think>\n" + "a<bigmodel>b</bigmodel>" * 4 + "\n</think>\n"
    assert R.tag_count_reward(four) == pytest.approx(0.5 + 0.5 + 1 + 2 * (4 / len(four)) / 0.4)


def test_format_reward():
    assert R.format_reward(GOOD) == 2.0
    assert R.format_reward("no scaffold at all") == 1.0                         # quirk 3: free nesting point
    assert R.format_reward(GOOD + "\ntrailing junk") == 2.0                     # quirk 2: MULTILINE $
    assert R.format_reward(GOOD + " junk") == 1.0                               # same line: no match
    assert R.format_reward("<bigmodel>a<bigmodel>b</bigmodel></bigmodel>") == 0.0  # overlap
    assert R.format_reward("a</bigmodel>b") == 1.0                              # quirk 3: stray close passes
    assert R.format_reward("<bigmodel>open") == 0.0


def test_accuracy_reward_published():
    def acc(c, s):
        return R.accuracy_reward(c, s, published=True)

    assert acc("so \\boxed{42}", "42") == 1.0
    assert acc("so \\boxed{41}", "42") == 0.0
    assert acc("\\boxed{0.5}", "\\frac{1}{2}") == 1.0   # equivalence, not string match
    assert acc("the answer is 42", "42") == 0.0          # no anchor, no extraction
    assert acc("first \\boxed{3} then \\boxed{42}", "42") == 0.0  # quirk 1: boxed="all"
    assert acc("\\boxed{42}", "no number here") is None  # unparseable gold is skipped
    assert acc("\\boxed{(40 + 2)}", "42") == 1.0         # the hole: an unevaluated expression is evaluated


def test_accuracy_reward_strict():
    acc = R.accuracy_reward
    assert acc("so \\boxed{42}", "42") == 1.0 and acc("so \\boxed{41}", "42") == 0.0
    assert acc("\\boxed{0.5}", "\\frac{1}{2}") == 1.0                 # equivalent forms still agree
    assert acc("first \\boxed{3} then \\boxed{42}", "42") == 1.0      # the last box is the final answer
    assert acc("the answer is 42", "42") == 1.0                       # a declared answer counts
    assert acc("\\boxed{(40 + 2)}", "42") == 0.0                      # never computed: no reward
    assert acc("the answer is (40 + 1) = 42", "43") == 0.0            # declared wrong value
    assert acc("\\boxed{42}", "no number here") is None              # unparseable gold is skipped
    assert acc("anything", "42", scorer=lambda c, s: 0.25) == 0.25
    assert R.total_reward("\\boxed{(40 + 2)}", "42")["accuracy"] == 0.0
    assert R.total_reward("\\boxed{(40 + 2)}", "42", published=True)["accuracy"] == 1.0


def test_total_and_typo():
    out = R.total_reward(GOOD, "42")
    assert out["accuracy"] == 1.0 and out["format"] == 2.0
    assert out["total"] == pytest.approx(1.0 + 2.0 + R.tag_count_reward(GOOD))
    typo = "a<bigmodel>b<\\bigmodel>c"
    assert R.tag_count_reward(typo) < 0  # quirk 6: the data's closing tag is "unbalanced"
    assert R.normalize_close_tags(typo) == "a<bigmodel>b</bigmodel>c"


def test_bad_input():
    with pytest.raises(TypeError, match="completion must be a str"):
        R.format_reward(None)
    with pytest.raises(ValueError, match="peak"):
        R.coverage_reward("x", peak=1.0)
    with pytest.raises(ValueError, match="n_open"):
        R.bigmodel_count_term(-1)
