"""The strict answer check: equivalent forms of one value pass (math_verify is the reference there); restated
questions, unevaluated expressions, wrong declared values and text after the end of the turn score 0."""

import pytest

from effllm_lib.offload import answers as A

# (completion, gold): the same value in another form; math_verify agrees (checked below)
EQUIVALENT = [
    ("\\boxed{0.5}", "1/2"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{\\dfrac{1}{2}}", "1/2"),
    ("\\boxed{1,000}", "1000"),
    ("\\boxed{1000}", "1,000"),
    ("\\boxed{-3}", "-3"),
    ("\\boxed{-\\frac{3}{4}}", "-0.75"),
    ("\\boxed{2.50}", "2.5"),
    ("$\\boxed{42}$", "42"),
    ("\\(\\boxed{-66}\\)", "-66"),
    ("\\[\n\\boxed{-320}\n\\]", "-320"),
]

# (completion, gold, why) that must score 1 (forms math_verify is not the judge of)
RIGHT = [
    ("\\boxed{18 \\text{ days}}", "18 days", "unit words"),
    ("\\boxed{\\$18}", "18", "currency"),
    ("\\boxed{240\\%}", "240 %", "MathQA percent gold"),
    ("\\boxed{240}", "240 %", "the percentage as a number"),
    ("\\boxed{3:10}", "3 : 10", "ratio"),
    ("\\boxed{0.3}", "' 3 : 10'", "ratio as a value"),
    ("\\boxed{200 m}", "200 m", "one-letter unit"),
    ("\\boxed{(-5)}", "-5", "parenthesised number"),
    ("\\boxed{−5}", "-5", "unicode minus"),
    ("\\boxed{1{,}000}", "1000", "LaTeX thousands separator"),
    ("\\boxed{x = 7}", "7", "assignment"),
    ("(3 + 4) * 2 = 14, so the answer is 14.", "14", "declared answer"),
    ("The answer is: 100<|im_end|>", "100", "declared, end of turn"),
    ("Final answer:\n\n\\[\n 42\n\\]\n", "42", "declared, display math"),
    ("Answer: 42. Let me check the answer.", "42", "a later mention of 'answer' is no declaration"),
    ("first \\boxed{3} then \\boxed{42}", "42", "the last box is the final answer"),
    ("so \\boxed{12} and then \\boxed{unclosed", "12", "an unclosed box after a closed one"),
    ("the answer is \\((2 - 0)\\) = 2", "2", "a restatement followed by the right value"),
    ("<bigmodel>\\boxed{7}</bigmodel>", "7", "tags are not part of the answer"),
    ("\\boxed{\\frac{6}{5}}", "1 [ 1 / 5 ]", "MathQA mixed-number gold"),
]

# (completion, gold, why) that must score 0
WRONG = [
    ("\\boxed{(((-9 - 7) * (-1 + 0)) * (5 + 5))}", "160", "unevaluated expression"),
    ("\\boxed{(2 - -4)}", "6", "restated question"),
    ("So, the final answer is \\((-8 + -9)\\).", "-17", "declared restatement"),
    ("So, the final answer is \\((2 - -4)\\) = 2.", "6", "declared restatement with a wrong value"),
    ("the answer is (x - y) = 10", "12", "expression = wrong value"),
    ("\\boxed{5 \\times 3}", "15", "product not evaluated"),
    ("\\boxed{5 \\cdot 3}", "15", "product not evaluated"),
    ("\\boxed{3 + 4}", "7", "sum not evaluated"),
    ("\\boxed{3, 42}", "42", "two numbers"),
    ("\\boxed{10 or 12}", "12", "two candidates"),
    ("\\boxed{\\sqrt{4}}", "2", "not a number literal"),
    ("\\boxed{2^3}", "8", "power not evaluated"),
    ("\\boxed{41}", "42", "wrong number"),
    ("\\boxed{42.5}", "42", "close is not equal"),
    ("42", "42", "neither boxed nor declared"),
    ("\\boxed{5 x}", "5", "one-letter word that is not a unit"),
    ("The answer is: 7<|im_end|>\nThe answer is: 100", "100", "text after the end of the turn"),
    ("\\boxed{7}<|endoftext|>\\boxed{100}", "100", "text after end of sequence"),
    ("\\boxed{1,5}", "1.5", "decimal comma"),
    ("\\boxed{}", "0", "empty box"),
    ("\\boxed{\\frac{1}{0}}", "0", "division by zero"),
]


@pytest.mark.parametrize("completion,gold", EQUIVALENT)
def test_equivalent_forms_agree_with_math_verify(completion, gold):
    from math_verify import parse, verify

    assert A.strict_score(completion, gold) == 1.0
    # the reference: math_verify also calls these equal
    assert verify(parse(f"${gold}$"), parse(completion)), (completion, gold)


@pytest.mark.parametrize("completion,gold,why", RIGHT)
def test_right_answers(completion, gold, why):
    assert A.strict_score(completion, gold) == 1.0, why


@pytest.mark.parametrize("completion,gold,why", WRONG)
def test_wrong_answers(completion, gold, why):
    assert A.strict_score(completion, gold) == 0.0, why


def test_math_verify_credits_what_the_strict_check_refuses():
    """The hole the strict check closes: the published reward evaluates restated questions."""
    from effllm_lib.offload.rewards import accuracy_reward

    for completion, gold in [("\\boxed{(2 - -4)}", "6"), ("\\boxed{3 + 4}", "7"),
                             ("So, the final answer is \\((-8 + -9)\\).", "-17")]:
        assert accuracy_reward(completion, gold, published=True) == 1.0
        assert accuracy_reward(completion, gold) == 0.0


def test_restating_real_questions_scores_zero():
    """On real multistep_arithmetic problems: the question boxed (or declared) earns 0, its value (computed by
    Python, an independent reference) earns 1."""
    from effllm_lib.offload.problems import load_problems

    probs = load_problems("multistep_arithmetic", 30, seed=3)
    for p in probs:
        expr = p.question.strip().rstrip("=").strip()
        value = eval(expr, {"__builtins__": {}})  # integer arithmetic with + - * and parentheses
        assert str(value) == p.answer
        assert p.score(f"\\boxed{{{expr}}}") == 0.0
        assert p.score(f"The final answer is {expr}.") == 0.0
        assert p.score(f"The final answer is {expr} = {value + 1}.") == 0.0
        assert p.score(f"so {expr} = {value}, hence \\boxed{{{value}}}") == 1.0


def test_parts():
    assert A.cut_at_end_of_turn("a<|im_end|>b<|endoftext|>c") == "a"
    assert A.last_boxed("\\boxed{a{b}c} x \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert A.last_boxed("no box") is None
    assert A.final_answer("text\nThe answer is 5, since 2 + 3 = 5") == "5"
    assert A.parse_number("1,000,000") == 1_000_000 and A.parse_number("1,00") is None
    assert A.gold_number("$ 1080 million") == 1080 and A.gold_number("1 [ 1 / 5 ]") == A.parse_number("6/5")


def test_bad_input():
    with pytest.raises(TypeError, match="completion must be a str"):
        A.final_answer(None)
    with pytest.raises(ValueError, match="holds no number"):
        A.strict_scorer("no number")
    with pytest.raises(TypeError, match="gold must be a str"):
        A.gold_number(5)
