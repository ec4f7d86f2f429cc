"""Problem sources, scorers and the resumable pass@1 harness."""

import json

import pandas as pd
import pytest

from effllm_lib.offload import problems as P


def test_extract_boxed():
    assert P.extract_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert P.extract_boxed("no box") is None
    assert P.extract_boxed("\\boxed{unclosed") is None


def test_sources_are_seeded_and_scored():
    for source in P.SOURCES:
        a, b = P.load_problems(source, 5, seed=7), P.load_problems(source, 5, seed=7)
        assert [p.question for p in a] == [p.question for p in b]
        assert len({p.id for p in a}) == 5
        for p in a:  # the gold answer, boxed, is right; a different number is wrong
            assert p.score(f"so \\boxed{{{p.answer}}}") == 1.0, (source, p.answer)
            assert p.score("so \\boxed{123456789}") == 0.0
            assert p.score(p.answer) == 0.0  # no box, no credit


def test_every_source_is_strict():
    """Each source refuses what its old scorer credited: reasoning-gym took the first number of the box,
    the MathQA scorer the first number of the box, math_verify evaluated the expression."""
    gsm = P.load_problems("gsm_symbolic", 3, seed=0)
    for p in gsm:
        assert p.score(f"\\boxed{{{p.answer} + 0}}") == 0.0       # reasoning-gym: first number, 1.0
        assert p.score(f"\\boxed{{{p.answer} \\text{{ dollars}}}}") == 1.0
    qa = {p.answer: p for p in P.load_problems("elementary_math_qa", 200, seed=0)}
    pct = next(p for a, p in qa.items() if a.endswith("%"))
    value = pct.answer.rstrip(" %")
    assert pct.score(f"\\boxed{{{value}\\%}}") == 1.0 and pct.score(f"\\boxed{{{value} - 1 + 1}}") == 0.0
    ratio = next(p for a, p in qa.items() if ":" in a)
    num, den = (int(x) for x in ratio.answer.strip("[]' ").split(":"))
    assert ratio.score(f"\\boxed{{{num}:{den}}}") == 1.0 and ratio.score(f"\\boxed{{{num}}}") == float(den == 1)
    arith = P.load_problems("multistep_arithmetic", 2, seed=0)[0]
    assert arith.score(f"\\boxed{{{arith.question.rstrip(' =')}}}") == 0.0  # math_verify: 1.0


def test_evaluate_resumes_and_appends(tmp_path):
    probs = P.load_problems("multistep_arithmetic", 4, seed=0)
    calls = []

    def gen(p, s):
        calls.append((p.id, s))
        return {"text": f"\\boxed{{{p.answer}}}" if s == 0 else "\\boxed{0.123}"}

    log = tmp_path / "log.jsonl"
    P.evaluate(probs[:2], gen, log, k=2, progress=False)
    assert len(calls) == 4
    with open(log, "ab") as fh:  # a crash in the middle of a write
        fh.write(b'{"problem_id": "x", "sam')
    df = P.evaluate(probs, gen, log, k=2, progress=False)
    assert len(calls) == 8                      # only the 4 missing samples ran
    assert len(df) == 8 and df.duplicated(["problem_id", "sample"]).sum() == 0
    assert all(json.loads(line) for line in log.read_text().splitlines())  # the torn line is gone
    res = P.pass_at_1(df)
    assert res["pass@1"] == pytest.approx(0.5) and res["problems"] == 4
    assert res["lo"] <= 0.5 <= res["hi"]


def test_pass_at_1_interval():
    df = pd.DataFrame({"problem_id": [f"p{i}" for i in range(100)], "correct": [1.0] * 30 + [0.0] * 70})
    res = P.pass_at_1(df)
    # binomial standard error sqrt(.3 * .7 / 100) = 0.046: a 95% interval about +-0.09
    assert res["pass@1"] == pytest.approx(0.3)
    assert 0.19 < res["lo"] < 0.23 and 0.37 < res["hi"] < 0.41


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown source"):
        P.load_problems("gsm8k", 3)
    with pytest.raises(ValueError, match="positive"):
        P.load_problems("gsm_symbolic", 0)
    with pytest.raises(TypeError, match="text"):
        P.evaluate(P.load_problems("multistep_arithmetic", 1), lambda p, s: "x", tmp_path / "l.jsonl",
                   progress=False)
