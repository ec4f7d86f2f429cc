"""effllm_lib.glue: numbers glued into prose are plain Python numbers from committed full-scale files."""
import math

import numpy as np
import pandas as pd
import pytest

from effllm_lib import glue, results


@pytest.mark.parametrize("value, expected", [
    (np.float64(65.25), 65.25), (np.int64(36), 36), (np.float32(0.5), 0.5), (np.array(3.5), 3.5),
    (pd.Series([2.25]), 2.25), (7, 7), (1.5, 1.5),
])
def test_as_number_gives_python_numbers(value, expected):
    out = glue.as_number(value)
    assert out == expected and type(out) is type(expected)
    assert f"{out:.1f}" == f"{expected:.1f}"  # repr is what MyST-NB formats: no 'np.float64(...)'
    assert repr(out) == repr(expected)


@pytest.mark.parametrize("value, error", [
    (float("nan"), ValueError), (np.inf, ValueError), (pd.Series([1.0, 2.0]), ValueError),
    ("65%", TypeError), (True, TypeError), (None, TypeError),
])
def test_as_number_rejects_what_is_not_one_number(value, error):
    with pytest.raises(error):
        glue.as_number(value)


def test_number_glues_hidden_plain_text(monkeypatch):
    calls = []
    import myst_nb
    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display=True: calls.append((name, value, display)))
    assert glue.number("share", np.float64(65.2)) == 65.2
    glue.numbers_(a=np.int64(3), b=0.25)
    assert calls == [("share", 65.2, False), ("a", 3, False), ("b", 0.25, False)]
    assert all(type(v) in (int, float) for _, v, _ in calls)


def test_committed_refuses_ci_scale(tmp_path, monkeypatch):
    df = pd.DataFrame({"x": [1.0]})
    monkeypatch.setattr(results, "results_dir", lambda chapter: tmp_path / chapter)
    ci = results.save(df, "serving", "only_ci", scale="ci", params={"n": 2})
    assert ci.is_file()
    with pytest.raises(results.ResultsError, match="full-scale"):
        glue.committed("serving", "only_ci")
    results.save(df, "serving", "full_one", scale="full", params={"n": 36})
    got = glue.committed("serving", "full_one")
    assert glue.params(got) == {"n": 36}


def test_params_needs_provenance():
    with pytest.raises(ValueError, match="provenance"):
        glue.params(pd.DataFrame({"x": [1]}))
